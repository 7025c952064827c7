"""The driver side of a training run: its data, its TorchTrainer, its end (model, champion).

`train_split` is one (dataset, split, variant) run; `train_splits` runs several splits
under one parent MLflow run whose metrics are the split averages (the paper's "average").
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from data_shards.clip_spec import ClipSpec
from data_shards.cluster import init_ray
from data_shards.config import DataConfig
from data_shards.datasets import ClipReader, build_datasets, clip_readers, train_clip_table
from data_shards.errors import BadDataError
from data_shards.index import ensure_index
from data_shards.run_data import RunData, load_run_data
from data_shards.targets import TargetCells, target_reader
from model import JointAttentionNet, ModelConfig
from orchestration import registry, tracking
from orchestration.attention_examples import attention_examples
from orchestration.checkpoint import EVAL_DIR, Checkpointer, TrainState, bad_clips
from orchestration.config import JlstmConfig
from orchestration.epoch_logger import EpochLoggerCallback, MlflowEpochLogger, log_missing_epochs
from orchestration.errors import ConfigError
from orchestration.evaluate import test_videos_of
from orchestration.metrics import (
    EVAL_PREFIX,
    PLOTTED_ACCURACIES,
    PLOTTED_LOSSES,
    SUMMARY,
    TRAIN_BAD_CLIPS,
    TRAIN_BAD_FRACTION,
    VAL_BAD_CLIPS,
    VAL_VIDEOS_SCORED,
    VIDEO_TOP1_VOTE,
)
from orchestration.plots import plot_loss_curves
from orchestration.resources import ResourcePlan
from orchestration.session import plan_run, run_lock, run_storage
from orchestration.worker import (
    SETUP_KEY,
    SystemMetrics,
    WorkerSetup,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """What one finished split leaves behind."""

    run_id: str
    metrics: dict[str, float]
    checkpoint_dir: str
    model_version: str | None
    promoted: bool


@dataclass
class PreparedData:
    """What a run needs before its trainer starts: its data (read once), model, datasets."""

    run: RunData
    model_cfg: ModelConfig
    datasets: dict[str, ray.data.Dataset]
    readers: dict[str, ClipReader | None]  # what each dataset's consumer applies per batch
    targets: TargetCells | None = None  # the moving shape's locations on synthetic data
    train_clips: int = 0  # clips in a training epoch

    @property
    def class_names(self) -> list[str]:
        return self.run.class_names

    @property
    def test_videos(self) -> int:
        return self.run.test_videos


def load_data(cfg: JlstmConfig, *, check_cache: bool = True) -> RunData:
    """`cfg`'s data read once (indexed first when there is no manifest yet); the feature
    cache's key checked against the configs unless `check_cache` is off."""
    ensure_index(cfg.data)
    return load_run_data(cfg.data, cfg.clip_spec if check_cache else None)


def prepare_data(cfg: JlstmConfig, run: RunData | None = None) -> PreparedData:
    """Build the Ray datasets of `cfg.data` from its data `run` (read here when None)."""
    run = run or load_data(cfg)
    model_cfg = cfg.resolve_model(num_classes=len(run.class_names))
    clip_spec = ClipSpec.of(model_cfg)
    datasets = build_datasets(
        cfg.data, clip_spec, eval_workers=cfg.cluster.num_workers, run_data=run
    )
    targets = target_reader(  # evaluation measures the test videos only
        cfg.data.root, run.subset("test"), model_cfg.map_size, model_cfg.clip_len,
        cfg.data.frame_interval,
    )
    readers = clip_readers(cfg.data, clip_spec, run.cache_key)
    train_clips = train_clip_table(cfg.data, clip_spec, run.manifest).num_rows
    return PreparedData(run, model_cfg, datasets, readers, targets, train_clips)


def finishing_data(cfg: JlstmConfig) -> tuple[PreparedData, str]:
    """What `finish_run` needs for a run whose training ended earlier (a sweep's best
    trial, a run found finished): the data, classes and model (no dataset is built), and
    the dataset digest."""
    run = load_data(cfg, check_cache=False)
    data = PreparedData(run, cfg.resolve_model(len(run.class_names)), datasets={}, readers={})
    return data, run.digest


class SplitEvalDataConfig(ray.train.DataConfig):
    """`train` split into equal shards (DDP steps in lockstep); `val` into unequal ones.

    Ray Train's default `streaming_split(equal=True)` may drop up to world_size - 1 rows
    to even the shards out. Evaluation must score every test clip exactly once, so `val`
    is split with `equal=False`: each clip goes to exactly one worker, whichever asks for
    the next block first, and rank 0 gathers the predictions.
    """

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        rest = {name: ds for name, ds in datasets.items() if name != "val"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = ray.data.Dataset.copy(datasets["val"])
            val.context.execution_options = self.default_ingest_options()
            shards = val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, shard in enumerate(shards):
                output[rank]["val"] = shard
        return output


def build_trainer(
    cfg: JlstmConfig,
    data: PreparedData,
    plan: ResourcePlan,
    callbacks: list[ray.train.UserCallback],
    mlflow_run_id: str | None = None,
) -> TorchTrainer:
    """A TorchTrainer for `cfg`: DDP workers sized by `plan`, checkpoint every epoch.

    With `mlflow_run_id`, the training nodes log MLflow system metrics to that run.
    """
    system_metrics = None
    if mlflow_run_id and cfg.tracking.system_metrics_interval_s:
        system_metrics = SystemMetrics(
            mlflow_run_id, mlflow.get_tracking_uri(), ray.get_runtime_context().get_node_id(),
            cfg.tracking.system_metrics_interval_s,
        )
    setup = WorkerSetup(
        cfg, data.model_cfg, data.class_names, data.test_videos, data.train_clips,
        data.readers, data.targets, system_metrics,
        test_video_paths=test_videos_of(data.run.subset("test")),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={SETUP_KEY: setup},
        scaling_config=ray.train.ScalingConfig(
            # An elastic run's (min, max): Ray Train starts with as many workers as fit and
            # restarts the group from the last checkpoint when it shrinks or grows.
            num_workers=plan.scaling_workers(),
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker=plan.worker_resources(),
            elastic_resize_monitor_interval_s=cfg.cluster.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.resolved_run_name(),
            storage_path=run_storage(cfg),
            # A lost node is a worker error (max_failures); a node the cloud preempts (spot)
            # is counted apart, so an elastic run on spot nodes is not ended by its losses.
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.cluster.max_failures,
                max_preemption_failures=cfg.cluster.max_preemption_failures,
            ),
            checkpoint_config=Checkpointer(cfg.cluster.checkpoints_to_keep).ray_config(),
            callbacks=callbacks,
        ),
        datasets=data.datasets,
        dataset_config=SplitEvalDataConfig(),
    )


def train_split(cfg: JlstmConfig, parent_run_id: str | None = None) -> SplitResult:
    """Train and evaluate one split; everything lands in one MLflow run.

    What can be checked before Ray starts is (`preflight`, and that an existing run of
    this name logged the same config). The run name is then locked on the cluster
    (one writer), and a run that fails ends FAILED in MLflow.
    """
    checked = preflight(cfg)
    uri = tracking.connect()
    experiment_id = tracking.get_or_create_experiment(cfg.tracking.experiment)
    existing = tracking.find_run(cfg, experiment_id)
    if existing is not None:
        tracking.check_same_config(cfg, existing)
    init_ray()
    with run_lock(cfg.resolved_run_name()), tracking.tracked_run(
        cfg, experiment_id, parent_run_id
    ) as run:
        plan = plan_run(cfg)
        data = prepare_data(cfg, checked)
        digest = tracking.log_run_inputs(cfg, run.run_id, data.model_cfg, data.run)
        callbacks = [EpochLoggerCallback(MlflowEpochLogger(uri, run.run_id))]
        result = build_trainer(cfg, data, plan, callbacks, run.run_id).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"run {cfg.resolved_run_name()!r} ended without a checkpoint")
        check_bad_clips(cfg, run.run_id, result)
        return finish_run(cfg, run.run_id, result.checkpoint, data, digest)


def preflight(cfg: JlstmConfig, *, check_cache: bool = True) -> RunData | None:
    """The data errors that can be known before Ray and MLflow start: no dataset folder
    (ConfigError), too many quarantined videos (BadDataError), and with `check_cache` a
    stale or missing feature cache (StaleCacheError). Returns the data it read, for the
    run to reuse (None when the split is not indexed yet: the run indexes it).

    `jlstm train` runs it as is; sweeps and `jlstm reproduce` with `check_cache=False`,
    since they build a missing cache themselves, once on the driver, before their runs
    start (`jlstm eval` reads the same data with the loaded model's config instead).
    """
    manifest = cfg.data.manifest_path()
    if not manifest.is_file():
        if not Path(cfg.data.root).is_dir():
            raise ConfigError(
                f"data.root = {cfg.data.root!r} ({cfg.data.dataset}) is not a folder and "
                f"there is no manifest at {manifest}: set data.root to the dataset's folder "
                "(--set data.root=...)"
            )
        return None  # indexed when the run starts
    return load_run_data(cfg.data, cfg.clip_spec if check_cache else None)


def check_bad_clips(cfg: JlstmConfig, run_id: str, result: ray.train.Result) -> None:
    """A run the workers stopped because too many training clips failed, or whose
    evaluation could score no test clip: raise BadDataError naming the count, the first
    error and the artifact (the caller marks the MLflow run FAILED)."""
    fraction = result.metrics.get(TRAIN_BAD_FRACTION, 0.0)
    epoch = int(result.metrics["epoch"])
    artifact = f"MLflow run {run_id}, artifact bad_clips/epoch_{epoch:03d}.csv"
    if fraction > cfg.data.max_bad_fraction:
        first = first_bad_clip(result.checkpoint, "train")
        raise BadDataError(
            f"epoch {epoch}: {int(result.metrics[TRAIN_BAD_CLIPS])} training clips "
            f"({fraction:.1%}) failed, more than data.max_bad_fraction = "
            f"{cfg.data.max_bad_fraction}; first: {_describe(first)}. Every failure: "
            f"{artifact}. Fix or remove those videos, re-index (jlstm data index) and re-run"
        )
    check_test_clips_scored(result, f"epoch {epoch}", artifact)


def check_test_clips_scored(result: ray.train.Result, what: str, artifact: str) -> None:
    """BadDataError when the evaluation in `result` could score no test clip at all."""
    if result.metrics.get(VAL_VIDEOS_SCORED, 1) > 0:
        return
    first = first_bad_clip(result.checkpoint, "test")
    if first is None:
        raise BadDataError(
            f"{what}: the test set has no clips: check the split files and the manifest "
            "(jlstm data index)"
        )
    raise BadDataError(
        f"{what}: none of the test clips could be scored ({int(result.metrics[VAL_BAD_CLIPS])}"
        f" failed); first: {_describe(first)}. Every failure: {artifact}. Fix or remove those"
        " videos (or rebuild the feature cache: jlstm data features) and re-run"
    )


def first_bad_clip(checkpoint: ray.train.Checkpoint | None, subset: str) -> dict | None:
    """The first failed clip of `subset` ("train", "test") listed beside a checkpoint."""
    return next((f for f in bad_clips(checkpoint) if f["subset"] == subset), None)


def _describe(clip: dict | None) -> str:
    if clip is None:
        return "(not listed)"
    return f"video {clip['video_id']} at frame {clip['clip_start']}: {clip['error']}"


def finish_run(
    cfg: JlstmConfig, run_id: str, checkpoint: ray.train.Checkpoint, data: PreparedData,
    dataset_digest: str,
) -> SplitResult:
    """Send any epoch MLflow missed; log the last epoch's evaluation, plots and the model;
    move the champion alias among versions of the same dataset digest and split."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    with checkpoint.as_directory() as ckpt_dir:
        state = TrainState.load(Path(ckpt_dir))
        history = state.history
        log_missing_epochs(MlflowEpochLogger(mlflow.get_tracking_uri(), run_id), history)
        final = {k: float(v) for k, v in history[-1].items() if isinstance(v, int | float)}
        if tags.get(tracking.FINISHED_TAG) == str(state.epoch):
            log.info("run %s already finished at epoch %d: nothing to log", run_id, state.epoch)
            tracking.end_run(run_id, "FINISHED")  # start_run marked it RUNNING again
            version = tags.get(tracking.VERSION_TAG)
            return SplitResult(run_id, final, checkpoint.path, version, False)
        client.log_artifacts(run_id, str(Path(ckpt_dir) / EVAL_DIR), "evaluation")
    net = JointAttentionNet(ModelConfig.model_validate(state.model_config))
    net.load_state_dict(state.model)
    with tempfile.TemporaryDirectory() as tmp:
        plots = [plot_loss_curves(
            history, PLOTTED_LOSSES, PLOTTED_ACCURACIES, Path(tmp) / "loss_curves.png"
        )]
        # Videos whose test clips failed (a hang took a whole decode deadline) are skipped.
        failed = {int(f["video_id"]) for f in bad_clips(checkpoint) if f["subset"] == "test"}
        plots += attention_examples(
            net, cfg, data.run.subset("test"), data.class_names, Path(tmp), skip=failed
        )
        for path in plots:
            client.log_artifact(run_id, str(path), "plots")

    version, promoted = None, False
    with mlflow.start_run(run_id=run_id):
        registered = None
        if cfg.tracking.register_model:
            registered = cfg.tracking.registered_model or registry.registered_model_name(
                cfg.data.dataset
            )
        info = registry.log_model(
            net, net.cfg, data.class_names, registered_model_name=registered,
            frame_interval=cfg.data.frame_interval,
            clip_stride=cfg.data.eval_stride_for(net.cfg.clip_len),
        )
        if registered:
            version = str(info.registered_model_version)
            promoted = registry.promote_if_better(
                registered, version, split=cfg.data.split,
                video_top1=final[VIDEO_TOP1_VOTE],
                test_videos=int(final[VAL_VIDEOS_SCORED]),
                dataset_digest=dataset_digest,
            )
            registry.describe_version(client, registered, version, cfg, final, dataset_digest)
            mlflow.set_tag(tracking.VERSION_TAG, version)
        mlflow.set_tag(tracking.FINISHED_TAG, str(state.epoch))
    return SplitResult(run_id, final, checkpoint.path, version, promoted)


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
        client = MlflowClient()
        for key in results[0].metrics:
            if key.startswith(EVAL_PREFIX):
                average = float(np.mean([r.metrics[key] for r in results]))
                client.log_metric(parent.run_id, f"avg_{key}", average)
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
