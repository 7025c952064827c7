"""Where a run's epochs go: the `EpochLogger` interface, its MLflow implementation, the Ray
Train controller callback that feeds it, and MLflow's system-metrics monitor on each
training node. The metric names themselves are `orchestration.metrics`.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mlflow
import ray.train
from mlflow.tracking import MlflowClient

from orchestration.checkpoint import BAD_CLIPS_FILE
from orchestration.metrics import EPOCH, TRAIN_BAD_CLIPS, VAL_BAD_CLIPS

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


class EpochLogger(Protocol):
    """A run's epochs, each logged once: what a tracking backend implements."""

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """The numeric metrics of one epoch's report, at step = its epoch."""

    def logged_epochs(self) -> set[int]:
        """The epochs the backend has."""

    def log_bad_clips(self, epoch: int, csv_path: Path) -> None:
        """The epoch's failed clips (a `checkpoint.BAD_CLIPS_FILE`)."""


class MlflowEpochLogger:
    """`EpochLogger` on MLflow run `run_id`: one request per epoch (atomic), the failed
    clips as artifact `bad_clips/epoch_<NNN>.csv`."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        step = int(numeric.get(EPOCH, 0))
        now_ms = int(time.time() * 1000)
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(k, v, now_ms, step) for k, v in numeric.items()
        ])

    def logged_epochs(self) -> set[int]:
        history = MlflowClient(self.tracking_uri).get_metric_history(self.run_id, EPOCH)
        return {m.step for m in history}

    def log_bad_clips(self, epoch: int, csv_path: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / f"epoch_{epoch:03d}.csv"
            named.write_bytes(csv_path.read_bytes())
            MlflowClient(self.tracking_uri).log_artifact(self.run_id, str(named), "bad_clips")


# MLflow's defaults (7 retries, 120 s timeout) would hold the Train controller for minutes.
CONTROLLER_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class EpochLoggerCallback(ray.train.UserCallback):
    """Hands each reported epoch to an `EpochLogger` from the Train controller, so workers
    never wait on tracking.

    A tracking server that does not answer does not stop training: the epoch's metrics are
    in the checkpoint's history (`TrainState.history`), and `log_missing_epochs` sends
    whatever is missing when the run finishes or is re-run. MLflow's client would retry a
    dead server for minutes inside the controller, so the controller process retries less.
    """

    def __init__(self, logger: EpochLogger) -> None:
        self.logger = logger

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        os.environ.update(CONTROLLER_HTTP_RETRIES)
        epoch = int(metrics[0].get(EPOCH, 0))
        try:
            self.logger.log_epoch(metrics[0])
            failed = metrics[0].get(TRAIN_BAD_CLIPS, 0) + metrics[0].get(VAL_BAD_CLIPS, 0)
            if failed and checkpoint is not None:
                with checkpoint.as_directory() as ckpt_dir:
                    self.logger.log_bad_clips(epoch, Path(ckpt_dir) / BAD_CLIPS_FILE)
        except Exception as err:  # any client or connection error
            warnings.warn(
                f"the tracking store did not take epoch {epoch} ({type(err).__name__}: {err}); "
                "it is kept in the checkpoint and sent when the run finishes or is re-run",
                stacklevel=2,
            )


def log_missing_epochs(logger: EpochLogger, history: list[dict[str, float]]) -> int:
    """Send the epochs of `history` the logger does not have yet (after a tracking outage,
    or for a run re-run after it); returns how many. Each epoch is one atomic request, and
    one found logged is never sent again, so every epoch is logged exactly once."""
    logged = logger.logged_epochs()
    missing = [epoch for epoch in history if int(epoch[EPOCH]) not in logged]
    for epoch in missing:
        logger.log_epoch(epoch)
    return len(missing)


def start_system_metrics(
    run_id: str, uri: str, node: str, interval_s: float
) -> SystemMetricsMonitor:
    """MLflow's system metrics monitor (CPU, memory, disk, network, and GPU through NVML)
    for this node, logged to `run_id` as `system/<node>/...` from a background thread.

    MLflow starts one only inside `mlflow.start_run(log_system_metrics=True)` in the
    process that owns the run; the training nodes are other processes, so the monitor
    class that call uses is started directly.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, node_id=node,
        tracking_uri=uri,
    )
    monitor.start()
    return monitor
