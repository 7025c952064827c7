"""The per-worker training loop that Ray Train runs on every DDP worker.

Read it top to bottom: the driver builds one typed `WorkerSetup`; each worker's
`WorkerTrainer` builds the model, optimizer and checkpointer, restores the last checkpoint
if there is one, then for each epoch trains on this worker's shard (`train_epoch`), scores
this worker's shard of the test clips (`evaluate_shard`: rank 0 gathers them and computes
the metrics), and reports the epoch's metrics with a checkpoint (`epoch_metrics`,
`Checkpointer.save`). The helpers follow in that order; one optimizer step is
`orchestration.step.EagerTrainStep`, or on CUDA `orchestration.graphed_step.GraphedTrainStep`
(the same step captured as one CUDA graph).

Clips that fail to decode or read are counted on every worker, gathered to rank 0 and
saved with the epoch's checkpoint (`checkpoint.Checkpointer`, logged to MLflow). When more
of an epoch's training clips failed than `data.max_bad_fraction`, the run reports that
epoch and stops; the driver turns that into a `BadDataError`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from data_shards.datasets import ClipReader, iter_clip_batches
from data_shards.targets import TargetCells
from model import JointAttentionNet, ModelConfig, clip_scores
from orchestration.batching import rank_batch_sizes, rank_loss_weight, steps_per_epoch
from orchestration.checkpoint import Checkpointer, TrainState
from orchestration.config import JlstmConfig
from orchestration.epoch_logger import start_system_metrics
from orchestration.evaluate import (
    VIDEO_PREDICTIONS_SCHEMA,
    ClipPredictions,
    EvalReport,
    aggregate_videos,
    attention_on_target,
    evaluate,
)
from orchestration.graphed_step import GraphedTrainStep, use_cuda_graphs
from orchestration.metrics import (
    ATTENTION_ON_TARGET,
    LOSS_TERMS,
    TRAIN_BAD_CLIPS,
    TRAIN_BAD_FRACTION,
    TRAIN_CLIP_TOP1,
    TRAIN_CLIPS_PER_S,
    TRAIN_DATA_WAIT_SHARE,
    TRAIN_GLOBAL_BATCH,
    TRAIN_GRAPH_REPLAYS,
    TRAIN_STEPS,
    VAL_BAD_CLIPS,
    VAL_SECONDS,
    VAL_VIDEOS_SCORED,
    VAL_VIDEOS_UNSCORED,
    VAL_WORKER_CLIPS_MIN,
    WORLD_SIZE,
    epoch_metrics,
    eval_metric,
    loss_metric,
)
from orchestration.mlflow_model import error_row, prediction_row
from orchestration.step import (
    BadClip,
    EagerTrainStep,
    autocast,
    bad_clips,
    build_optimizer,
    current_lr,
    ok_rows,
    restore_optimizer,
    to_batch,
)


@dataclass(frozen=True)
class SystemMetrics:
    """Where the training nodes log MLflow's system metrics (CPU, memory, GPU)."""

    run_id: str
    tracking_uri: str
    driver_node_id: str  # a local SQLite store is reachable from this node only
    interval_s: float


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a training worker is given, built once on the driver
    (`TorchTrainer(train_loop_config={SETUP_KEY: setup})`)."""

    config: JlstmConfig
    model_config: ModelConfig  # resolved: the dataset's number of classes
    class_names: list[str]
    test_videos: int  # the split's test videos (a video none of whose clips scored counts)
    train_clips: int  # clips in an epoch: its optimizer steps at any world size (`batching`)
    # What each dataset's consumer applies per batch: reads the cached taps here, in the
    # worker (`data_shards.datasets.iter_clip_batches`), or None for decoded frames.
    readers: dict[str, ClipReader | None]
    targets: TargetCells | None = None  # the moving shape's cells, on synthetic data
    system_metrics: SystemMetrics | None = None
    # video_id -> (video_path, label) of the test videos (`evaluate.test_videos_of`): the
    # evaluation's video_predictions.parquet (None: not written).
    test_video_paths: dict[int, tuple[str, int]] | None = None


SETUP_KEY = "setup"

# One optimizer step on a batch of rows, with the epoch's sums on the device
# (`step.EagerTrainStep`, `graphed_step.GraphedTrainStep`).
TrainStep = EagerTrainStep | GraphedTrainStep


def train_loop_per_worker(loop_config: dict[str, WorkerSetup]) -> None:
    """Ray Train entry point: this worker's `WorkerTrainer`, trained."""
    WorkerTrainer(loop_config[SETUP_KEY]).train()


class WorkerTrainer:
    """One DDP worker's part of a run. It owns the model (`model`), the optimizer and
    schedule, the training step (`train_step`: the model wrapped for DDP, stepped eagerly or
    as a CUDA graph, `train.cuda_graphs`), the clip readers and the checkpointer; `train`
    is the loop, top to bottom."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.cfg = setup.config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # The same initial weights on every rank, whatever the world size (DDP also
        # broadcasts rank 0's); a restored checkpoint replaces them.
        torch.manual_seed(self.cfg.train.seed)
        # On the device before the optimizer exists, so restored optimizer state lands
        # beside it.
        self.model = JointAttentionNet(setup.model_config).to(self.device)
        graphed = use_cuda_graphs(self.cfg.train, self.device)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, self.cfg.train, graph_device=self.device if graphed else None
        )
        self.checkpointer = Checkpointer()
        self.start_epoch, self.best, self.history = 0, -1.0, []
        state = self.checkpointer.restore()
        if state is not None:
            self.model.load_state_dict(state.model)
            # The checkpoint's run may have stepped the other way (graphed or eager).
            restore_optimizer(self.optimizer, self.scheduler, state.optimizer, state.scheduler)
            self.start_epoch, self.best, self.history = (
                state.epoch, state.best_metric, state.history
            )
        # The global batch and the steps per epoch do not depend on the world size, which
        # an elastic run changes between epochs (`orchestration.batching`).
        global_batch = self.cfg.train.batch_size
        self.batch_size = rank_batch_sizes(global_batch, self.world)[self.rank]
        self.loss_weight = rank_loss_weight(global_batch, self.world, self.rank)
        self.steps = steps_per_epoch(setup.train_clips, global_batch)
        # Built once: a graph is captured once and replayed in every epoch after.
        self.train_step: TrainStep
        if graphed:  # wraps DDP itself, on the stream its graph is captured on
            self.train_step = GraphedTrainStep(
                self.model, self.optimizer, self.cfg.train, self.device, self.batch_size,
                ddp=self.world > 1,
            )
        else:
            self.train_step = EagerTrainStep(
                ray.train.torch.prepare_model(self.model), self.model, self.optimizer,
                self.cfg.train.grad_clip, self.device, self.cfg.train.precision,
            )

    def train(self) -> None:
        """Every remaining epoch: train on this worker's shard, score its shard of the test
        clips (rank 0 gathers them), report the metrics with a checkpoint; stop early when
        too many clips failed."""
        monitor = _node_system_metrics(self.setup.system_metrics, ray.train.get_context())
        try:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                if self.run_epoch(epoch + 1):
                    break
        finally:
            # A graph is released here, before Ray Train destroys the process group, on
            # an error too (a traceback would keep it alive).
            self.train_step.close()
        if monitor is not None:
            monitor.finish()

    def run_epoch(self, epoch: int) -> bool:
        """Train, evaluate and checkpoint epoch `epoch` (from 1); whether the run stops."""
        seed_epoch(self.cfg.train.seed, epoch, self.rank)
        readers = self.setup.readers
        train_batches = iter_clip_batches(
            ray.train.get_dataset_shard("train"), self.batch_size, readers["train"]
        )
        train_metrics, train_failures = train_epoch(
            self.train_step, train_batches, self.device,
            steps=self.steps, loss_weight=self.loss_weight,
        )
        train_metrics |= {
            WORLD_SIZE: self.world, TRAIN_GLOBAL_BATCH: self.cfg.train.batch_size,
        }
        self.scheduler.step()
        train_failures = _gather_to_rank0(train_failures)
        # The fraction is all-reduced, so every worker takes the same decision: past
        # max_bad_fraction the epoch is checkpointed with its failed clips and the run stops
        # before evaluation (metrics of a model trained on too few clips would mislead).
        stop = train_metrics[TRAIN_BAD_FRACTION] > self.cfg.data.max_bad_fraction
        evaluated = None
        if not stop:
            # Every worker scores its own shard of the test clips; rank 0 gets them all.
            evaluated = evaluate_shard(
                self.model, self.device, self.batch_size, readers["val"],
                self.setup.class_names, self.setup.test_videos, self.setup.targets,
                self.setup.test_video_paths,
            )
            stop = evaluated.clips_scored == 0  # the driver names the first error
        # Rank 0 holds the evaluation's metrics; the other ranks report training's alone.
        metrics, self.best = epoch_metrics(
            epoch, current_lr(self.scheduler), train_metrics,
            evaluated.metrics if evaluated is not None else None, self.best,
        )
        if self.rank != 0:
            self.checkpointer.save(metrics)
            return stop
        self.history = [*self.history, metrics]
        state = TrainState(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            epoch=epoch,
            best_metric=self.best,
            history=self.history,
            model_config=self.setup.model_config.model_dump(mode="json"),
            class_names=self.setup.class_names,
        )
        test_failures = evaluated.failures if evaluated is not None else []
        report = evaluated.report if evaluated is not None else None
        self.checkpointer.save(
            metrics, state, report, {"train": train_failures, "test": test_failures}
        )
        return stop


def train_epoch(
    step: TrainStep,
    batches: Iterable[dict[str, np.ndarray]],
    device: torch.device,
    *,
    steps: int | None = None,
    loss_weight: float = 1.0,
) -> tuple[dict[str, float], list[BadClip]]:
    """One pass over this worker's batches through `step` (eager or graphed): loss terms,
    accuracy, throughput, steps and bad-clip counts of all workers, and this worker's
    failed clips.

    With `steps`, exactly that many optimizer steps (every rank the same number:
    `orchestration.batching`): past its last batch a rank steps its last batch again with
    a zero weight, and batches beyond `steps` stay unread. `loss_weight`: this rank's
    share of the global batch, times the world size.
    """
    step.net.train()
    step.sums.reset()
    replays_before = step.graph_replays
    taken = trained = clips = 0
    failures: list[BadClip] = []
    waited = 0.0
    started = time.perf_counter()
    rows_iter = iter(batches)
    while steps is None or taken < steps:
        asked = time.perf_counter()
        rows = next(rows_iter, None)
        waited += time.perf_counter() - asked
        if rows is None and (steps is None or taken == 0):
            break  # no more batches (or, on a rank with none at all, none to step again)
        if rows is None:
            step.step_again()  # this rank's share ran out: step with no loss
        else:
            failures += bad_clips(rows)
            # Every worker must step every batch (DDP's all-reduce), so a batch whose clips
            # all failed to decode still runs, with its loss weighted to zero.
            weight = loss_weight if ok_rows(rows).any() else 0.0
            clips += step.step(rows, weight)
            trained += bool(weight)
        taken += 1
    sums = step.sums.read()  # the epoch's one wait for the device
    elapsed = time.perf_counter() - started
    counts = _all_reduce(
        {"ok": clips, "bad": len(failures), "trained": trained, "waited": waited,
         "elapsed": elapsed, **sums},
        device, mean=False,
    )
    # The loss terms: the mean of the batch losses of every rank's steps that trained on
    # something (a zero-weight step's loss is not the model's).
    metrics = {loss_metric(t): counts[t] / max(counts["trained"], 1) for t in LOSS_TERMS}
    metrics[TRAIN_CLIP_TOP1] = counts["correct"] / max(counts["ok"], 1)
    metrics[TRAIN_STEPS] = taken
    metrics[TRAIN_GRAPH_REPLAYS] = step.graph_replays - replays_before
    metrics[TRAIN_CLIPS_PER_S] = counts["ok"] / max(elapsed, 1e-9)
    # The share of the workers' epoch time spent waiting for a batch (all ranks together).
    metrics[TRAIN_DATA_WAIT_SHARE] = counts["waited"] / max(counts["elapsed"], 1e-9)
    metrics[TRAIN_BAD_CLIPS] = counts["bad"]
    metrics[TRAIN_BAD_FRACTION] = counts["bad"] / max(counts["ok"] + counts["bad"], 1)
    return metrics, failures


@dataclass
class ShardEvaluation:
    """What `evaluate_shard` gives each worker: the number of test clips scored by all of
    them (on every rank, so all take the same decision), and on rank 0 the metrics, the
    report (None when no clip could be scored) and every worker's failed clips."""

    clips_scored: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: EvalReport | None = None
    failures: list[BadClip] = field(default_factory=list)


def evaluate_shard(
    model: JointAttentionNet,
    device: torch.device,
    batch_size: int,
    read: ClipReader | None,
    class_names: list[str],
    test_videos: int,
    targets: TargetCells | None = None,
    video_paths: dict[int, tuple[str, int]] | None = None,
) -> ShardEvaluation:
    """Score this worker's shard of `val`; rank 0 gets the metrics of all the shards.

    Each test clip is in exactly one shard (`SplitEvalDataConfig`), so it is scored once
    whatever the number of workers; `val_worker_clips_min` is the fewest test clips one
    worker scored (0: a worker idled). A test video none of whose clips could be scored is
    counted in `val_videos_unscored` (the metrics cover `val_videos_scored` videos). When
    no clip at all could be scored there are no accuracies, only those counts.
    With `targets` (synthetic data), `val_attention_on_target[_<tap>]` says how strongly
    the attention looks at the moving shape (`evaluate.attention_on_target`). With
    `video_paths` the report holds every test video's prediction (`video_predictions`).
    """
    started = time.perf_counter()
    batches = iter_clip_batches(ray.train.get_dataset_shard("val"), batch_size, read)
    local, local_failures, local_on_target = predict_clips(model, batches, device, targets)
    scored = int(_all_reduce({"clips": len(local.video_id)}, device, mean=False)["clips"])
    preds = _gather_to_rank0([local])
    failures = _gather_to_rank0(local_failures)
    on_target = _gather_to_rank0(local_on_target)
    if preds is None or failures is None or on_target is None:
        return ShardEvaluation(scored)
    counts = {
        VAL_BAD_CLIPS: float(len(failures)),
        VAL_WORKER_CLIPS_MIN: float(min(len(p.video_id) for p in preds)),
    }
    if scored == 0:
        unscored = {VAL_VIDEOS_SCORED: 0.0, VAL_VIDEOS_UNSCORED: float(test_videos)}
        return ShardEvaluation(0, counts | unscored, None, failures)
    merged = ClipPredictions.concat(preds).sorted()
    report = evaluate(merged, class_names)
    if video_paths is not None:
        report = replace(report, videos=video_predictions(
            merged, failures, class_names, video_paths, model.cfg.prediction
        ))
    out = {eval_metric(k): float(v) for k, v in report.metrics.items()} | counts
    if on_target:  # [clips, branches]: the mean over test clips (and steps) per branch
        per_branch = np.concatenate(on_target).mean(axis=0)
        out |= {f"{ATTENTION_ON_TARGET}_{tap}": float(v)
                for tap, v in zip(model.cfg.inputs, per_branch, strict=True)}
        out[ATTENTION_ON_TARGET] = float(per_branch.mean())
    videos = len(np.unique(merged.video_id))
    out |= {VAL_VIDEOS_SCORED: float(videos), VAL_VIDEOS_UNSCORED: float(test_videos - videos)}
    # Until the slowest worker's shard is scored and gathered: the evaluation's wall time.
    out[VAL_SECONDS] = time.perf_counter() - started
    return ShardEvaluation(scored, out, report, failures)


def video_predictions(
    preds: ClipPredictions,
    failures: list[BadClip],
    class_names: list[str],
    video_paths: dict[int, tuple[str, int]],
    rule: str,
) -> pa.Table:
    """One row per test video, as `jlstm predict` writes it (`mlflow_model.prediction_row`
    on the video's scores by the model's clip rule `rule`, averaged over its scored clips
    by `model.video.video_scores`), plus `true_label`. A video none of whose clips scored
    gets an error row with its first failed clip's reason; `num_clips` counts the clips
    scored (the failed ones are in bad_clips.csv)."""
    videos = aggregate_videos(preds)
    ids, counts = np.unique(preds.video_id, return_counts=True)
    clips = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    scored = dict(zip(videos.video_id.tolist(), videos.scores(rule), strict=True))
    first_error: dict[int, str] = {}
    for failure in failures:
        first_error.setdefault(int(failure.video_id), failure.error)
    rows = []
    for video_id, (path, label) in sorted(video_paths.items()):
        if video_id in scored:
            row = prediction_row(scored[video_id], clips[video_id], class_names)
        else:
            reason = first_error.get(video_id, "none of its clips reached the evaluation")
            row = error_row(f"no clip of the video could be scored: {reason}")
        rows.append({"video": path, **row, "true_label": class_names[label]})
    return pa.Table.from_pylist(rows, schema=VIDEO_PREDICTIONS_SCHEMA)


@torch.no_grad()
def predict_clips(
    core: JointAttentionNet,
    batches: Iterable[dict[str, np.ndarray]],
    device: torch.device,
    targets: TargetCells | None = None,
) -> tuple[ClipPredictions, list[BadClip], list[np.ndarray]]:
    """Clip scores (vote and prob) for every decodable clip, the clips that failed, and
    with `targets` each scored clip's attention on target per branch ([n, nb] a batch)."""
    core.eval()
    parts: list[ClipPredictions] = []
    failures: list[BadClip] = []
    on_target: list[np.ndarray] = []
    for rows in batches:
        batch = to_batch(rows, device)
        failures += batch.failures
        if not batch.ok.any():
            continue
        batch = batch.select(batch.ok)
        with autocast(device):
            out = core(batch.inputs)
        logits = out.step_logits.float()
        parts.append(
            ClipPredictions(
                video_id=batch.video_ids,
                label=batch.labels.cpu().numpy(),
                scores_vote=clip_scores(logits, core.cfg.last_steps, "vote").cpu().numpy(),
                scores_prob=clip_scores(logits, core.cfg.last_steps, "prob").cpu().numpy(),
            )
        )
        inside = targets(batch.video_ids, batch.clip_starts) if targets else None
        if inside is not None:
            on_target.append(attention_on_target(out.attention.float().cpu().numpy(), inside))
    if not parts:  # a worker whose shard of the test clips came out empty
        parts.append(ClipPredictions.empty(core.cfg.num_classes))
    return ClipPredictions.concat(parts), failures, on_target


@dataclass(frozen=True)
class EvalSetup:
    """What each worker of `jlstm eval` is given (`train_loop_config={SETUP_KEY: setup}`)."""

    model_config: ModelConfig
    class_names: list[str]
    state_ref: Any  # ray.ObjectRef of the state dict: workers on other nodes fetch it
    batch_size: int  # per worker
    read: ClipReader | None  # the test clips' reader (cached taps), or None
    test_videos: int
    # video_id -> (video_path, label) of the test videos: video_predictions.parquet
    test_video_paths: dict[int, tuple[str, int]] | None = None


def eval_loop_per_worker(loop_config: dict[str, EvalSetup]) -> None:
    """Ray Train entry point of `jlstm eval`: score this worker's shard of the test clips;
    rank 0 gathers every shard and reports the metrics with the report files (and the
    failed clips) as a checkpoint."""
    setup = loop_config[SETUP_KEY]
    device = ray.train.torch.get_device()
    model = JointAttentionNet(setup.model_config)
    model.load_state_dict(ray.get(setup.state_ref))
    model.to(device)
    evaluated = evaluate_shard(
        model, device, setup.batch_size, setup.read, setup.class_names, setup.test_videos,
        video_paths=setup.test_video_paths,
    )
    checkpointer = Checkpointer()
    if ray.train.get_context().get_world_rank() != 0:
        checkpointer.save({})
    else:
        checkpointer.save(
            evaluated.metrics, report=evaluated.report, failures={"test": evaluated.failures}
        )


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed this rank's random draws (dropout, ...) for `epoch` from (seed, epoch, rank).

    Nothing random is carried from epoch to epoch, so an epoch draws the same whether the
    run went on, resumed from a checkpoint, or came back at another world size (a rank
    new to the run has no state of its own to restore)."""
    derived = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(derived)
    random.seed(derived)
    np.random.seed(derived)


def _all_reduce(values: dict[str, float], device: torch.device, *, mean: bool) -> dict[str, float]:
    """Each value summed (or averaged) over the workers."""
    if not dist.is_initialized():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    scale = dist.get_world_size() if mean else 1
    return {k: float(v) / scale for k, v in zip(keys, tensor.tolist(), strict=True)}


def _gather_to_rank0(items: list[Any]) -> list[Any] | None:
    """Rank 0: every worker's `items`, concatenated in rank order; other ranks: None."""
    if not dist.is_initialized():
        return list(items)
    rank0 = dist.get_rank() == 0
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else None


def _node_system_metrics(settings: SystemMetrics | None, ctx: Any) -> Any:
    """One MLflow system-metrics monitor per training node (its local rank 0), or None.

    A worker reaches a local SQLite store only on the driver's node, so with one the other
    nodes log none; with a tracking server every node does (`system/node<rank>/...`).
    """
    if settings is None or ctx.get_local_rank() != 0:
        return None
    on_driver_node = ray.get_runtime_context().get_node_id() == settings.driver_node_id
    if settings.tracking_uri.startswith("sqlite") and not on_driver_node:
        return None
    return start_system_metrics(
        settings.run_id, settings.tracking_uri, f"node{ctx.get_node_rank()}",
        settings.interval_s,
    )
