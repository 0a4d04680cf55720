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

import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEAD_LETTER_NAME = "dead_letter.jsonl"


def _apply(indexed: tuple[int, Any], fn: Callable) -> str:
    index, item = indexed
    return json.dumps([index, fn(item)])


def map_volumes(fn: Callable, items: Sequence, pipeline_args: Sequence[str], scratch: Path, label: str) -> list:
    """[fn(item) for item in items] computed by a Beam pipeline built from `pipeline_args` (--runner=... and
    the runner's own options). Results must be JSON-serialisable; they travel through text files under
    `scratch` (removed afterwards), so a runner's workers need not share memory with this process."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as e:
        raise ImportError("--runner needs Apache Beam: pip install 'flexict_jax[beam]'") from e
    if not items:
        return []
    out = scratch / f".beam-{label}-{uuid.uuid4().hex[:8]}"
    try:
        with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as pipeline:
            _ = (pipeline
                 | f"{label}: items" >> beam.Create(list(enumerate(items)))
                 | f"{label}: spread" >> beam.Reshuffle()
                 | f"{label}: per volume" >> beam.Map(_apply, fn)
                 | f"{label}: results" >> beam.io.WriteToText(str(out / "results"), file_name_suffix=".jsonl"))
        rows = [json.loads(line) for path in sorted(out.glob("results*")) for line in path.read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    results = dict(rows)
    if sorted(results) != list(range(len(items))):
        raise RuntimeError(f"the {label} pipeline returned {len(results)} results for {len(items)} items")
    return [results[i] for i in range(len(items))]


def write_dead_letter(directory: Path, failures: list[str]) -> Path:
    """`DIRECTORY/dead_letter.jsonl`: one {"reason": "<source>: <why>"} object per input the pipeline could not
    use (the same line the tool reports on stderr), rewritten by every run."""
    path = directory / DEAD_LETTER_NAME
    path.write_text("".join(json.dumps({"reason": f}) + "\n" for f in failures))
    return path
