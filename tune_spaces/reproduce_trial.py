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

from orchestration import tracking
from orchestration.config import validate_config
from orchestration.resources import ResourcePlan
from orchestration.run import Run

RUN_KEY = "run"  # the Tune config key: the run's name, a key of `runs`


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
    once on the driver, shapes every run's workers; the driver holds every run's lock.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    name = config[RUN_KEY]
    Run(
        validate_config(runs[name], source=f"run {name}"), parent_run_id=parent_run_id,
        tracking_uri=tracking_uri, experiment_id=experiment_id, preflighted=True, plan=plan,
        lock_held=True,
        # A run found from an earlier, interrupted call may have been created without a parent.
        tags={tracking.PARENT_TAG: parent_run_id},
        callbacks=[TuneReportCallback()],
    ).execute()
