"""One sweep trial: the Tune trainable that fits a Ray Train `TorchTrainer`.

The Ray Train V2 pattern: the Tune trainable is a small driver function (`run_trial`)
that builds the trial's run config, opens its nested MLflow run and fits a TorchTrainer;
`TuneReportCallback` forwards every epoch's report to Tune, where ASHA cuts the trials
that fall behind. Each trial's Train run has its own name (`<sweep>-<trial id>`), so a
retried or resumed trial continues from its own last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.train
from mlflow.tracking import MlflowClient
from ray import tune

from orchestration import tracking
from orchestration.checkpoint import CHECKPOINT_FILE, TrainState
from orchestration.config import JlstmConfig, is_uri, validate_config
from orchestration.driver import PreparedData, build_trainer, prepare_data
from orchestration.epoch_logger import EpochLoggerCallback, MlflowEpochLogger, log_missing_epochs
from orchestration.resources import ResourcePlan
from orchestration.session import run_storage
from tune_spaces.release import RegisterTrainRun
from tune_spaces.spaces import SweepConfig, trial_raw

TRIAL_TAG = "jlstm.tune_trial_id"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback adds to each report


def run_trial(
    config: dict[str, Any],
    sweep: SweepConfig,
    base_raw: dict[str, Any],
    fixed: dict[str, Any],
    plan: ResourcePlan,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    registry_name: str,
) -> None:
    """Tune trainable: one trial = one nested MLflow run + one TorchTrainer fit.

    `plan` is the sweep's resource plan, made once on the driver (a sweep cannot vary
    `cluster.*`, so every trial's workers have the same shape).
    """
    import mlflow
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    # The tracking URI travels explicitly: trial actors do not see the driver's environment.
    mlflow.set_tracking_uri(tracking_uri)
    cfg = validate_config(
        trial_raw(base_raw, {**sweep.decode(config), **fixed,
                             "run_name": f"{sweep.name}-{trial_id}"}),
        source=f"trial {trial_id}",
    )
    # A trial ASHA stops is killed inside this block, so its run is not ended here:
    # `finish_sweep` ends the runs still RUNNING once the Tuner returns.
    with tracking.tracked_run(cfg, experiment_id, parent_run_id) as run:
        MlflowClient().set_tag(run.run_id, TRIAL_TAG, trial_id)
        finished = finished_checkpoint(cfg)
        if finished is not None:
            # Interrupted after this trial's Train run ended but before Tune (and maybe
            # MLflow) took its last report: a new fit would train nothing and report nothing.
            history = TrainState.load(finished).history
            log_missing_epochs(MlflowEpochLogger(tracking_uri, run.run_id), history)
            tune.report({**history[-1], CHECKPOINT_PATH_KEY: str(finished)})
            return
        callbacks = [TuneReportCallback(), RegisterTrainRun(registry_name, trial_id)]
        fit_run(cfg, plan, run.run_id, tracking_uri, callbacks)


def fit_run(
    cfg: JlstmConfig,
    plan: ResourcePlan,
    run_id: str,
    tracking_uri: str,
    callbacks: list[ray.train.UserCallback],
) -> tuple[ray.train.Result, PreparedData, str]:
    """Fit `cfg`'s TorchTrainer inside a Tune trial, its workers shaped by the driver's
    `plan`, each epoch logged to MLflow run `run_id`.

    Shared by sweep trials and `jlstm reproduce` runs. Returns the Train result, the
    prepared data and the dataset digest, which `finish_run` takes.
    """
    data = prepare_data(cfg)
    digest = tracking.log_run_inputs(cfg, run_id, data.model_cfg, data.run)
    callbacks = [EpochLoggerCallback(MlflowEpochLogger(tracking_uri, run_id)), *callbacks]
    result = build_trainer(cfg, data, plan, callbacks, run_id).fit()
    return result, data, digest


def finished_checkpoint(cfg: JlstmConfig) -> Path | None:
    """The Train run's last checkpoint when it holds every epoch (local storage only)."""
    storage = run_storage(cfg)
    if is_uri(storage):
        return None
    run_dir = Path(storage) / cfg.resolved_run_name()
    # Only checkpoint directories holding a state file: an upload cut short may have none.
    checkpoints = sorted(state.parent for state in run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if checkpoints and TrainState.load(checkpoints[-1]).epoch >= cfg.train.epochs:
        return checkpoints[-1]
    return None
