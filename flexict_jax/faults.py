"""One-line messages for the faults a run can meet (the train CLI prints them; docs/operations.md §3).

A known fault — disk full, a workdir that cannot be written, an incompatible checkpoint, a corrupt record, a
bad config value or missing data — becomes one line naming the path or key and what to do. Orbax's save
threads and TensorStore wrap the OS error in their own exceptions and text, so the whole chain of causes,
contexts and exception-group members is searched, by errno and by that text.
"""
from __future__ import annotations

import errno

from flexict_jax import checkpointing
from flexict_jax.data import records
from flexict_jax.errors import ConfigError

# By errno, and by the text TensorStore and Orbax's save threads wrap the OS error in.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[OS error 28")
_NOT_WRITABLE_TEXT = ("Permission denied", "Read-only file system", "Operation not permitted")


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, its causes and contexts, and the members of exception groups (Orbax's save threads)."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return seen


def _filename(chain: list[BaseException]) -> str:
    return next((str(e.filename) for e in chain if isinstance(e, OSError) and e.filename), "")


def one_line(error: BaseException, workdir: str) -> str | None:
    """The one-line message for a known fault (see the module docstring), or None for anything else."""
    chain = _chain(error)
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain)
    where = _filename(chain) or workdir
    if codes & set(_DISK_FULL) or any(t in text for t in _DISK_FULL_TEXT):
        return (f"no space left on the device holding {where}: free space there (or move the run to a larger "
                f"disk) and run the same command again; it resumes from the last complete checkpoint")
    if codes & set(_NOT_WRITABLE) or any(t in text for t in _NOT_WRITABLE_TEXT):
        return (f"cannot write {where} ({next((t for t in _NOT_WRITABLE_TEXT if t in text), 'permission denied')}):"
                f" make the workdir writable or pass another --workdir")
    for e in chain:
        if isinstance(e, (checkpointing.IncompatibleCheckpointError, checkpointing.NoRestorableCheckpointError)):
            return str(e)
        if isinstance(e, records.CorruptRecordError):
            return (f"{e}. Rebuild or restore that shard (`python -m data_prep.verify --slices DIR` lists every "
                    f"broken one), or pass --config.data.on_corrupt=skip to replace corrupt records and go on")
    if isinstance(error, (ConfigError, FileNotFoundError, ValueError, KeyError)):
        return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return None


