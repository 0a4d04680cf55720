"""Train a FlexiCT stage.

    python -m flexict_jax.train --config=configs/stage1.py:demo --workdir=runs/stage1 \
        --config.data.dir=data/slices [--config.total_steps=N] [--config.KEY=VALUE ...]

Metrics go to WORKDIR/metrics.jsonl (and the console), checkpoints to WORKDIR/checkpoints/<step>. Running the
same command again resumes from the latest checkpoint. SIGTERM saves the current step and exits 0.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys

# Grain workers are spawned processes that inherit this; one BLAS thread per worker avoids oversubscribing the
# host cores (measured 2x slower crops with threaded OpenBLAS, bench/bench_pipeline2d.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/stage1.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(py_logging.Filter):
    """Orbax and Grain log several INFO lines per checkpoint; keep their warnings, drop their chatter."""

    _QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(q in record.pathname for q in self._QUIET)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from flexict_jax import checkpointing, trainer  # after flag parsing, so --help stays fast
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    try:
        code = trainer.train(_CONFIG.value, _WORKDIR.value)
    except (trainer.ConfigError, FileNotFoundError, ValueError, checkpointing.IncompatibleCheckpointError,
            checkpointing.NoRestorableCheckpointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def _spell_init_from(argv: list[str]) -> list[str]:
    """`--config.init.from=DIR` is the documented spelling; ml_collections cannot parse a key named `from`."""
    return [a.replace("--config.init.from=", "--config.init.from_workdir=", 1) if a.startswith("--config.init.from=")
            else a for a in argv]


if __name__ == "__main__":
    sys.argv = _spell_init_from(sys.argv)  # config_flags reads override flags from sys.argv itself
    app.run(main)
