"""What a sweep leaves behind: the trials table, each trial run's status, the best model.

Once the Tuner returns, each trial's nested MLflow run gets its status (and is closed if
ASHA stopped it), the best trial's last checkpoint goes through `Run.finish` (evaluation
artifacts, plots, registered model, champion rule) and the parent run gets the best
trial, the trials table and the metric plot.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray.train
import yaml
from ray import tune

from orchestration import tracking
from orchestration.config import JlstmConfig, validate_config
from orchestration.metrics import ATTENTION_ON_TARGET, VIDEO_TOP1_VOTE, loss_metric
from orchestration.run import Run, SplitResult
from tune_spaces.report import (
    FUSION_KEY,
    LAMBDA_KEY,
    TAPS_KEY,
    ZETA_KEY,
    plot_epoch_curves,
    plot_metric_vs_lambda_zeta,
)
from tune_spaces.spaces import SweepConfig, trial_raw
from tune_spaces.trial import CHECKPOINT_PATH_KEY, TRIAL_TAG

STATUS_TAG = "jlstm.tune_status"
# Drawn epoch by epoch for every trial on the parent run (the paper's Figure 5 is the first).
CURVE_METRICS = (loss_metric("lstm"), loss_metric("attention_reg"), VIDEO_TOP1_VOTE,
                 ATTENTION_ON_TARGET)


@dataclass
class SweepResult:
    """What a finished (or interrupted) sweep leaves behind."""

    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    trials: pd.DataFrame
    interrupted: bool
    metric: str
    best_trial_id: str | None = None
    best_metric: float | None = None
    best_values: dict[str, Any] | None = None
    best: SplitResult | None = None
    trial_epochs_run: int = 0
    trial_epochs_full: int = 0


def finish_sweep(
    sweep: SweepConfig,
    base: JlstmConfig,
    base_raw: dict[str, Any],
    grid: Any,
    uri: str,
    parent_id: str,
    path: str,
) -> SweepResult:
    """The sweep's result from the Tuner's `grid`; unless interrupted, every trial run's
    status, the best trial's model registered and the parent run's summary."""
    experiment_id = tracking.get_run(parent_id).info.experiment_id
    runs = _trial_runs(experiment_id, parent_id)
    table = _trials_table(sweep, base, base_raw, grid, runs)
    result = SweepResult(
        path, uri, parent_id, table, _interrupted(path, sweep.num_trials), sweep.metric
    )
    result.trial_epochs_run = int(table["epoch"].sum()) if len(table) else 0
    result.trial_epochs_full = len(table) * base.train.epochs
    if result.interrupted:
        return result
    for row in table.itertuples():
        if row.mlflow_run_id:
            tracking.set_tags(row.mlflow_run_id, {STATUS_TAG: _status(row)})
            # The grid says how each trial ended. A trial ASHA stopped was torn down inside
            # its `tracked_run`: left RUNNING, or ended FAILED when Train's fit raised as
            # Tune stopped it; it ran its epochs and ends FINISHED.
            wanted = "FAILED" if row.status == "error" else "FINISHED"
            if tracking.get_run(row.mlflow_run_id).info.status != wanted:
                tracking.end_run(row.mlflow_run_id, wanted)
    best = grid.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="last",
                                filter_nan_and_inf=True)
    if best.error is not None or CHECKPOINT_PATH_KEY not in best.metrics:
        raise RuntimeError(f"sweep {sweep.name}: no trial finished an epoch; see {path}")
    best_id = best.metrics.get("trial_id") or Path(best.path).name
    result.best_trial_id = best_id
    result.best_metric = float(best.metrics[sweep.metric])
    result.best_values = sweep.decode(best.config)
    result.best = _register_best(base_raw, result, best, runs[best_id], sweep)
    _log_parent(sweep, result, parent_id)
    return result


def _lookup(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _trials_table(
    sweep: SweepConfig, base: JlstmConfig, base_raw: dict[str, Any], grid: Any, runs: dict
) -> pd.DataFrame:
    """One row per trial: its swept values, lambda/zeta/fusion/branches, last metrics."""
    rows = []
    for result in grid:
        # A trial that never reported (pending when the sweep was interrupted) has no
        # metrics and no config yet.
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        values = sweep.decode(result.config or {})
        effective = trial_raw(base_raw, values)
        model_cfg = validate_config(effective).resolve_model(2)
        epoch = int(metrics.get("epoch", 0) or 0)
        row = {
            "trial_id": trial_id,
            "status": "error" if result.error else "ok",
            "epoch": epoch,
            "stopped_early": result.error is None and 0 < epoch < base.train.epochs,
            LAMBDA_KEY: model_cfg.attention_reg_weight,
            ZETA_KEY: _lookup(effective, ZETA_KEY) or base.train.weight_decay,
            FUSION_KEY: model_cfg.fusion,
            TAPS_KEY: "+".join(model_cfg.inputs),
            "branches": len(model_cfg.inputs),
            **{f"config/{k}": (str(v) if isinstance(v, list) else v) for k, v in values.items()},
            **{k: v for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)},
            "mlflow_run_id": runs.get(trial_id),
            "trial_path": result.path,
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _trial_runs(experiment_id: str, parent_id: str) -> dict[str, str]:
    """trial id -> its nested MLflow run id."""
    runs = tracking.search_runs(experiment_id, parent_run_id=parent_id)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def _interrupted(path: str, num_trials: int) -> bool:
    """Whether Ctrl+C ended the sweep before every trial finished.

    Read from the experiment state Tune saved on disk (what `--resume` continues): after
    an interruption Tune stops the running trials and marks them terminated in memory,
    so the ResultGrid alone cannot tell an interrupted trial from one ASHA stopped.
    """
    trials = tune.ExperimentAnalysis(path).trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < num_trials


def _status(row: Any) -> str:
    if row.status == "error":
        return "error"
    return "stopped_early" if row.stopped_early else "completed"


def _register_best(
    base_raw: dict[str, Any], result: SweepResult, best: Any, run_id: str, sweep: SweepConfig
) -> SplitResult:
    """`Run.finish` on the best trial's last checkpoint: artifacts, model, champion rule."""
    cfg = validate_config(trial_raw(base_raw, result.best_values or {}))
    checkpoint = ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY])
    return Run(cfg, preflighted=True).finish(run_id, checkpoint)


def _log_parent(sweep: SweepConfig, result: SweepResult, parent_id: str) -> None:
    """Best trial, ASHA's saving, the trials table and the metric plot on the parent run."""
    tags = {"jlstm.best_trial_id": result.best_trial_id or ""}
    if result.best and result.best.model_version:
        tags["jlstm.best_model_version"] = result.best.model_version
    tracking.set_tags(parent_id, tags)
    tracking.log_metrics(parent_id, {
        f"best_{sweep.metric}": (
            float("nan") if result.best_metric is None else result.best_metric
        ),
        "trials": len(result.trials),
        "trial_epochs_run": result.trial_epochs_run,
        "trial_epochs_full": result.trial_epochs_full,
    })
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        result.trials.to_csv(table, index=False)
        best = Path(tmp) / "best_config.yaml"
        best.write_text(yaml.safe_dump(result.best_values, sort_keys=False))
        plot = plot_metric_vs_lambda_zeta(
            result.trials[result.trials["status"] == "ok"], sweep.metric,
            Path(tmp) / "metric_vs_lambda_zeta.png",
        )
        curves = plot_epoch_curves(
            _epoch_curves(sweep, result.trials), list(CURVE_METRICS),
            Path(tmp) / "epoch_curves.png",
        )
        tracking.log_artifacts(parent_id, [table, best, plot, curves])


def _epoch_curves(
    sweep: SweepConfig, trials: pd.DataFrame
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each trial's CURVE_METRICS per epoch, read back from its MLflow run, labelled by
    its swept values."""
    curves = {}
    for row in trials.itertuples():
        if not row.mlflow_run_id:
            continue
        values = trials.loc[row.Index, [f"config/{k}" for k in sweep.space]]
        swept = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(sweep.space, values,
                                                                       strict=True))
        label = f"{row.trial_id}: {swept}"  # repetitions of one grid point stay apart
        curves[label] = {
            metric: tracking.metric_history(row.mlflow_run_id, metric)
            for metric in CURVE_METRICS
        }
    return curves
