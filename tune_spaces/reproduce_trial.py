"""One run of `jlstm reproduce`: the Tune trainable that trains and finishes one paper run.

Tune is only the scheduler here (a grid over the run names, as many side by side as the
resource planner allows); each trial is a whole `jlstm train` run: a child MLflow run of
the reproduce parent, its TorchTrainer fit with every epoch logged, then `finish_run`
(evaluation artifacts, plots, the model logged and registered, the champion rule). A run
whose Train run already holds every epoch (interrupted before MLflow was told) is only
finished, not trained again.
"""

from __future__ import annotations

from typing import Any

import ray.train
from mlflow.tracking import MlflowClient

from orchestration import tracking
from orchestration.config import validate_config
from orchestration.driver import check_bad_clips, finish_run, finishing_data
from orchestration.resources import ResourcePlan
from tune_spaces.trial import finished_checkpoint, fit_run

RUN_KEY = "run"  # the Tune config key: the run's name, a key of `runs`
PARENT_TAG = "mlflow.parentRunId"


def run_reproduce_trial(
    config: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    plan: ResourcePlan,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
) -> None:
    """Tune trainable: train (or resume) and finish the run `config[RUN_KEY]`.

    `runs` maps each run name to its validated config as a mapping (local paths absolute:
    Tune runs trials in their own working directories); `plan`, the resource plan made
    once on the driver, shapes every run's workers.
    """
    import mlflow
    from ray.tune.integration.ray_train import TuneReportCallback

    name = config[RUN_KEY]
    # The tracking URI travels explicitly: trial actors do not see the driver's environment.
    mlflow.set_tracking_uri(tracking_uri)
    cfg = validate_config(runs[name], source=f"run {name}")
    with tracking.tracked_run(cfg, experiment_id, parent_run_id) as run:
        run_id = run.run_id
        # A run found from an earlier, interrupted call may have been created without a parent.
        MlflowClient().set_tag(run_id, PARENT_TAG, parent_run_id)
        done = finished_checkpoint(cfg)
        if done is not None:
            checkpoint = ray.train.Checkpoint(str(done))
            data, digest = finishing_data(cfg)
        else:
            result, data, digest = fit_run(
                cfg, plan, run_id, tracking_uri, [TuneReportCallback()]
            )
            if result.checkpoint is None:
                raise RuntimeError(f"run {name!r} ended without a checkpoint")
            check_bad_clips(cfg, run_id, result)
            checkpoint = result.checkpoint
        finish_run(cfg, run_id, checkpoint, data, digest)
