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
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from data_shards.cluster import init_ray
from data_shards.config import DataConfig
from data_shards.datasets import ClipReader, build_datasets, clip_readers
from data_shards.features import check_cache
from data_shards.index import ensure_index
from data_shards.manifest import (
    BadDataError,
    check_bad_fraction,
    dataset_digest,
    load_manifest,
    subset_videos,
)
from data_shards.splits import class_names
from data_shards.targets import TargetCells, target_reader
from model import JointAttentionNet, ModelConfig
from orchestration import tracking
from orchestration.attention_examples import attention_examples
from orchestration.checkpoint import TrainState
from orchestration.config import ConfigError, JlstmConfig
from orchestration.plots import plot_loss_curves
from orchestration.resources import ResourcePlan
from orchestration.session import plan_run, run_lock, run_storage
from orchestration.train_loop import (
    BAD_CLIPS_FILE,
    EVAL_DIR,
    TRAIN_BAD_FRACTION,
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
    """What a run needs before its trainer starts: manifest, classes, model, datasets."""

    manifest: Path
    class_names: list[str]
    model_cfg: ModelConfig
    datasets: dict[str, ray.data.Dataset]
    readers: dict[str, ClipReader | None]  # what each dataset's consumer applies per batch
    test_videos: int
    targets: TargetCells | None = None  # the moving shape's locations on synthetic data


def prepare_data(cfg: JlstmConfig) -> PreparedData:
    """Index the videos when needed and build the Ray datasets of `cfg.data`."""
    manifest = ensure_index(cfg.data)
    names = class_names(manifest)
    model_cfg = cfg.resolve_model(num_classes=len(names))
    datasets = build_datasets(cfg.data, model_cfg, eval_workers=cfg.cluster.num_workers)
    table = load_manifest(cfg.data)
    targets = target_reader(  # evaluation measures the test videos only
        cfg.data.root, table.filter(pc.equal(table["subset"], "test")), model_cfg.map_size,
        model_cfg.clip_len, cfg.data.frame_interval,
    )
    readers = clip_readers(cfg.data, model_cfg)
    return PreparedData(
        manifest, names, model_cfg, datasets, readers, subset_videos(table, "test"), targets
    )


def finishing_data(cfg: JlstmConfig) -> tuple[PreparedData, str]:
    """What `finish_run` needs for a run whose training ended earlier (a sweep's best
    trial, a run found finished): manifest, classes and model (no dataset is built, none
    is read), and the dataset digest."""
    manifest = ensure_index(cfg.data)
    names = class_names(manifest)
    data = PreparedData(
        manifest, names, cfg.resolve_model(len(names)), datasets={}, readers={}, test_videos=0
    )
    return data, dataset_digest(load_manifest(cfg.data))


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
        system_metrics = {
            "run_id": mlflow_run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
            "driver_node_id": ray.get_runtime_context().get_node_id(),
            "interval_s": cfg.tracking.system_metrics_interval_s,
        }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "model_config": data.model_cfg.model_dump(mode="json"),
            "class_names": data.class_names,
            "test_videos": data.test_videos,
            "readers": data.readers,
            "targets": data.targets,
            "system_metrics": system_metrics,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker=plan.worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.resolved_run_name(),
            storage_path=run_storage(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.cluster.checkpoints_to_keep
            ),
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
    preflight(cfg)
    uri = tracking.connect()
    experiment_id = tracking.get_or_create_experiment(cfg.tracking.experiment)
    existing = tracking.find_run(cfg, experiment_id)
    if existing is not None:
        tracking.check_same_config(cfg, existing)
    init_ray()
    with run_lock(cfg.resolved_run_name()):
        run_id = tracking.start_run(cfg, experiment_id, parent_run_id)
        try:
            plan = plan_run(cfg)
            data = prepare_data(cfg)
            digest = tracking.log_run_inputs(cfg, run_id, data.model_cfg)
            callbacks = [tracking.MlflowEpochLogger(uri, run_id)]
            result = build_trainer(cfg, data, plan, callbacks, run_id).fit()
            if result.checkpoint is None:
                raise RuntimeError(f"run {cfg.resolved_run_name()!r} ended without a checkpoint")
            check_bad_clips(cfg, run_id, result)
            return finish_run(cfg, run_id, result.checkpoint, data, digest)
        except BaseException:
            tracking.end_run(run_id, "FAILED")
            raise


def preflight(cfg: JlstmConfig) -> None:
    """The data errors that can be known before Ray and MLflow start: no dataset folder
    (ConfigError), too many quarantined videos (BadDataError), a stale or missing feature
    cache (StaleCacheError)."""
    manifest = cfg.data.manifest_path()
    if not manifest.is_file():
        if not Path(cfg.data.root).is_dir():
            raise ConfigError(
                f"data.root = {cfg.data.root!r} is not a folder and there is no manifest at "
                f"{manifest}: set data.root to the dataset's folder"
            )
        return  # indexed when the run starts
    table = load_manifest(cfg.data)
    check_bad_fraction(cfg.data, table)
    if cfg.data.use_feature_cache:
        check_cache(cfg.data, cfg.resolve_model(len(class_names(manifest))), table)


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
            f"epoch {epoch}: {int(result.metrics['train_bad_clips'])} training clips "
            f"({fraction:.1%}) failed, more than data.max_bad_fraction = "
            f"{cfg.data.max_bad_fraction}; first: {_describe(first)}. Every failure: "
            f"{artifact}. Fix or remove those videos, re-index (jlstm data index) and re-run"
        )
    check_test_clips_scored(result, f"epoch {epoch}", artifact)


def check_test_clips_scored(result: ray.train.Result, what: str, artifact: str) -> None:
    """BadDataError when the evaluation in `result` could score no test clip at all."""
    if result.metrics.get("val_videos_scored", 1) > 0:
        return
    first = first_bad_clip(result.checkpoint, "test")
    if first is None:
        raise BadDataError(
            f"{what}: the test set has no clips: check the split files and the manifest "
            "(jlstm data index)"
        )
    raise BadDataError(
        f"{what}: none of the test clips could be scored ({int(result.metrics['val_bad_clips'])}"
        f" failed); first: {_describe(first)}. Every failure: {artifact}. Fix or remove those"
        " videos (or rebuild the feature cache: jlstm data features) and re-run"
    )


def first_bad_clip(checkpoint: ray.train.Checkpoint | None, subset: str) -> dict | None:
    """The first failed clip of `subset` ("train", "test") listed beside a checkpoint."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        path = Path(ckpt_dir) / BAD_CLIPS_FILE
        failures = pacsv.read_csv(path).to_pylist() if path.is_file() else []
    return next((f for f in failures if f["subset"] == subset), None)


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
        tracking.log_missing_epochs(run_id, history)
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
        plots = [plot_loss_curves(history, Path(tmp) / "loss_curves.png")]
        plots += attention_examples(net, cfg, data.manifest, data.class_names, Path(tmp))
        for path in plots:
            client.log_artifact(run_id, str(path), "plots")

    version, promoted = None, False
    with mlflow.start_run(run_id=run_id):
        registered = None
        if cfg.tracking.register_model:
            registered = cfg.tracking.registered_model or tracking.registered_model_name(
                cfg.data.dataset
            )
        info = tracking.log_model(
            net, net.cfg, data.class_names, registered_model_name=registered,
            frame_interval=cfg.data.frame_interval,
        )
        if registered:
            version = str(info.registered_model_version)
            promoted = tracking.promote_if_better(
                registered, version, split=cfg.data.split,
                video_top1=final["val_video_top1_vote"],
                test_videos=int(final["val_videos_scored"]),
                dataset_digest=dataset_digest,
            )
            describe_version(client, registered, version, cfg, final, dataset_digest)
            mlflow.set_tag(tracking.VERSION_TAG, version)
        mlflow.set_tag(tracking.FINISHED_TAG, str(state.epoch))
    return SplitResult(run_id, final, checkpoint.path, version, promoted)


def describe_version(
    client: MlflowClient, name: str, version: str, cfg: JlstmConfig, final: dict[str, float],
    digest: str,
) -> None:
    """What a user browsing the registry reads: the model's and the version's description
    (variant, dataset, split, digest, test figures, the predict line)."""
    predict = f"jlstm predict VIDEO --model models:/{name}@{tracking.CHAMPION_ALIAS}"
    client.update_registered_model(name, description=(
        f"jlstm: {cfg.data.dataset} action recognition (Wu et al. 2016, joint attention on "
        f"multi-level deep features); the alias @{tracking.CHAMPION_ALIAS} holds the best "
        f"version on the same split and dataset digest. Predict: `{predict}`"
    ))
    client.update_model_version(name, version, description=(
        f"variant {cfg.variant}, dataset {cfg.data.dataset} split {cfg.data.split} "
        f"(dataset digest {digest}); test video top-1 {final['val_video_top1_vote']:.1%} by "
        f"vote, {final.get('val_video_top1_prob', float('nan')):.1%} by prob, over "
        f"{int(final['val_videos_scored'])} test videos; run {cfg.resolved_run_name()}. "
        f"Predict: `{predict}`"
    ))


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
    parent_id = tracking.start_run(parent_cfg, experiment_id, None)
    try:
        results = [
            train_split(
                cfg.model_copy(update={
                    "data": _with_split(cfg, split),
                    "run_name": f"{cfg.run_name}-split{split}" if cfg.run_name else None,
                }),
                parent_run_id=parent_id,
            )
            for split in splits
        ]
    except BaseException:
        tracking.end_run(parent_id, "FAILED")
        raise
    client = MlflowClient()
    for key in results[0].metrics:
        if key.startswith("val_"):
            average = float(np.mean([r.metrics[key] for r in results]))
            client.log_metric(parent_id, f"avg_{key}", average)
    tracking.end_run(parent_id, "FINISHED")
    return results


def _with_split(cfg: JlstmConfig, split: int) -> DataConfig:
    """The data section for `split`; another split has its own default manifest."""
    if split == cfg.data.split:
        return cfg.data
    return cfg.data.model_copy(update={"split": split, "manifest": None})
