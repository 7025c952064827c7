"""One training run, start to end: read `Run.execute` top to bottom to see a run's whole life.

    preflight -> tracking store -> Ray -> lock -> MLflow run (tags) -> finished checkpoint?
      no:  plan -> data (read once) -> inputs logged -> TorchTrainer fit
    -> checks (checkpoint, bad clips) -> evaluation artifacts, plots -> model, registry

Every kind of run goes through `Run`; each caller adds only what differs:
- `jlstm train` (`train_split`, one per split; `train_splits` nests several under a
  parent run that holds their average): the whole life as above.
- a sweep trial (`tune_spaces.trial`): the sweep driver ran preflight and made the plan
  once for every trial (`preflighted`, `plan`), a trial's name is its own (`lock_held`),
  Tune's callbacks join the fit, and the run stops after it (`stop_after_fit`): the
  sweep finishes only its best trial, through `Run.finish`.
- a reproduce trial (`tune_spaces.reproduce_trial`): like a sweep trial, but its driver
  holds every run name's lock, and it is finished like `jlstm train`.

A new kind of run (a scheduled re-evaluation, say) is one more caller: build a `Run` with
what that caller already holds, call `execute` (or `finish` on a checkpoint it has).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray.train

from data_shards.cluster import init_ray
from data_shards.config import DataConfig
from data_shards.run_data import RunData
from model import JointAttentionNet, ModelConfig
from orchestration import registry, tracking
from orchestration.attention_examples import attention_examples
from orchestration.checkpoint import CHECKPOINT_FILE, EVAL_DIR, TrainState, bad_clips
from orchestration.config import JlstmConfig, is_uri
from orchestration.driver import (
    PreparedData,
    build_trainer,
    check_bad_clips,
    load_data,
    preflight,
    prepare_data,
)
from orchestration.epoch_logger import EpochLoggerCallback, MlflowEpochLogger, log_missing_epochs
from orchestration.metrics import EVAL_PREFIX, PLOTTED_ACCURACIES, PLOTTED_LOSSES, SUMMARY
from orchestration.plots import plot_loss_curves
from orchestration.resources import ResourcePlan
from orchestration.session import plan_run, run_lock, run_storage

log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """What one finished run leaves behind."""

    run_id: str
    metrics: dict[str, float]
    checkpoint_dir: str
    model_version: str | None
    promoted: bool


@dataclass
class Trained:
    """What training left: the last checkpoint, its epoch's report, the data it read.

    `fitted` is False when the Train run was found finished on disk and nothing was fit.
    """

    checkpoint: ray.train.Checkpoint
    metrics: dict[str, Any]
    data: RunData | None  # None: found finished by a run that stops after fit (unread)
    fitted: bool


class Fittable(Protocol):
    """What a run fits: a `TorchTrainer` (a test's fake trainer in unit tests)."""

    def fit(self) -> ray.train.Result: ...


def finish_run(
    cfg: JlstmConfig, run_id: str, checkpoint: ray.train.Checkpoint, data: RunData
) -> SplitResult:
    """Send any epoch MLflow missed; log the last epoch's evaluation, plots and the model;
    move the champion alias among versions of the same dataset digest and split. A run
    already finished at this epoch (FINISHED_TAG) logs nothing twice."""
    tags = tracking.get_run(run_id).data.tags
    with checkpoint.as_directory() as ckpt_dir:
        state = TrainState.load(Path(ckpt_dir))
        history = state.history
        log_missing_epochs(MlflowEpochLogger(tracking.current_uri(), run_id), history)
        final = {k: float(v) for k, v in history[-1].items() if isinstance(v, int | float)}
        if tags.get(tracking.FINISHED_TAG) == str(state.epoch):
            log.info("run %s already finished at epoch %d: nothing to log", run_id, state.epoch)
            tracking.end_run(run_id, "FINISHED")  # a re-run marked it RUNNING again
            version = tags.get(tracking.VERSION_TAG)
            return SplitResult(run_id, final, checkpoint.path, version, False)
        tracking.log_artifacts(run_id, [Path(ckpt_dir) / EVAL_DIR], "evaluation")
    net = JointAttentionNet(ModelConfig.model_validate(state.model_config))
    net.load_state_dict(state.model)
    with tempfile.TemporaryDirectory() as tmp:
        plots = [plot_loss_curves(
            history, PLOTTED_LOSSES, PLOTTED_ACCURACIES, Path(tmp) / "loss_curves.png"
        )]
        # Videos whose test clips failed (a hang took a whole decode deadline) are skipped.
        failed = {int(f["video_id"]) for f in bad_clips(checkpoint) if f["subset"] == "test"}
        plots += attention_examples(
            net, cfg, data.subset("test"), data.class_names, Path(tmp), skip=failed
        )
        tracking.log_artifacts(run_id, plots, "plots")
    # FAILED if registering fails, whoever finishes the run (a sweep's best trial is not
    # inside a `Run.execute`'s tracked run).
    with tracking.tracked_run(run_id=run_id):
        version, promoted = registry.log_run_model(
            run_id, net, cfg, data.class_names, final, data.digest
        )
        done = {tracking.FINISHED_TAG: str(state.epoch)}
        tracking.set_tags(run_id, done | ({tracking.VERSION_TAG: version} if version else {}))
    return SplitResult(run_id, final, checkpoint.path, version, promoted)


def finished_checkpoint(cfg: JlstmConfig) -> tuple[Path, TrainState] | None:
    """The Train run's last checkpoint and its state, when it holds every epoch (local
    storage only)."""
    storage = run_storage(cfg)
    if is_uri(storage):
        return None
    run_dir = Path(storage) / cfg.resolved_run_name()
    # Only checkpoint directories holding a state file: an upload cut short may have none.
    checkpoints = sorted(state.parent for state in run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    if not checkpoints:
        return None
    try:
        state = TrainState.load(checkpoints[-1])
    except (OSError, RuntimeError, EOFError, KeyError) as err:
        # A state file cut short: not finished; Ray Train resumes from what it registered.
        log.warning("%s does not load (%s): fitting from Ray Train's checkpoint",
                    checkpoints[-1], err)
        return None
    return (checkpoints[-1], state) if state.epoch >= cfg.train.epochs else None


@dataclass(frozen=True)
class RunParts:
    """What a run is built from. The defaults are the real parts; unit tests swap in fakes
    (no Ray, no trainer) to check the run's order in seconds."""

    preflight: Callable[[JlstmConfig], RunData | None] = preflight
    start_cluster: Callable[[], None] = init_ray
    lock: Callable[[str], AbstractContextManager[None]] = run_lock
    plan: Callable[[JlstmConfig], ResourcePlan] = plan_run
    prepare: Callable[[JlstmConfig, RunData | None], PreparedData] = prepare_data
    trainer: Callable[..., Fittable] = build_trainer
    # A finished run's data when nothing read it yet: classes, test videos, digest.
    finished_data: Callable[[JlstmConfig], RunData] = lambda cfg: load_data(cfg, check_cache=False)
    finish: Callable[[JlstmConfig, str, ray.train.Checkpoint, RunData], SplitResult] = finish_run


@dataclass
class Run:
    """One run of `cfg`, from preflight to the registry (`execute`), taking what its
    caller already holds instead of redoing it.

    Attributes:
        cfg: the run's validated config.
        parent_run_id: the MLflow run it nests under (a split set, a sweep, a reproduce).
        tracking_uri: the store, as the caller's driver resolved it (a Tune trial's actor
            does not see the driver's environment); None: `tracking.connect()`.
        experiment_id: None: `cfg.tracking.experiment`, created when missing.
        preflighted: the caller ran `preflight` (and builds a missing cache itself); the
            check that an existing run of this name logged the same config is skipped too
            (a trial's name is its own; reproduce compares configs before scheduling).
        data: the data preflight read (None: read when the run prepares its datasets).
        plan: the resource plan (a sweep's, made once for all trials); None: planned here.
        lock_held: the run name's lock is held by the caller, or the name is a trial's own.
        tags: set on the MLflow run once it is open (a trial's id, its parent).
        callbacks: more Ray Train callbacks for the fit (Tune's report).
        stop_after_fit: return `Trained` after the fit (a sweep trial); else check,
            evaluate, register and return a `SplitResult`.
    """

    cfg: JlstmConfig
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    preflighted: bool = False
    data: RunData | None = None
    plan: ResourcePlan | None = None
    lock_held: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    callbacks: list[ray.train.UserCallback] = field(default_factory=list)
    stop_after_fit: bool = False
    parts: RunParts = field(default_factory=RunParts)

    def execute(self) -> SplitResult | Trained:
        """The run's whole life; a run that raises ends FAILED in MLflow."""
        cfg, parts = self.cfg, self.parts
        if not self.preflighted:  # what a user can fix, said before Ray and MLflow start
            self.data = parts.preflight(cfg)
        uri = tracking.use(self.tracking_uri) if self.tracking_uri else tracking.connect()
        experiment_id = self.experiment_id or tracking.get_or_create_experiment(
            cfg.tracking.experiment
        )
        if not self.preflighted:  # resuming a run name with another config is refused
            existing = tracking.find_run(cfg, experiment_id)
            if existing is not None:
                tracking.check_same_config(cfg, existing)
        parts.start_cluster()
        lock = nullcontext() if self.lock_held else parts.lock(cfg.resolved_run_name())
        with lock, tracking.tracked_run(cfg, experiment_id, self.parent_run_id) as run:
            if self.tags:
                tracking.set_tags(run.run_id, self.tags)
            trained = self.found_finished(uri, run.run_id) or self.fit(uri, run.run_id)
            if self.stop_after_fit:
                return trained
            # On a run found finished too: a reproduce run whose last epoch failed its
            # checks is not registered on the next call.
            check_bad_clips(cfg, run.run_id, trained.metrics, trained.checkpoint)
            assert trained.data is not None  # read unless the run stops after fit
            return parts.finish(cfg, run.run_id, trained.checkpoint, trained.data)

    def found_finished(self, uri: str, run_id: str) -> Trained | None:
        """The Train run found holding every epoch (interrupted after training, before
        MLflow or Tune took its end): nothing to fit; MLflow gets any epoch it missed, and
        a run that goes on to finish its inputs (a new MLflow run of a trained name)."""
        found = finished_checkpoint(self.cfg)
        if found is None:
            return None
        done, state = found
        log_missing_epochs(MlflowEpochLogger(uri, run_id), state.history)
        data = None
        if not self.stop_after_fit:  # a trial reports and ends: it needs no data
            data = self.data or self.parts.finished_data(self.cfg)
            model_cfg = ModelConfig.model_validate(state.model_config)
            tracking.log_run_inputs(self.cfg, run_id, model_cfg, data)
        return Trained(ray.train.Checkpoint(str(done)), state.history[-1], data, fitted=False)

    def fit(self, uri: str, run_id: str) -> Trained:
        """Plan, build the datasets, log the inputs, fit the TorchTrainer with every epoch
        logged to MLflow run `run_id`."""
        cfg, parts = self.cfg, self.parts
        plan = self.plan or parts.plan(cfg)
        prepared = parts.prepare(cfg, self.data)
        tracking.log_run_inputs(cfg, run_id, prepared.model_cfg, prepared.run)
        callbacks = [EpochLoggerCallback(MlflowEpochLogger(uri, run_id)), *self.callbacks]
        result = parts.trainer(cfg, prepared, plan, callbacks, run_id).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.resolved_run_name()!r} ended without a checkpoint")
        return Trained(result.checkpoint, result.metrics, prepared.run, fitted=True)

    def finish(self, run_id: str, checkpoint: ray.train.Checkpoint) -> SplitResult:
        """Evaluation artifacts, plots and the registered model of an already trained
        `checkpoint` (a sweep's best trial), on its MLflow run `run_id`."""
        data = self.data or self.parts.finished_data(self.cfg)
        return self.parts.finish(self.cfg, run_id, checkpoint, data)


def train_split(cfg: JlstmConfig, parent_run_id: str | None = None) -> SplitResult:
    """`jlstm train` of one split: the whole `Run`, everything in one MLflow run."""
    result = Run(cfg, parent_run_id=parent_run_id).execute()
    assert isinstance(result, SplitResult)  # only a run that stops after fit returns Trained
    return result


def train_splits(cfg: JlstmConfig, splits: list[int]) -> list[SplitResult]:
    """One run per split; with several, a parent run holds their average (the paper's rows)
    and ends with its children (FAILED if one failed). A given run_name names the parent;
    the children are `<run_name>-split<N>`."""
    if len(splits) == 1:
        return [train_split(cfg.model_copy(update={"data": _with_split(cfg, splits[0])}))]
    tracking.connect()
    experiment_id = tracking.get_or_create_experiment(cfg.tracking.experiment)
    default = f"{cfg.data.dataset}-splits{'+'.join(map(str, splits))}-{cfg.variant}"
    parent_cfg = cfg.model_copy(update={"run_name": cfg.run_name or default})
    with tracking.tracked_run(parent_cfg, experiment_id) as parent:
        results = [
            train_split(
                cfg.model_copy(update={
                    "data": _with_split(cfg, split),
                    "run_name": f"{cfg.run_name}-split{split}" if cfg.run_name else None,
                }),
                parent_run_id=parent.run_id,
            )
            for split in splits
        ]
        tracking.log_metrics(parent.run_id, {
            f"avg_{key}": float(np.mean([r.metrics[key] for r in results]))
            for key in results[0].metrics if key.startswith(EVAL_PREFIX)
        })
    return results


def print_results(results: list[SplitResult]) -> None:
    """A table of each split's test metrics, and where to look in MLflow."""
    print(f"{'run':34s}" + "".join(f"{m.removeprefix(EVAL_PREFIX):>22s}" for m in SUMMARY))
    for r in results:
        row = "".join(f"{r.metrics.get(m, float('nan')):22.3f}" for m in SUMMARY)
        print(f"{r.run_id:34s}{row}")
        status = "now champion" if r.promoted else "champion unchanged"
        print(f"  model version {r.model_version} ({status}); checkpoint {r.checkpoint_dir}")
    uri = tracking.tracking_uri()
    hint = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else uri
    print(f"browse the runs: {hint}")


def _with_split(cfg: JlstmConfig, split: int) -> DataConfig:
    """The data section for `split`; another split has its own default manifest."""
    if split == cfg.data.split:
        return cfg.data
    return cfg.data.model_copy(update={"split": split, "manifest": None})
