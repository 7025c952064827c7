"""`jlstm reproduce`: every run behind a paper table, side by side on the Ray cluster.

The runs of a table are (dataset, split, variant) triples (`tune_spaces.paper`), each a
`jlstm train` run of `configs/paper/<dataset>_<variant>.yaml` (or, with `synthetic`, of
`configs/paper/synthetic.yaml` on generated videos) named `<dataset>-split<N>-<variant>`,
all children of one parent MLflow run per experiment (tag `jlstm.kind = reproduce`, found
again by the next call). Before anything is scheduled:

- a run FINISHED in MLflow with its final model logged (`FINISHED_TAG` at the config's
  epoch count) is skipped; one of that name that logged another config is refused (a
  ConfigError listing the keys), since its figure would not be the paper's setting;
- each (dataset, split) is indexed and its feature cache built on this driver, with the
  union of the taps its scheduled variants read (one cache per split:
  `<data.feature_cache>/split<N>`, because a cache's frames follow its split's manifest);
- the resource planner says how many runs fit at once (`plan_run(max_runs=...)`), and
  each run name is locked (`run_lock`) so no `jlstm train` writes it meanwhile.

Tune then runs a grid over the run names (`reproduce_trial.run_reproduce_trial`); a run
that stops early resumes from its Train checkpoints on the next call (the Train runs live
under `<cluster.storage_path>/reproduce/<experiment>`). The report of the table is logged
on the parent run at the end.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.targets import TARGETS_FILE
from model.config import VARIANTS
from orchestration import tracking
from orchestration.config import (
    JlstmConfig,
    absolute_path,
    apply_overrides,
    parse_override,
    read_config_raw,
    resolve_paths,
    set_dotted,
    validate_config,
)
from orchestration.errors import ConfigError
from tune_spaces.paper import DATASETS, TABLES, RunKey, table_runs
from tune_spaces.paper_report import (
    KIND_TAG,
    REPRODUCE_KIND,
    Report,
    build_report,
    find_parent,
    log_report,
)
from tune_spaces.spaces import SweepConfig

log = logging.getLogger(__name__)
PAPER_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "paper"
SYNTHETIC_CONFIG = "synthetic.yaml"
DEFAULT_EXPERIMENT = "jlstm-reproduce"
SYNTHETIC_EXPERIMENT = "jlstm-reproduce-synthetic"
DEFAULT_WORKDIR = "runs/reproduce-synthetic"
# Synthetic data: as many classes as the demo, a third of its videos (runs side by side).
SYNTHETIC_CLASSES = 4
SYNTHETIC_VIDEOS_PER_CLASS = 9
SYNTHETIC_DONE_FILE = TARGETS_FILE  # synthesize_dataset writes it last
# What each run's Tune driver function holds: a sweep trial's default.
TRIAL_CPUS = SweepConfig.model_fields["trial_cpus"].default
SECTIONS = ("model", "data", "train", "cluster", "tracking")  # JlstmConfig's sections
# Keys reproduce sets for every run: `--set` may not change them.
RESERVED_KEYS = ("run_name", "variant", "data.split", "data.dataset", "data.manifest",
                 "tracking.experiment")


@dataclass
class ReproduceResult:
    """What a `reproduce` call did: the runs it scheduled, skipped and lost, the report."""

    experiment: str
    parent_run_id: str
    scheduled: list[str]
    skipped: list[str]
    failed: list[str] = field(default_factory=list)
    concurrent_runs: int = 0
    report: Report | None = None


def check_overrides(overrides: list[str]) -> None:
    """Refuse a `--set` of a key reproduce sets itself (ConfigError naming it)."""
    for override in overrides:
        key, _ = parse_override(override)
        if key in SECTIONS:
            raise ConfigError(
                f"--set {override!r}: set one key of a section (e.g. train.epochs=3), "
                "not a whole section"
            )
        if key in RESERVED_KEYS:
            raise ConfigError(
                f"--set {override!r}: reproduce sets {key} for every run itself "
                f"(reserved: {', '.join(RESERVED_KEYS)})"
            )


def safe_name(text: str) -> str:
    """`text` as one folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def run_config(
    key: RunKey,
    *,
    experiment: str,
    synthetic: bool = False,
    workdir: str | Path = DEFAULT_WORKDIR,
    overrides: list[str] | None = None,
) -> JlstmConfig:
    """The run config of `key`: the paper's file for its dataset and variant (or the
    synthetic base on `<workdir>/<dataset>`), `--set` overrides, then what reproduce
    fixes: variant, split, run name, experiment, per-split cache, its own Train storage;
    local paths made absolute (Tune trials run in their own working directories)."""
    if synthetic:
        source = PAPER_CONFIGS / SYNTHETIC_CONFIG
        raw = read_config_raw(source)
        base = Path(workdir) / key.dataset
        for dotted, value in (("data.dataset", key.dataset), ("data.root", str(base / "data")),
                              ("data.feature_cache", str(base / "features"))):
            set_dotted(raw, dotted, value)
    else:
        source = PAPER_CONFIGS / f"{key.dataset}_{key.variant}.yaml"
        raw = read_config_raw(source)
    raw = apply_overrides(raw, overrides or [])
    raw = copy.deepcopy(raw)
    raw.pop("run_name", None)
    raw["variant"] = key.variant
    data = raw.setdefault("data", {})
    data["split"] = key.split
    data.pop("manifest", None)  # each split has its own: <root>/manifest_split<N>.parquet
    if data.get("feature_cache"):
        data["feature_cache"] = f"{data['feature_cache']}/split{key.split}"
    raw.setdefault("tracking", {})["experiment"] = experiment
    cluster = raw.setdefault("cluster", {})
    storage = absolute_path(cluster.get("storage_path", "runs/ray"))
    cluster["storage_path"] = f"{storage.rstrip('/')}/reproduce/{safe_name(experiment)}"
    resolve_paths(raw)
    return validate_config(raw, source=f"{source} for {key.name}")


def select_runs(
    table: int,
    datasets: tuple[str, ...] | None = None,
    splits: tuple[int, ...] | None = None,
    variants: tuple[str, ...] | None = None,
) -> list[RunKey]:
    """The runs behind `table`, restricted; ConfigError naming a value the table lacks."""
    if table not in TABLES:
        raise ConfigError(f"--table {table}: the paper's tables are {sorted(TABLES)}")
    paper = TABLES[table]
    for dataset in datasets or ():
        if dataset not in DATASETS:
            raise ConfigError(f"--datasets: {dataset!r} is not one of {list(DATASETS)}")
        if dataset not in paper.datasets:
            raise ConfigError(
                f"--datasets: table {table} has no {dataset} figures (it has "
                f"{', '.join(paper.datasets)})"
            )
    for variant in variants or ():
        if variant not in VARIANTS:
            raise ConfigError(f"--variants: {variant!r} is not one of {sorted(VARIANTS)}")
        if variant not in paper.variants():
            raise ConfigError(
                f"--variants: table {table} has no {variant} row (its variants: "
                f"{', '.join(paper.variants())})"
            )
    keys = table_runs(paper, datasets, splits, variants)
    if not keys:
        raise ConfigError(
            f"--splits {','.join(map(str, splits or ()))}: table {table} ({paper.note}) "
            "has no run on those splits"
        )
    return keys


def _parent_run(experiment_id: str) -> str:
    """The experiment's reproduce parent run, RUNNING again; created on the first call."""
    parent = find_parent(experiment_id)
    if parent is not None:
        tracking.resume_run(parent)
        return parent
    return tracking.create_run(experiment_id, "reproduce", tags={KIND_TAG: REPRODUCE_KIND})


def _is_finished(cfg: JlstmConfig, experiment_id: str) -> bool:
    """Whether `cfg`'s run is FINISHED with its model logged; a run of its name with
    another config is a ConfigError (its figure would not be this config's)."""
    run_id = tracking.find_run(cfg, experiment_id)
    if run_id is None:
        return False
    differ = tracking.config_differences(cfg, run_id)
    if differ:
        raise ConfigError(
            f"run {cfg.resolved_run_name()!r} in experiment {cfg.tracking.experiment!r} was "
            f"trained with another config ({differ}): reproduce into another experiment "
            "(--experiment NAME) or drop the --set that differs"
        )
    run = tracking.get_run(run_id)
    return (run.info.status == "FINISHED"
            and run.data.tags.get(tracking.FINISHED_TAG) == str(cfg.train.epochs))


def _synthesize(cfg: JlstmConfig) -> None:
    """Write the synthetic videos of `cfg.data.dataset` once (kept for later calls)."""
    from data_shards.synth import synthesize_dataset

    root = Path(cfg.data.root)
    if (root / SYNTHETIC_DONE_FILE).is_file():
        return
    log.info("writing synthetic %s videos to %s", cfg.data.dataset, root)
    synthesize_dataset(
        root, layout=cfg.data.dataset, classes=SYNTHETIC_CLASSES,
        videos_per_class=SYNTHETIC_VIDEOS_PER_CLASS, seed=cfg.data.seed,
        frame_size=cfg.resolve_model(2).frame_size * 4 // 3,
    )


def prepare_data(cfgs: list[JlstmConfig], synthetic: bool) -> None:
    """Index every (dataset, split) of `cfgs` and build its feature cache with the union
    of the taps its runs read, here on the driver, before any run starts."""
    from tune_spaces.sweep import ensure_index_and_cache

    groups: dict[tuple[str, int], list[JlstmConfig]] = {}
    for cfg in cfgs:
        groups.setdefault((cfg.data.dataset, cfg.data.split), []).append(cfg)
    for (dataset, split), group in sorted(groups.items()):
        if synthetic:
            _synthesize(group[0])
        taps = sorted({tap for cfg in group for tap in cfg.clip_spec(2).taps})
        log.info("preparing %s split %d: index, feature cache of %s", dataset, split, taps)
        ensure_index_and_cache(group[0], taps)


def reproduce(
    table: int,
    *,
    datasets: tuple[str, ...] | None = None,
    splits: tuple[int, ...] | None = None,
    variants: tuple[str, ...] | None = None,
    synthetic: bool = False,
    workdir: str | Path = DEFAULT_WORKDIR,
    experiment: str | None = None,
    overrides: list[str] | None = None,
) -> ReproduceResult:
    """Run what `table` still lacks (see the module docstring); returns what it did."""
    check_overrides(overrides or [])
    experiment = experiment or (SYNTHETIC_EXPERIMENT if synthetic else DEFAULT_EXPERIMENT)
    keys = select_runs(table, datasets, splits, variants)
    cfgs = {
        k.name: run_config(k, experiment=experiment, synthetic=synthetic, workdir=workdir,
                           overrides=overrides)
        for k in keys
    }
    if not synthetic:  # synthetic videos are written later, by `prepare_data`
        from orchestration.driver import preflight  # Ray and torch: only when it runs

        for cfg in cfgs.values():
            preflight(cfg, check_cache=False)  # the cache is built below when missing
    uri = tracking.connect()
    experiment_id = tracking.get_or_create_experiment(experiment)
    skipped = [name for name, cfg in cfgs.items() if _is_finished(cfg, experiment_id)]
    todo = {name: cfg for name, cfg in cfgs.items() if name not in skipped}
    parent = _parent_run(experiment_id)
    result = ReproduceResult(experiment, parent, sorted(todo), skipped)
    with tracking.tracked_run(run_id=parent) as parent_run:
        if todo:
            result.failed, result.concurrent_runs = _schedule(
                todo, synthetic, uri, experiment_id, parent, table
            )
        if result.failed:
            parent_run.fail()
    result.report = build_report(experiment, [table])
    log_report(result.report, [table])
    return result


def _schedule(
    todo: dict[str, JlstmConfig], synthetic: bool, uri: str, experiment_id: str, parent: str,
    table: int,
) -> tuple[list[str], int]:
    """Run `todo` on Ray Tune, as many at once as the planner allows; returns the names
    of the runs that failed and how many ran at once."""
    from ray import tune

    from data_shards.cluster import init_ray
    from orchestration.session import plan_run, run_lock
    from tune_spaces.reproduce_trial import RUN_KEY, run_reproduce_trial

    init_ray()
    first = next(iter(todo.values()))
    plan = plan_run(first, max_runs=len(todo), trial_cpus=TRIAL_CPUS)
    log.info("resource plan: %d runs at once, %s CPU per worker", plan.concurrent_runs,
             plan.cpus_per_worker)
    prepare_data(list(todo.values()), synthetic)
    runs = {}
    for name, cfg in todo.items():
        raw = cfg.model_dump(mode="json")
        raw["cluster"]["cpus_per_worker"] = plan.cpus_per_worker
        runs[name] = raw
    storage = first.cluster.storage_path  # <storage>/reproduce/<experiment>, absolute
    with ExitStack() as locks:
        for name in todo:
            locks.enter_context(run_lock(name))
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(
                    run_reproduce_trial, runs=runs, plan=plan, tracking_uri=uri,
                    experiment_id=experiment_id, parent_run_id=parent,
                ),
                {"CPU": TRIAL_CPUS},
            ),
            param_space={RUN_KEY: tune.grid_search(sorted(todo))},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrent_runs),
            run_config=tune.RunConfig(
                name=f"table{table}-{time.strftime('%Y%m%dT%H%M%S')}",
                storage_path=f"{storage}/tune",
                # Train retries a run itself (cluster.max_failures); a run that still fails
                # is reported, and the next call resumes it from its checkpoints.
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        grid = tuner.fit()
    # Read back from MLflow, not from the grid: a run Ctrl+C stopped has no error there.
    failed = sorted(name for name, cfg in todo.items() if not _is_finished(cfg, experiment_id))
    for name in failed:
        log.error("run %s did not finish: see %s (the next call resumes it)", name, grid)
    return failed, plan.concurrent_runs
