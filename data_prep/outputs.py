"""What the offline data_prep tools share about writing their outputs and ending their runs.

* `exclusive`: one run of a tool per dataset, so a file the tool rewrites there has a single writer.
* `check_output`, `staged_dir`, `publish`: an output directory is built beside its destination and renamed
  into place when complete; a non-empty destination is replaced only on request, and only when it holds this
  tool's own earlier output (never e.g. a dataset given as --output by mistake). A gs:// destination is built
  in a local folder and uploaded, its index last (`storage.publish_dir`).
* `ShardWriter`, `WRITER_OPTIONS`: numbered ArrayRecord shards.
* `ordered_map`: per-volume work in spawned worker processes (`flexict_jax.parallel`) or a Beam pipeline.
* `write_atomically`: a single file replaced in one rename.
* `report`, `ExitOneParser`, `run_tool`: the console conventions. Exit status 0 all done, 1 fatal (bad
  arguments included), 2 finished but some input was skipped, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator

from array_record.python.array_record_module import ArrayRecordWriter

from data_prep import storage
from flexict_jax import parallel

EXIT_FATAL, EXIT_INTERRUPTED = 1, 130
WRITER_OPTIONS = "group_size:1,zstd:3"  # group_size 1: every record is randomly accessible (docs/jax_notes.md §A5)


# --- the dataset lock ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def exclusive(dataset_dir: pathlib.Path, lock_name: str, busy: str,
              error: type[Exception] = RuntimeError) -> Iterator[None]:
    """Holds the lock file `dataset_dir/lock_name` for the block, without waiting.

    Raises `error("DATASET_DIR: <busy>")` when another process holds it. The kernel drops the lock when its
    holder exits, so a crashed run never leaves the dataset locked.
    """
    with open(dataset_dir / lock_name, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise error(f"{dataset_dir}: {busy}") from e
        yield


# --- output directories ----------------------------------------------------------------------------------------

def is_output_dir(path: storage.Location, index_file: str, index_format: str) -> bool:
    """Whether `path` holds an `index_file` whose "format" is `index_format` (a tool's own output)."""
    try:
        index = storage.join(path, index_file)
        text = storage.read_bytes(index) if storage.is_url(index) else index.read_text()
        return json.loads(text).get("format") == index_format
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def check_output(output: storage.Location, overwrite: bool, *, kind: str, index_file: str, index_format: str,
                 error: type[Exception] = FileExistsError) -> None:
    """Raises `error` unless `output` is absent, an empty directory, or (with `overwrite`) a `kind` directory
    written earlier by the same tool: one with an `index_file` of format `index_format`."""
    if not storage.exists(output):
        return
    if not storage.is_url(output) and not output.is_dir():
        raise error(f"{output}: exists and is not a directory")
    if storage.children(output):
        if not overwrite:
            raise error(f"{output}: exists and is not empty; pass --overwrite to replace it")
        if not is_output_dir(output, index_file, index_format):
            raise error(f"{output}: --overwrite only replaces a {kind} (with a {index_file} of format "
                        f"{index_format}); refusing to delete this directory")


def publish(tmp: pathlib.Path, output: pathlib.Path) -> None:
    """Moves the finished `tmp` dir to `output`; an existing output (vetted by `check_output`) is moved aside
    first and deleted only once the new one is in place."""
    old = None
    if output.exists():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(old)
        else:
            output.rmdir()
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def staged_dir(output: storage.Location, index_file: str) -> Iterator[pathlib.Path]:
    """A new hidden directory beside `output` to build it in; published to `output` when the block completes,
    deleted when it raises, so `output` is never seen half-written. For a gs:// `output`, a local temporary
    directory, uploaded with `index_file` last."""
    if storage.is_url(output):
        with tempfile.TemporaryDirectory(prefix="flexict-output-") as tmp:
            yield pathlib.Path(tmp)
            storage.publish_dir(pathlib.Path(tmp), output, index_file)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class ShardWriter:
    """Writes records into numbered ArrayRecord shards of `per_shard` records, `PREFIX-NNNNN-of-MMMMM.array_record`;
    the shard count is known, and the names are given, at `finish`."""

    def __init__(self, directory: pathlib.Path, per_shard: int, prefix: str):
        self.directory, self.per_shard, self.prefix = directory, per_shard, prefix
        self.num_records, self._writer, self._paths = 0, None, []

    def write(self, record: bytes) -> None:
        if self.num_records % self.per_shard == 0:
            self._close_current()
            path = self.directory / f"{self.prefix}-{len(self._paths):05d}.partial"
            self._paths.append(path)
            self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
        self._writer.write(record)
        self.num_records += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> list[str]:
        """Closes the last shard and returns the shard file names, in record order."""
        self._close_current()
        names = []
        for i, path in enumerate(self._paths):
            name = f"{self.prefix}-{i:05d}-of-{len(self._paths):05d}.array_record"
            path.rename(self.directory / name)
            names.append(name)
        return names


def write_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], object]) -> None:
    """Writes `path` through `write(tmp)` on a hidden name beside it that ends like `path` (nibabel picks the
    compression from the suffix), then renames it into place: an interrupted run never leaves a truncated file
    under the real name."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- worker processes ------------------------------------------------------------------------------------------

def ordered_map(fn: Callable, items: Iterable, workers: int, pipeline_args: list[str] | None = None,
                label: str = "map") -> Iterator:
    """`parallel.ordered_map`, or with `pipeline_args` (--runner=...) an Apache Beam pipeline (data_prep/beam.py)."""
    if pipeline_args is not None:
        from data_prep import beam
        yield from beam.map_volumes(fn, list(items), pipeline_args, label)
        return
    yield from parallel.ordered_map(fn, items, workers)


# --- console conventions ---------------------------------------------------------------------------------------

def report(message: str) -> None:
    """A line on stderr; on a terminal it first clears the progress line being redrawn there."""
    print(("\r\033[K" if sys.stderr.isatty() else "") + message, file=sys.stderr)


class ExitOneParser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with status 1 (fatal) instead of argparse's 2, which the
    tools keep for a run that finished but skipped some input."""

    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        self.exit(EXIT_FATAL, f"{self.prog}: error: {message}\n")


def run_tool(name: str, run: Callable[[], int], fatal: tuple[type[Exception], ...], on_interrupt: str) -> int:
    """The exit status of `run()`. An exception of a `fatal` type is printed as "NAME: error: ..." and gives
    status 1; Ctrl-C prints "NAME: interrupted; <on_interrupt>" and gives 130."""
    try:
        return run()
    except fatal as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; {on_interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED
