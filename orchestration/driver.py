"""The parts a training run is made of, on the driver: its data (read once, then Ray
datasets), its TorchTrainer, and the checks of what the fit left.

`orchestration.run.Run` puts them in order; nothing else assembles a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from data_shards.clip_spec import ClipSpec
from data_shards.datasets import ClipReader, build_datasets, clip_readers, train_clip_table
from data_shards.errors import BadDataError
from data_shards.index import ensure_index
from data_shards.run_data import RunData, load_run_data
from data_shards.targets import TargetCells, target_reader
from model import ModelConfig
from orchestration import tracking
from orchestration.checkpoint import Checkpointer, bad_clips
from orchestration.config import JlstmConfig
from orchestration.errors import ConfigError
from orchestration.evaluate import test_videos_of
from orchestration.metrics import (
    TRAIN_BAD_CLIPS,
    TRAIN_BAD_FRACTION,
    VAL_BAD_CLIPS,
    VAL_VIDEOS_SCORED,
)
from orchestration.resources import ResourcePlan
from orchestration.session import run_storage
from orchestration.worker import (
    SETUP_KEY,
    SystemMetrics,
    WorkerSetup,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)


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
            mlflow_run_id, tracking.current_uri(), ray.get_runtime_context().get_node_id(),
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


def check_bad_clips(
    cfg: JlstmConfig, run_id: str, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint
) -> None:
    """A run the workers stopped because too many training clips failed, or whose
    evaluation could score no test clip (`metrics`: its last epoch's report): raise
    BadDataError naming the count, the first error and the artifact (the caller marks the
    MLflow run FAILED)."""
    fraction = metrics.get(TRAIN_BAD_FRACTION, 0.0)
    epoch = int(metrics["epoch"])
    artifact = f"MLflow run {run_id}, artifact bad_clips/epoch_{epoch:03d}.csv"
    if fraction > cfg.data.max_bad_fraction:
        first = first_bad_clip(checkpoint, "train")
        raise BadDataError(
            f"epoch {epoch}: {int(metrics[TRAIN_BAD_CLIPS])} training clips "
            f"({fraction:.1%}) failed, more than data.max_bad_fraction = "
            f"{cfg.data.max_bad_fraction}; first: {_describe(first)}. Every failure: "
            f"{artifact}. Fix or remove those videos, re-index (jlstm data index) and re-run"
        )
    check_test_clips_scored(metrics, checkpoint, f"epoch {epoch}", artifact)


def check_test_clips_scored(
    metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None, what: str, artifact: str
) -> None:
    """BadDataError when the evaluation that reported `metrics` (its failed clips listed
    beside `checkpoint`) could score no test clip at all."""
    if metrics.get(VAL_VIDEOS_SCORED, 1) > 0:
        return
    first = first_bad_clip(checkpoint, "test")
    if first is None:
        raise BadDataError(
            f"{what}: the test set has no clips: check the split files and the manifest "
            "(jlstm data index)"
        )
    raise BadDataError(
        f"{what}: none of the test clips could be scored ({int(metrics[VAL_BAD_CLIPS])}"
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
