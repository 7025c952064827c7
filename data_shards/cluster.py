"""The Ray cluster every command runs on: join the one in RAY_ADDRESS (or the one `ray job
submit` runs in), else start a local one with the node settings below."""

from __future__ import annotations

import os

import ray

# Ray ends an idle task worker process after 1 s once a node runs more worker processes than
# it has CPUs, and a Train run always does (controller, workers, Ray Data's split
# coordinator): every Ray Data task then waits for a new Python process. Measured here
# (benchmarks/train_throughput.py, 1 worker, cached taps), the Train worker waited on data
# 70% of the time: 38 clips/s, against 73 with idle workers kept for a minute. Read by the
# processes of a cluster started from here; `ray start` needs it too (deploy/README.md).
RAY_NODE_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (or the one `ray job submit` runs in), else start one."""
    if not ray.is_initialized():
        for key, value in RAY_NODE_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(log_to_driver=False)
