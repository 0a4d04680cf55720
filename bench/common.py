"""What the input-pipeline benchmarks share: the BLAS thread default, the command line, timing a Grain
pipeline after its warm-up, and the JSON result line.

The scripts import it as `common`: Python puts a script's own folder first on sys.path, and spawned Grain
workers inherit that path. It imports nothing heavy, so `single_threaded_blas` can run before numpy loads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing flexict_jax loads numpy
    from flexict_jax.progress import Progress


def single_threaded_blas() -> None:
    """BLAS single-threaded unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise; call before numpy loads.

    The crop resizes are small matrix products, and multi-threaded BLAS inside every data process oversubscribes
    the cores (measured: 0.9 ms -> 1.7 ms per 256-px crop with 2 BLAS threads on 2 busy cores). Spawned Grain
    workers inherit the setting.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring `doc`, showing defaults in --help."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               at_least_one: Sequence[str]) -> argparse.Namespace:
    """Adds the shared --seed and --out, parses `argv` and requires the options named in `at_least_one`
    (argparse dest names) to be >= 1."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def mark_flags_parsed() -> None:
    """Grain workers read absl flags (google/grain#1360), which a plain script never parses."""
    from absl import flags  # here, not at the top: absl is not needed before numpy's BLAS is configured
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def time_batches(batches: Iterator, batch_size: int, warmup: int, timed: int, progress: Progress,
                 note: str) -> float:
    """samples/s over `timed` batches of `batches` after `warmup` untimed ones (worker start-up, caches);
    closes the iterator, which stops its worker processes."""
    try:
        for _ in range(warmup):
            next(batches)
            progress.advance(batch_size, f"{note} warm-up")
        start = time.perf_counter()
        for _ in range(timed):
            next(batches)
            progress.advance(batch_size, note)
        return timed * batch_size / (time.perf_counter() - start)
    finally:
        batches.close()


def write_result(result: dict[str, Any], out: str | None) -> None:
    """Prints `result`, with the host facts appended, as one JSON line; also writes it to `out` when given."""
    line = json.dumps({**result, "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"],
                       "cpu_count": os.cpu_count(), "python": platform.python_version()})
    print(line)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
