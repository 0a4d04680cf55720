"""Metrics: console line, `WORKDIR/metrics.jsonl`, and TensorBoard through CLU when TensorFlow is installed.

CLU 0.0.12 imports TensorFlow inside `clu.metric_writers` (jax_stack.md §A5, open PR google/CommonLoopUtils#358),
so TensorBoard output is optional: without TensorFlow only the console and JSONL writers run.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

from absl import logging
from etils import epath


def _tensorboard_writer(logdir: epath.Path):
    try:
        import tensorflow  # noqa: F401  (the optional `tensorboard` extra)
    except ImportError:
        return None
    from clu import metric_writers
    return metric_writers.create_default_writer(str(logdir), just_logging=False)


class MetricWriter:
    """Writes on process 0 only; every record has `step` plus scalar metrics."""

    def __init__(self, workdir: epath.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = _tensorboard_writer(epath.Path(workdir) / "tensorboard") if enabled else None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.write_scalars(step, {k: v for k, v in record.items() if isinstance(v, float)})
        logging.info("%s", format_line(record))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
