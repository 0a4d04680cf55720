"""Metrics: console line, `WORKDIR/metrics.jsonl`, TensorBoard events in `WORKDIR/tensorboard/`, optionally W&B.

Every backend is a CLU `MetricWriter` (one interface for all of them), but none needs TensorFlow: CLU 0.0.12
imports TensorFlow inside `clu.metric_writers` (docs/jax_notes.md §A5, open PR google/CommonLoopUtils#358), so when
TensorFlow is absent its TF summary writer is replaced by a stub before CLU is imported, and the TensorBoard
events are written with the `tensorboard` package's own event-file writer. That writer was chosen over
tensorboardX (measured here: tensorboardX imports torch when it is installed, +2.5 s at start; the tensorboard
writer imports in 0.12 s with neither TF nor torch, and the same package is the viewer and the event reader).

A resumed run writes each step once: rows of `metrics.jsonl` past the restored step are dropped, and the new
event file starts with a SessionLog START at the first new step, which tells TensorBoard to discard the older
events from that step on (its documented purge of orphaned data).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
import types
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _clu_metric_writers() -> types.ModuleType:
    """`clu.metric_writers`, importable without TensorFlow (the stub only stands in when TF is not installed)."""
    name = "clu.metric_writers.summary_writer"
    if importlib.util.find_spec("tensorflow") is None and name not in sys.modules:
        stub = types.ModuleType(name)
        stub.SummaryWriter = None  # CLU's TF writer; ours is TensorBoardWriter below
        sys.modules[name] = stub
    from clu import metric_writers
    return metric_writers


interface = _clu_metric_writers().interface


class _ScalarsAndText(interface.MetricWriter):
    """The CLU interface for a backend that records scalars and text only (what the trainer writes)."""

    def write_summaries(self, step, values, metadata=None):
        raise NotImplementedError(f"{type(self).__name__} writes scalars and text only")

    def write_images(self, step, images):
        self.write_summaries(step, images)

    def write_videos(self, step, videos):
        self.write_summaries(step, videos)

    def write_histograms(self, step, arrays, num_buckets=None):
        self.write_summaries(step, arrays)

    def write_audios(self, step, audios, *, sample_rate):
        self.write_summaries(step, audios)


class JsonlWriter(_ScalarsAndText):
    """`metrics.jsonl`: one JSON object per write with `step` first; non-finite floats become strings."""

    def __init__(self, path: epath.Path, start_step: int):
        self.path = path
        _drop_rows_after(path, start_step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self.write_scalars(step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass  # the run's config is WORKDIR/config.json

    def flush(self) -> None:
        pass  # every write appends and closes the file

    def close(self) -> None:
        pass


def _drop_rows_after(path: epath.Path, step: int) -> None:
    """Removes the rows a crashed or stopped run wrote past its last checkpoint, so that the resumed run's rows
    are the only ones for those steps. The file is replaced atomically (a kill mid-way keeps the old one)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (row_step := _row_step(line)) is not None and row_step <= step]
    if len(kept) == len(lines):
        return
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    logging.info("%s: dropped %d rows past the restored step %d", path, len(lines) - len(kept), step)


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line cut short by a kill (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(workdir: epath.PathLike) -> list[dict[str, Any]]:
    """The rows of `WORKDIR/metrics.jsonl` in step order, one per step (rows of one step are merged, a later
    value of a key superseding an earlier one)."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        if _row_step(line) is not None:
            record = json.loads(line)
            rows.setdefault(record["step"], {}).update(record)
    return [rows[step] for step in sorted(rows)]


class TensorBoardWriter(_ScalarsAndText):
    """TensorBoard event files written with the `tensorboard` package alone (no TensorFlow, no torch)."""

    def __init__(self, logdir: epath.Path, start_step: int):
        logdir.mkdir(parents=True, exist_ok=True)
        _wait_until_new_files_sort_last(logdir)
        self._writer = EventFileWriter(str(logdir))
        self._first_step = start_step + 1
        # TensorBoard drops events at or after a START's step that it read before it (purge of orphaned data):
        # the rows of the previous attempt past the restored checkpoint disappear from the plots.
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=self._first_step,
                                               session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _add(self, step: int, values: list) -> None:
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            self._add(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        # the text plugin's own summary proto
        self._add(step, [value for key, text in texts.items() for value in text_summary.text_pb(key, text).value])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        # at the first new step, so that a later resume before it purges this copy as well
        config = json.dumps(dict(hparams), indent=2, default=str)
        self.write_texts(self._first_step, {"config": f"```\n{config}\n```"})

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _wait_until_new_files_sort_last(logdir: epath.Path) -> None:
    """TensorBoard reads a run's event files in name order, and the purge above only works if the resumed
    attempt's file comes after the old ones. The writer names files `events.out.tfevents.<unix second>.<host>.
    <pid>.<counter>`: within one second the pid and counter compare as text ("10" < "9"), so a writer opened in
    the same second as an existing file waits for the next second (never longer: a file stamped later by a host
    whose clock runs ahead cannot be outwaited)."""
    prefix = "events.out.tfevents."
    stamps = [f.name[len(prefix):].split(".", 1)[0] for f in logdir.iterdir() if f.name.startswith(prefix)]
    latest = max((int(stamp) for stamp in stamps if stamp.isdigit()), default=-1)
    give_up = time.time() + 1.1
    while int(time.time()) <= latest and time.time() < give_up:
        time.sleep(0.05)


class WandbWriter(_ScalarsAndText):
    """Weights & Biases (optional: `pip install wandb`). `mode="offline"` writes WORKDIR/wandb/ with no network;
    `wandb sync` uploads it later. Each start of a run is one W&B run in the group named by the workdir, so a W&B
    run never receives a step twice (W&B ignores steps lower than its last one)."""

    def __init__(self, workdir: epath.Path, wandb_config: Mapping[str, Any], start_step: int):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("config.wandb.project is set but wandb is not installed: pip install wandb") from e
        self._wandb = wandb
        self._run = wandb.init(project=wandb_config["project"], entity=wandb_config.get("entity") or None,
                               mode=wandb_config.get("mode", "online"), dir=str(workdir),
                               group=workdir.name, name=f"{workdir.name}@{start_step}")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._run.log(dict(scalars), step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._run.log(dict(texts), step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update(dict(hparams), allow_val_change=True)

    def flush(self) -> None:
        pass  # the W&B service writes asynchronously; finish() on close waits for it

    def close(self) -> None:
        self._run.finish()


class MetricWriter:
    """Writes on process 0 only; every record has `step` plus scalar metrics. `start_step` is the step the run
    starts (or resumes) from: anything written earlier past it is superseded (see the module docstring)."""

    def __init__(self, workdir: epath.PathLike, *, start_step: int = 0, config: Any = None, enabled: bool = True):
        self.enabled = enabled
        workdir = epath.Path(workdir)
        self.path = workdir / "metrics.jsonl"
        if not enabled:
            return
        writers = [JsonlWriter(self.path, start_step), TensorBoardWriter(workdir / "tensorboard", start_step)]
        hparams = json.loads(config.to_json_best_effort()) if config is not None else {}
        wandb_config = (config.get("wandb") if config is not None else None) or {}
        if wandb_config and wandb_config.get("project"):
            writers.append(WandbWriter(workdir, wandb_config, start_step))
        self._writers = _clu_metric_writers().MultiWriter(writers)
        if hparams:
            self._writers.write_hparams(hparams)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._writers.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        logging.info("%s", format_line(record))

    def close(self) -> None:
        if self.enabled:
            self._writers.close()


def _scalar(value: Any) -> Any:
    if isinstance(value, (str, bool, int)):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


def format_line(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class Throughput:
    """Samples/s and ETA from wall time between logging calls."""

    def __init__(self, start_step: int, total_steps: int):
        self.total_steps = total_steps
        self._last_step, self._last_time = start_step, time.monotonic()

    def update(self, step: int, samples_per_step: int) -> dict[str, float]:
        now = time.monotonic()
        steps = step - self._last_step
        seconds = max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        per_step = seconds / max(steps, 1)
        return {"samples_per_s": samples_per_step / per_step, "s_per_step": per_step,
                "eta_min": (self.total_steps - step) * per_step / 60}
