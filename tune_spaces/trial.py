"""One sweep trial: the Tune trainable that fits a Ray Train `TorchTrainer`.

The Ray Train V2 pattern: the Tune trainable is a small driver function (`run_trial`)
that builds the trial's run config and runs it as an `orchestration.run.Run` (its nested
MLflow run, its TorchTrainer fit) that stops after the fit;
`TuneReportCallback` forwards every epoch's report to Tune, where ASHA cuts the trials
that fall behind. Each trial's Train run has its own name (`<sweep>-<trial id>`), so a
retried or resumed trial continues from its own last checkpoint.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from orchestration.config import validate_config
from orchestration.resources import ResourcePlan
from orchestration.run import Run, Trained
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
    """Tune trainable: one trial = one nested MLflow run + one TorchTrainer fit (a `Run`
    that stops after the fit; the sweep finishes its best trial).

    `plan` is the sweep's resource plan, made once on the driver (a sweep cannot vary
    `cluster.*`, so every trial's workers have the same shape).
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = validate_config(
        trial_raw(base_raw, {**sweep.decode(config), **fixed,
                             "run_name": f"{sweep.name}-{trial_id}"}),
        source=f"trial {trial_id}",
    )
    # A trial ASHA stops is killed inside the run, so its MLflow run is not ended there:
    # `finish_sweep` ends the runs still RUNNING once the Tuner returns.
    trained = Run(
        cfg, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
        experiment_id=experiment_id, preflighted=True, plan=plan, lock_held=True,
        tags={TRIAL_TAG: trial_id},
        callbacks=[TuneReportCallback(), RegisterTrainRun(registry_name, trial_id)],
        stop_after_fit=True,
    ).execute()
    assert isinstance(trained, Trained)
    if not trained.fitted:
        # Interrupted after this trial's Train run ended but before Tune took its last
        # report: no fit ran, so the report is made here.
        tune.report({**trained.metrics, CHECKPOINT_PATH_KEY: trained.checkpoint.path})
