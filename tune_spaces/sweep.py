"""The sweep driver: a Ray Tune experiment whose trials each fit a Ray Train `TorchTrainer`.

Before any trial starts, the driver plans the trials' resources, makes sure one feature
cache serves them all and opens the sweep's parent MLflow run (tag
`jlstm.tune_experiment` = the Tune experiment path, found again on `--resume`). Each
trial is `tune_spaces.trial.run_trial` (a nested MLflow run and a TorchTrainer fit);
what the finished sweep leaves behind is `tune_spaces.results`.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import tune

from data_shards.cluster import init_ray
from data_shards.errors import StaleCacheError
from data_shards.features import build_feature_cache, check_cache
from data_shards.index import ensure_index
from data_shards.splits import class_names
from model.inputs import in_encoder_order, input_kind
from orchestration import tracking
from orchestration.config import JlstmConfig, absolute_path, validate_config
from orchestration.driver import preflight
from orchestration.errors import ConfigError
from orchestration.resources import ResourcePlan, feature_pool, live_nodes
from orchestration.session import plan_run
from tune_spaces.release import ReleaseEndedTrainRuns, registry
from tune_spaces.report import INPUTS_KEY, TAPS_KEY
from tune_spaces.results import SweepResult, finish_sweep
from tune_spaces.spaces import SweepConfig
from tune_spaces.trial import run_trial

log = logging.getLogger(__name__)
SWEEP_TAG = "jlstm.tune_experiment"
# Keys of the feature cache's key: a space varying one of them cannot share one cache.
CACHE_KEYS = (
    "model.frame_size", "model.clip_len", "model.map_size", "model.backbone_weights",
    "data.train_stride", "data.eval_stride", "data.frame_interval", "data.feature_cache",
)


def _union_taps(sweep: SweepConfig, base: JlstmConfig) -> list[str]:
    """Every frozen input a trial can pick (the cache holds them all), in cache order."""
    taps = set(base.clip_spec(2).taps)
    for key in (TAPS_KEY, INPUTS_KEY):  # the inputs' old name and theirs
        if key in sweep.space:
            for option in sweep.space[key].corners():
                taps |= {name for name in option if not input_kind(name).trainable}
    return in_encoder_order(taps)


def ensure_cache(sweep: SweepConfig, base: JlstmConfig) -> None:
    """Index the videos and make sure one feature cache serves every trial.

    Done once on the driver so concurrent trials neither index nor build a cache at the
    same time. The cache holds the union of the taps any trial can pick.
    """
    varied = [k for k in sweep.space if k in CACHE_KEYS]
    if varied and base.data.use_feature_cache:
        raise ConfigError(
            f"space varies {varied}, which change the feature cache; sweep them with "
            "data.use_feature_cache: false"
        )
    ensure_index_and_cache(base, _union_taps(sweep, base))


def ensure_index_and_cache(base: JlstmConfig, taps: list[str]) -> None:
    """Index `base.data`'s videos and, when runs read cached taps, make sure its feature
    cache holds `taps` (built on this driver when missing or stale).

    Shared by sweeps and `jlstm reproduce`: runs that start side by side must find the
    manifest and the cache ready, not build them at the same time.
    """
    manifest = ensure_index(base.data)
    if not base.data.use_feature_cache:
        return
    names = class_names(manifest)
    ordered = in_encoder_order(taps)  # VGG16's layer order, then the flow's
    union = base.clip_spec(len(names)).with_taps(ordered)
    try:
        check_cache(base.data, union)
    except StaleCacheError as err:
        log.info("building the feature cache for taps %s (%s)", ordered, err)
        build_feature_cache(base.data, union, **feature_pool(live_nodes()))


def _experiment_path(sweep: SweepConfig, base: JlstmConfig) -> tuple[str, str]:
    """(Tune storage path, Tune experiment path); local paths made absolute."""
    storage = absolute_path(sweep.storage_path or base.cluster.storage_path)
    return storage, f"{storage.rstrip('/')}/{sweep.name}"


def _parent_run(sweep: SweepConfig, experiment_id: str, path: str, resume: bool) -> str:
    """The sweep's parent run: with `resume`, the newest one of this experiment path."""
    if resume:
        found = tracking.search_runs(
            experiment_id, tags={SWEEP_TAG: path}, newest_first=True, max_results=1
        )
        if found:
            return found[0].info.run_id
    params = tracking.flatten_params(sweep.model_dump(mode="json"))
    return tracking.create_run(
        experiment_id, sweep.name, tags={SWEEP_TAG: path, "jlstm.kind": "sweep"},
        params={f"sweep.{key}": value[:6000] for key, value in params.items()},
    )


def run_sweep(sweep: SweepConfig, base_raw: dict[str, Any], resume: bool = False) -> SweepResult:
    """Run (or with `resume`, continue) the sweep; register the best trial's model.

    `sweep` and `base_raw` come from `load_sweep`. A fresh sweep refuses an experiment
    path that already holds one (pass `resume`); `resume` refuses one that does not.
    Returns with `interrupted=True`, registering nothing, when the sweep was stopped
    (Ctrl+C) before every trial finished; `resume` continues it.
    """
    base = validate_config(base_raw, source="base config")
    preflight(base, check_cache=False)  # `ensure_cache` builds a missing cache below
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
        base, max_runs=min(sweep.num_trials, sweep.max_concurrent_trials or sweep.num_trials),
        trial_cpus=sweep.trial_cpus,
    )
    log.info("resource plan: %s", plan)
    ensure_cache(sweep, base)
    parent_id = _parent_run(sweep, experiment_id, path, resume)
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
            run_trial, sweep=sweep, base_raw=base_raw, fixed=fixed, plan=plan, tracking_uri=uri,
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
    with tracking.tracked_run(run_id=parent_id) as parent:
        grid = tuner.fit()
        ray.kill(runs)
        result = finish_sweep(sweep, base, base_raw, grid, uri, parent_id, path)
        if result.interrupted:
            parent.interrupt()  # --resume takes the same parent run up again
    return result


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
