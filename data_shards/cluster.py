"""The Ray cluster every command runs on: join the one in RAY_ADDRESS (or the one `ray job
submit` runs in, or one `ray start` runs on this machine), else start a local one with the
node settings below. `RAY_ADDRESS=local` always starts a new local one (the tests do)."""

from __future__ import annotations

import logging
import os
import sys

import ray
import ray.data  # configures the "ray.data" loggers that progress_to_log_files adjusts

from data_shards.errors import ClusterUnavailable

# Ray ends an idle task worker process after 1 s once a node runs more worker processes than
# it has CPUs, and a Train run always does (controller, workers, Ray Data's split
# coordinator): every Ray Data task then waits for a new Python process. Measured here
# (benchmarks/train_throughput.py, 1 worker, cached taps), the Train worker waited on data
# 70% of the time: 38 clips/s, against 73 with idle workers kept for a minute. Read by the
# processes of a cluster started from here; `ray start` needs it too (deploy/README.md).
RAY_NODE_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000"}

# With stdout not a terminal (a CI log, nohup, `ray job submit`), Ray Data 2.60 prints a
# multi-line resource report of every running dataset every 10 s through this logger: most
# of the demo's log. Pinned with Ray (pyproject); a rename only brings the report back.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (or the one `ray job submit` runs in, or a running
    `ray start` cluster of this machine, saying so in one line), else start one."""
    if ray.is_initialized():
        return
    for key, value in RAY_NODE_ENV.items():
        os.environ.setdefault(key, value)
    progress_to_log_files()
    address = os.environ.get("RAY_ADDRESS") or None
    if address != "local":
        try:
            context = ray.init(address=address or "auto", log_to_driver=False)
        except ConnectionError:
            if address:  # the cluster the user named is not there: Ray's error says so
                raise
        except RuntimeError as err:
            if "Version mismatch" not in str(err):
                raise
            where = f"the Ray cluster at {address}" if address else (
                "the running Ray cluster of this machine"
            )
            raise ClusterUnavailable(
                f"cannot join {where}: it runs another Ray or Python version than this "
                f"process (Ray {ray.__version__}, Python {sys.version.split()[0]}); stop it "
                "(`ray stop` with its own Python) or set RAY_ADDRESS=local to start a new "
                "local cluster"
            ) from None
        else:
            print(
                f"jlstm: joined the running Ray cluster at {context.address_info['gcs_address']}"
                " (RAY_ADDRESS=local starts a new local one instead)"
            )
            return
    ray.init(address="local", log_to_driver=False)


def progress_to_log_files() -> None:
    """Send Ray Data's periodic progress report to Ray Data's log file only
    (`<session>/logs/ray-data/`) when stdout is not a terminal; jlstm's own lines stay."""
    if sys.stdout.isatty():
        return
    progress = logging.getLogger(RAY_DATA_PROGRESS_LOGGER)
    progress.handlers = [
        handler for handler in logging.getLogger("ray.data").handlers
        if not isinstance(handler, logging.StreamHandler)
    ]
    progress.propagate = False
