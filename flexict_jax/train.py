r"""Train a FlexiCT stage.

    python -m flexict_jax.train --config=configs/stage1.py:demo --workdir=runs/stage1 \
        --config.data.dir=data/slices [--config.total_steps=N] [--config.KEY=VALUE ...]

Metrics go to WORKDIR/metrics.jsonl, WORKDIR/tensorboard/ (and the console; W&B with --config.wandb.project=NAME),
checkpoints to WORKDIR/checkpoints/<step>. Running the
same command again resumes from the latest checkpoint. SIGTERM saves the current step and exits 0.

Exit status: 0 finished (or stopped on SIGTERM after saving), 1 refused or failed. A refusal or a known fault
(bad config key or value, unknown config variant, missing or corrupt data, incompatible checkpoint, permission
denied, disk full) is one line on stderr, "error: ...", naming the file or key and what to do; add
--verbosity=1 for the full traceback. Anything else is a bug and prints its traceback.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys
import traceback

# Grain workers are spawned processes that inherit this; one BLAS thread per worker avoids oversubscribing the
# host cores (measured 2x slower crops with threaded OpenBLAS, bench/bench_pipeline2d.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/stage1.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(py_logging.Filter):
    """Orbax and Grain log several INFO lines per checkpoint; keep their warnings, drop their chatter. Unless
    `tracebacks`, their errors lose the traceback too (Orbax's save threads log one per failed thread before
    the main thread re-raises, and `main` turns that into the one line that says what to do)."""

    _QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

    def __init__(self, tracebacks: bool):
        super().__init__()
        self.tracebacks = tracebacks

    def filter(self, record: py_logging.LogRecord) -> bool:
        library = any(q in record.pathname for q in self._QUIET)
        if library and not self.tracebacks:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= py_logging.WARNING or not library


def _verbose(argv: list[str]) -> bool:
    """--verbosity=N / -v N with N >= 1, read from argv so it works before (and when) flag parsing fails."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--verbosity", "-v"):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            return value.lstrip("-").isdigit() and int(value) >= 1
    return False


def _fail(message: str, argv: list[str]) -> None:
    """Exit 1 with one line on stderr; with --verbosity=1 the traceback of the exception being handled first."""
    verbose = _verbose(argv)
    if verbose:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    if not verbose:  # the line stays last: asyncio reports Orbax's failed save futures again at shutdown
        py_logging.disable(py_logging.CRITICAL)
    sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from flexict_jax import host_heap
    heap = host_heap.keep_step_buffers()  # before JAX creates its backend's threads
    from flexict_jax import evals, faults, trainer  # after flag parsing, so --help stays fast
    logging.set_verbosity(max(logging.INFO, flags.FLAGS.verbosity))
    logging.info("host heap: %s", heap)
    logging.get_absl_handler().addFilter(_LibraryInfoFilter(tracebacks=_verbose(sys.argv)))
    try:
        code = trainer.train(_CONFIG.value, _WORKDIR.value, evaluator=evals.build_evaluator)
    except Exception as e:  # known faults become one line; anything else keeps its traceback
        message = faults.one_line(e, _WORKDIR.value)
        if message is None:
            raise
        _fail(message, sys.argv)
    sys.exit(code)


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (missing flag, bad value, unknown config variant, misspelt --config.key)
    are one line and exit 1, instead of a traceback."""
    try:
        remaining = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is not None and not isinstance(config, ml_collections.ConfigDict):
            _ = config.stage  # a config file that failed to load: config_flags defers the error to the first read
        return remaining
    except OSError as e:
        _fail(f"--config={_config_arg(argv)}: cannot load the config file "
              f"({str(e).strip().splitlines()[-1].strip()})", argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file that raised: its own last line ("ValueError: ... unknown variant ...") says what to do.
        message = f"{lines[0]} {lines[-1]}" if "Traceback" in str(e) else " ".join(lines)
        _fail(f"{message} (python -m flexict_jax.train --help lists the flags)", argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a key the config lacks
        from flexict_jax import config_check
        config = flags.FLAGS["config"].parser.parse(_config_arg(argv))
        overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
        message = next(filter(None, (config_check.unknown_key_message(config, key) for key in overrides)), str(e))
        _fail(message, argv)


def _spell_init_from(argv: list[str]) -> list[str]:
    """`--config.init.from=DIR` is the documented spelling; ml_collections cannot parse a key named `from`."""
    return [a.replace("--config.init.from=", "--config.init.from_workdir=", 1) if a.startswith("--config.init.from=")
            else a for a in argv]


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


if __name__ == "__main__":
    sys.argv = _spell_init_from(sys.argv)  # config_flags reads override flags from sys.argv itself
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as e:  # absl exits 1 after printing the usage; asking for help is no failure
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
