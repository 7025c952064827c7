"""What the training benchmarks share: the machine facts and a per-report clock."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import ray
import ray.train
import torch


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


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
