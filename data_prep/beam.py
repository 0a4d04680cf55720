"""Data preparation on Apache Beam: the per-volume functions of the local tools as a Beam pipeline.

    python -m data_prep.ingest ... --runner=DirectRunner                      # this machine, in-process
    python -m data_prep.ingest ... --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp \\
        --requirements_file=requirements.txt                                   # any runner; options pass through

A tool hands `map_volumes` the same module-level function and the same items that its local path gives its
process pool (no second copy of the per-volume work); the pipeline applies it to every item after a Reshuffle
(so a distributed runner spreads the volumes over its workers) and the results come back to the tool in item
order, which then writes its manifest / index exactly as on the local path. Beam is an optional extra
(`pip install 'flexict_jax[beam]'`, about 390 MB with pyarrow); without `--runner` nothing imports it.
"""
from __future__ import annotations

import argparse
import base64
import json
import pickle
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEAD_LETTER_NAME = "dead_letter.jsonl"


def add_runner_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", help="run the per-volume work as an Apache Beam pipeline on this runner "
                                         "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner...); further "
                                         "--options go to the runner")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The tool's arguments; with --runner, the ones it does not know are the runner's pipeline options, kept
    as `args.pipeline_args` (None without --runner: the local path)."""
    args, rest = parser.parse_known_args(argv)
    if rest and not args.runner:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (runner options need --runner)")
    args.pipeline_args = [f"--runner={args.runner}", *rest] if args.runner else None
    return args


def _apply(indexed: tuple[int, Any], fn: Callable) -> str:
    # Results are arbitrary picklable values (slice records are bytes), carried as base64 text lines.
    index, item = indexed
    return json.dumps([index, base64.b64encode(pickle.dumps(fn(item))).decode()])


def map_volumes(fn: Callable, items: Sequence, pipeline_args: Sequence[str], label: str) -> list:
    """[fn(item) for item in items] computed by a Beam pipeline built from `pipeline_args` (--runner=... and
    the runner's own options). The results travel back through files under the pipeline's --temp_location
    (gs:// for a distributed runner; a local temporary folder by default), removed afterwards."""
    try:
        import apache_beam as beam
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    except ImportError as e:
        raise ImportError("--runner needs Apache Beam: pip install 'flexict_jax[beam]'") from e
    if not items:
        return []
    options = PipelineOptions(list(pipeline_args))
    scratch = options.view_as(GoogleCloudOptions).temp_location or tempfile.gettempdir()
    out = FileSystems.join(scratch, f"flexict-{label}-{uuid.uuid4().hex[:12]}")
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (pipeline
                 | f"{label}: items" >> beam.Create(list(enumerate(items)))
                 | f"{label}: spread" >> beam.Reshuffle()  # a distributed runner spreads the volumes here
                 | f"{label}: per volume" >> beam.Map(_apply, fn)
                 | f"{label}: results" >> beam.io.WriteToText(FileSystems.join(out, "results")))
        files = [m.path for m in FileSystems.match([FileSystems.join(out, "results*")])[0].metadata_list]
        rows = []
        for path in sorted(files):
            with FileSystems.open(path) as f:
                rows += [json.loads(line) for line in f.read().decode().splitlines()]
    finally:
        if FileSystems.exists(out):
            FileSystems.delete([out])
    results = {index: pickle.loads(base64.b64decode(blob)) for index, blob in rows}
    if sorted(results) != list(range(len(items))):
        raise RuntimeError(f"the {label} pipeline returned {len(results)} results for {len(items)} items")
    return [results[i] for i in range(len(items))]


def write_dead_letter(directory: Path, failures: list[str]) -> Path:
    """`DIRECTORY/dead_letter.jsonl`: one {"reason": "<source>: <why>"} object per input the pipeline could not
    use (the same line the tool reports on stderr), rewritten by every run."""
    path = directory / DEAD_LETTER_NAME
    path.write_text("".join(json.dumps({"reason": f}) + "\n" for f in failures))
    return path
