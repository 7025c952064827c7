"""A per-report clock for the training benchmarks: when each epoch reached the controller."""

from __future__ import annotations

import json
import time
from typing import Any

import ray
import ray.train


class EpochClock(ray.train.UserCallback):
    """Appends each report's wall-clock time and rank 0's numeric metrics to a JSONL file.

    It runs in the Train controller, on this machine, so its `time.time()` is comparable
    with the driver's.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        row = {k: float(v) for k, v in metrics[0].items() if isinstance(v, int | float)}
        row["t"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
