"""The sweep driver: a Ray Tune experiment whose trials each fit a Ray Train `TorchTrainer`.

The Ray Train V2 pattern: the Tune trainable is a small driver function (`_run_trial`)
that builds the trial's run config, opens its nested MLflow run and fits a TorchTrainer;
`TuneReportCallback` forwards every epoch's report to Tune, where ASHA cuts the trials
that fall behind. Each trial's Train run has its own name (`<sweep>-<trial id>`), so a
retried or resumed trial continues from its own last checkpoint.

MLflow: one parent run per sweep (tag `jlstm.tune_experiment` = the Tune experiment path,
found again on `--resume`), one nested run per trial with params and per-epoch metrics.
At the end the best trial's last checkpoint goes through `finish_run` (evaluation
artifacts, plots, registered model, champion rule) and the parent gets the trials table
and the metric plot.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import ray.train
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from data_shards.features import StaleCacheError, build_feature_cache, check_cache
from data_shards.index import ensure_index
from data_shards.splits import class_names
from model.backbone import TAP_LAST_INDEX
from orchestration import tracking
from orchestration.checkpoint import CHECKPOINT_FILE, TrainState
from orchestration.config import ConfigError, JlstmConfig, validate_config
from orchestration.resources import ResourcePlan, feature_pool, live_nodes
from orchestration.session import init_ray, plan_run
from orchestration.trainer import PreparedData, SplitResult, build_trainer, finish_run, prepare_data
from tune_spaces.release import RegisterTrainRun, ReleaseEndedTrainRuns, registry
from tune_spaces.report import (
    FUSION_KEY,
    LAMBDA_KEY,
    TAPS_KEY,
    ZETA_KEY,
    plot_metric_vs_lambda_zeta,
)
from tune_spaces.spaces import SweepConfig, trial_raw

log = logging.getLogger(__name__)
SWEEP_TAG = "jlstm.tune_experiment"
TRIAL_TAG = "jlstm.tune_trial_id"
STATUS_TAG = "jlstm.tune_status"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback adds to each report
# Keys of the feature cache's key: a space varying one of them cannot share one cache.
CACHE_KEYS = (
    "model.frame_size", "model.clip_len", "model.map_size", "model.backbone_weights",
    "data.train_stride", "data.eval_stride", "data.frame_interval", "data.feature_cache",
)


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


def _union_taps(sweep: SweepConfig, base: JlstmConfig) -> list[str]:
    taps = set(base.resolve_model(2).taps)
    if TAPS_KEY in sweep.space:
        for option in sweep.space[TAPS_KEY].corners():
            taps |= set(option)
    return sorted(taps, key=TAP_LAST_INDEX.__getitem__)  # VGG16's layer order


def ensure_cache(sweep: SweepConfig, base: JlstmConfig) -> None:
    """Index the videos and make sure one feature cache serves every trial.

    Done once on the driver so concurrent trials neither index nor build a cache at the
    same time. The cache holds the union of the taps any trial can pick.
    """
    manifest = ensure_index(base.data)
    if not base.data.use_feature_cache:
        return
    varied = [k for k in sweep.space if k in CACHE_KEYS]
    if varied:
        raise ConfigError(
            f"space varies {varied}, which change the feature cache; sweep them with "
            "data.use_feature_cache: false"
        )
    names = class_names(manifest)
    union = base.resolve_model(len(names)).model_copy(update={"taps": _union_taps(sweep, base)})
    try:
        check_cache(base.data, union)
    except StaleCacheError as err:
        log.info("building the feature cache for taps %s (%s)", union.taps, err)
        build_feature_cache(base.data, union, **feature_pool(live_nodes()))


def _run_trial(
    config: dict[str, Any],
    sweep: SweepConfig,
    base_raw: dict[str, Any],
    fixed: dict[str, Any],
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    registry_name: str,
) -> None:
    """Tune trainable: one trial = one nested MLflow run + one TorchTrainer fit."""
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
    run_id = tracking.start_run(cfg, experiment_id, parent_run_id)
    MlflowClient().set_tag(run_id, TRIAL_TAG, trial_id)
    finished = _finished_checkpoint(cfg)
    if finished is not None:
        # Interrupted after this trial's Train run ended but before Tune (and maybe MLflow)
        # took its last report: a new fit would train nothing and report nothing.
        history = TrainState.load(finished).history
        logged = {m.step for m in MlflowClient().get_metric_history(run_id, "epoch")}
        logger = tracking.MlflowEpochLogger(tracking_uri, run_id)
        for epoch_metrics in history:
            if int(epoch_metrics["epoch"]) not in logged:
                logger.log_epoch(epoch_metrics)
        tune.report({**history[-1], CHECKPOINT_PATH_KEY: str(finished)})
        return
    plan = plan_run(cfg)
    data = prepare_data(cfg)
    tracking.log_run_inputs(cfg, run_id, data.model_cfg)
    callbacks = [
        tracking.MlflowEpochLogger(tracking_uri, run_id),
        TuneReportCallback(),
        RegisterTrainRun(registry_name, trial_id),
    ]
    build_trainer(cfg, data, plan, callbacks, run_id).fit()


def _finished_checkpoint(cfg: JlstmConfig) -> Path | None:
    """The Train run's last checkpoint when it holds every epoch (local storage only)."""
    storage = cfg.cluster.storage_path
    if "://" in storage:
        return None
    run_dir = Path(storage).resolve() / cfg.resolved_run_name()
    # Only checkpoint directories holding a state file: an upload cut short may have none.
    checkpoints = sorted(state.parent for state in run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if checkpoints and TrainState.load(checkpoints[-1]).epoch >= cfg.train.epochs:
        return checkpoints[-1]
    return None


def _experiment_path(sweep: SweepConfig, base: JlstmConfig) -> tuple[str, str]:
    """(Tune storage path, Tune experiment path); local paths made absolute."""
    storage = sweep.storage_path or base.cluster.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return storage, f"{storage.rstrip('/')}/{sweep.name}"


def _parent_run(
    client: MlflowClient, sweep: SweepConfig, experiment_id: str, path: str, resume: bool
) -> str:
    if resume:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{path}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if found:
            return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=sweep.name, tags={SWEEP_TAG: path, "jlstm.kind": "sweep"}
    )
    for key, value in tracking.flatten_params(sweep.model_dump(mode="json")).items():
        client.log_param(run.info.run_id, f"sweep.{key}", value[:6000])
    return run.info.run_id


def run_sweep(sweep: SweepConfig, base_raw: dict[str, Any], resume: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the sweep; register the best trial's model.

    `sweep` and `base_raw` come from `load_sweep`. A fresh sweep refuses an experiment
    path that already holds one (pass `resume`); `resume` refuses one that does not.
    Returns with `interrupted=True`, registering nothing, when the sweep was stopped
    (Ctrl+C) before every trial finished; `resume` continues it.
    """
    base = validate_config(base_raw, source="base config")
    uri = tracking.connect()
    experiment_id = tracking.get_or_create_experiment(base.tracking.experiment)
    init_ray()
    storage, path = _experiment_path(sweep, base)
    restorable = tune.Tuner.can_restore(path)
    if resume and not restorable:
        raise ConfigError(f"--resume: no sweep to resume at {path}")
    if not resume and restorable:
        raise ConfigError(
            f"a sweep named {sweep.name!r} already exists at {path}; continue it with "
            "--resume or choose another name"
        )
    plan = plan_run(
        base, max_runs=min(sweep.num_samples, sweep.max_concurrent_trials or sweep.num_samples),
        trial_cpus=sweep.trial_cpus,
    )
    log.info("resource plan: %s", plan)
    ensure_cache(sweep, base)
    client = MlflowClient()
    parent_id = _parent_run(client, sweep, experiment_id, path, resume)
    fixed = {
        "cluster.cpus_per_worker": plan.cpus_per_worker,
        # Train runs sit beside the Tune experiment, one folder per trial.
        "cluster.storage_path": f"{storage.rstrip('/')}/{sweep.name}_train",
    }
    # Held for the whole sweep: the registry of Train runs lives as long as this handle.
    registry_name = f"jlstm-tune-{sweep.name}"
    runs = registry(registry_name)
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial, sweep=sweep, base_raw=base_raw, fixed=fixed, tracking_uri=uri,
            experiment_id=experiment_id, parent_run_id=parent_id, registry_name=registry_name,
        ),
        {"CPU": plan.trial_cpus},
    )
    if resume:
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.tune_space(),
            tune_config=_tune_config(sweep, base, plan),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[ReleaseEndedTrainRuns(registry_name)],
            ),
        )
    grid = tuner.fit()
    ray.kill(runs)
    return _finish_sweep(sweep, base, base_raw, grid, uri, parent_id, path)


def _tune_config(sweep: SweepConfig, base: JlstmConfig, plan: ResourcePlan) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [p for p in [sweep.paper_point()] if p is not None]
    concurrent = plan.concurrent_runs
    if sweep.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(points_to_evaluate=points or None, seed=sweep.seed)
    else:
        # The random generator takes its limit itself: Tune ignores TuneConfig's for it.
        search_alg = BasicVariantGenerator(
            points_to_evaluate=points, random_state=sweep.seed, max_concurrent=concurrent
        )
        concurrent = None
    scheduler = None
    if sweep.asha:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=sweep.asha.max_t or base.train.epochs,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    return tune.TuneConfig(
        metric=sweep.metric,
        mode=sweep.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=sweep.num_samples,
        max_concurrent_trials=concurrent,
    )


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
            TAPS_KEY: "+".join(model_cfg.taps),
            "branches": len(model_cfg.taps),
            **{f"config/{k}": (str(v) if isinstance(v, list) else v) for k, v in values.items()},
            **{k: v for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)},
            "mlflow_run_id": runs.get(trial_id),
            "trial_path": result.path,
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _trial_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, str]:
    """trial id -> its nested MLflow run id."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=10000,
    )
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def _finish_sweep(
    sweep: SweepConfig,
    base: JlstmConfig,
    base_raw: dict[str, Any],
    grid: Any,
    uri: str,
    parent_id: str,
    path: str,
) -> SweepResult:
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = _trial_runs(client, experiment_id, parent_id)
    table = _trials_table(sweep, base, base_raw, grid, runs)
    result = SweepResult(
        path, uri, parent_id, table, _interrupted(path, sweep.num_samples), sweep.metric
    )
    result.trial_epochs_run = int(table["epoch"].sum()) if len(table) else 0
    result.trial_epochs_full = len(table) * base.train.epochs
    if result.interrupted:
        return result
    for row in table.itertuples():
        if row.mlflow_run_id:
            client.set_tag(row.mlflow_run_id, STATUS_TAG, _status(row))
            # A trial ASHA stopped (or that failed) never returned to close its own run.
            if client.get_run(row.mlflow_run_id).info.status == "RUNNING":
                client.set_terminated(
                    row.mlflow_run_id, "FAILED" if row.status == "error" else "FINISHED"
                )
    best = grid.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="last",
                                filter_nan_and_inf=True)
    if best.error is not None or CHECKPOINT_PATH_KEY not in best.metrics:
        raise RuntimeError(f"sweep {sweep.name}: no trial finished an epoch; see {path}")
    best_id = best.metrics.get("trial_id") or Path(best.path).name
    result.best_trial_id = best_id
    result.best_metric = float(best.metrics[sweep.metric])
    result.best_values = sweep.decode(best.config)
    result.best = _register_best(base_raw, result, best, runs[best_id], sweep)
    _log_parent(client, sweep, result, parent_id)
    return result


def _interrupted(path: str, num_samples: int) -> bool:
    """Whether Ctrl+C ended the sweep before every trial finished.

    Read from the experiment state Tune saved on disk (what `--resume` continues): after
    an interruption Tune stops the running trials and marks them terminated in memory,
    so the ResultGrid alone cannot tell an interrupted trial from one ASHA stopped.
    """
    trials = tune.ExperimentAnalysis(path).trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < num_samples


def _status(row: Any) -> str:
    if row.status == "error":
        return "error"
    return "stopped_early" if row.stopped_early else "completed"


def _register_best(
    base_raw: dict[str, Any], result: SweepResult, best: Any, run_id: str, sweep: SweepConfig
) -> SplitResult:
    """`finish_run` on the best trial's last checkpoint: artifacts, model, champion rule."""
    cfg = validate_config(trial_raw(base_raw, result.best_values or {}))
    manifest = ensure_index(cfg.data)
    names = class_names(manifest)
    # finish_run reads no dataset, so none is built here.
    data = PreparedData(
        manifest, names, cfg.resolve_model(len(names)), datasets={}, readers={}, test_videos=0
    )
    checkpoint = ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY])
    return finish_run(cfg, run_id, checkpoint, data)


def _log_parent(
    client: MlflowClient, sweep: SweepConfig, result: SweepResult, parent_id: str
) -> None:
    """Best trial, ASHA's saving, the trials table and the metric plot on the parent run."""
    client.set_tag(parent_id, "jlstm.best_trial_id", result.best_trial_id or "")
    if result.best and result.best.model_version:
        client.set_tag(parent_id, "jlstm.best_model_version", result.best.model_version)
    client.log_metric(parent_id, f"best_{sweep.metric}", result.best_metric or float("nan"))
    client.log_metric(parent_id, "trials", len(result.trials))
    client.log_metric(parent_id, "trial_epochs_run", result.trial_epochs_run)
    client.log_metric(parent_id, "trial_epochs_full", result.trial_epochs_full)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        result.trials.to_csv(table, index=False)
        best = Path(tmp) / "best_config.yaml"
        best.write_text(yaml.safe_dump(result.best_values, sort_keys=False))
        plot = plot_metric_vs_lambda_zeta(
            result.trials[result.trials["status"] == "ok"], sweep.metric,
            Path(tmp) / "metric_vs_lambda_zeta.png",
        )
        for artifact in (table, best, plot):
            client.log_artifact(parent_id, str(artifact))
    client.set_terminated(parent_id, "FINISHED")


def print_sweep(result: SweepResult) -> None:
    """CLI summary: best config and metric, ASHA's saving, and where to look."""
    if result.interrupted:
        print(f"sweep interrupted; continue it with --resume ({result.experiment_path})")
        return
    print(f"best trial {result.best_trial_id}: {result.metric} = {result.best_metric:.4f}")
    for key, value in (result.best_values or {}).items():
        print(f"  {key} = {value}")
    if result.best:
        status = "now champion" if result.best.promoted else "champion unchanged"
        print(f"  model version {result.best.model_version} ({status})")
    print(
        f"{len(result.trials)} trials, {result.trial_epochs_run} trial-epochs run of "
        f"{result.trial_epochs_full} without early stopping"
    )
    print(f"Ray Tune experiment: {result.experiment_path} (tune.Tuner.restore(path))")
    uri = result.tracking_uri
    hint = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri
    print(f"MLflow: parent run {result.parent_run_id}; browse with: {hint}")
