"""The per-worker training loop that Ray Train runs on every DDP worker.

Read it top to bottom: `train_loop_per_worker` builds the net, restores the last checkpoint
if there is one, then for each epoch trains on this worker's shard (`train_epoch`), scores
this worker's shard of the test clips (`evaluate_shard`: rank 0 gathers them and computes
the metrics), and reports the epoch's metrics with a checkpoint. The helpers follow in
that order; one optimizer step is `orchestration.step.train_step`.

Clips that fail to decode or read are counted on every worker, gathered to rank 0 and
written beside the epoch's checkpoint (`BAD_CLIPS_FILE`, logged to MLflow). When more of an
epoch's training clips failed than `data.max_bad_fraction`, the run reports that epoch and
stops; the driver turns that into a `BadDataError`.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from data_shards.datasets import ClipReader, iter_clip_batches
from data_shards.targets import TargetCells
from model import JointAttentionNet, ModelConfig, clip_scores
from orchestration.checkpoint import TrainState
from orchestration.config import JlstmConfig
from orchestration.evaluate import ClipPredictions, EvalReport, attention_on_target, evaluate
from orchestration.step import BadClip, autocast, build_optimizer, to_batch, train_step

EVAL_DIR = "eval"  # the epoch's evaluation report (metrics, per-class CSV, confusion matrix)
BAD_CLIPS_FILE = "bad_clips.csv"  # subset, video_id, clip_start, error of every failed clip
LOSS_TERMS = ("total", "lstm", "supervision", "attention_reg")
VAL_SECONDS = "val_seconds"
TRAIN_BAD_FRACTION = "train_bad_clip_fraction"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config` holds the validated config, the class names,
    the number of test videos the split has, each dataset's clip reader (cached taps
    are read here, in the worker: `data_shards.datasets.iter_clip_batches`) and, on
    synthetic data, where the moving target is (`targets`, or None)."""
    cfg = JlstmConfig.model_validate(loop_config["config"])
    class_names: list[str] = loop_config["class_names"]
    model_cfg = ModelConfig.model_validate(loop_config["model_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    # On the device before the optimizer exists, so restored optimizer state lands beside it.
    core = JointAttentionNet(model_cfg).to(device)
    optimizer, scheduler = build_optimizer(core, cfg.train)
    start_epoch, best, history = 0, -1.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = TrainState.load(Path(ckpt_dir))
        core.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        _set_rng_state(state.rng[rank % len(state.rng)])
        start_epoch, best, history = state.epoch, state.best_metric, state.history
    net = ray.train.torch.prepare_model(core)
    per_worker_batch = max(1, cfg.train.batch_size // world)
    monitor = _node_system_metrics(loop_config.get("system_metrics"), ctx)

    readers = loop_config["readers"]
    for epoch in range(start_epoch, cfg.train.epochs):
        train_batches = iter_clip_batches(
            ray.train.get_dataset_shard("train"), per_worker_batch, readers["train"]
        )
        metrics, train_failures = train_epoch(
            net, core, train_batches, optimizer, cfg, device
        )
        scheduler.step()
        metrics |= {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]}
        rng_states = _gather_all(_rng_state())
        train_failures = _gather_to_rank0(train_failures)
        # The fraction is all-reduced, so every worker takes the same decision: past
        # max_bad_fraction the epoch is checkpointed with its failed clips and the run stops
        # before evaluation (metrics of a model trained on too few clips would mislead).
        stop = metrics[TRAIN_BAD_FRACTION] > cfg.data.max_bad_fraction
        evaluated = None
        if not stop:
            # Every worker scores its own shard of the test clips; rank 0 gets them all.
            evaluated = evaluate_shard(
                core, device, per_worker_batch, readers["val"], class_names,
                loop_config["test_videos"], loop_config.get("targets"),
            )
            stop = evaluated.clips_scored == 0  # the driver names the first error
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint = None
            if rank == 0:
                test_failures: list[BadClip] = []
                if evaluated is not None:
                    metrics |= evaluated.metrics
                    test_failures = evaluated.failures
                if "val_video_top1_vote" in metrics:
                    best = max(best, metrics["val_video_top1_vote"])
                    metrics["best_val_video_top1_vote"] = best
                history = [*history, metrics]
                TrainState(
                    model=core.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch + 1,
                    rng=rng_states,
                    best_metric=best,
                    history=history,
                    model_config=model_cfg.model_dump(mode="json"),
                    class_names=class_names,
                ).save(Path(tmp))
                if evaluated is not None and evaluated.report is not None:
                    evaluated.report.write(Path(tmp) / EVAL_DIR)
                write_bad_clips(Path(tmp), {"train": train_failures, "test": test_failures})
                report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if stop:
            break
    if monitor is not None:
        monitor.finish()


def train_epoch(
    net: nn.Module,
    core: JointAttentionNet,
    batches: Iterable[dict[str, np.ndarray]],
    optimizer: torch.optim.Optimizer,
    cfg: JlstmConfig,
    device: torch.device,
) -> tuple[dict[str, float], list[BadClip]]:
    """One pass over this worker's batches: loss terms, accuracy, throughput and bad-clip
    counts of all workers, and this worker's failed clips."""
    net.train()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    steps = clips = correct = 0
    failures: list[BadClip] = []
    started = time.perf_counter()
    for rows in batches:
        batch = to_batch(rows, device)
        failures += batch.failures
        # Every worker must step every batch (DDP's all-reduce), so a batch whose clips all
        # failed to decode still runs, with its loss weighted to zero.
        weight = 1.0 if batch.ok.any() else 0.0
        if weight:
            batch = batch.select(batch.ok)
        out, losses = train_step(net, core, batch, optimizer, cfg.train.grad_clip, weight)
        for term in LOSS_TERMS:
            sums[term] += float(losses[term].detach())
        steps += 1
        if weight:
            scores = clip_scores(out.step_logits.detach().float(), core.cfg.last_steps, "prob")
            correct += int((scores.argmax(1) == batch.labels).sum())
            clips += len(batch.labels)
    elapsed = time.perf_counter() - started
    local = {f"loss_{t}": sums[t] / max(steps, 1) for t in LOSS_TERMS}
    local["train_clip_top1"] = correct / max(clips, 1)
    metrics = _all_reduce(local, device, mean=True)
    counts = _all_reduce({"ok": clips, "bad": len(failures)}, device, mean=False)
    metrics["train_clips_per_s"] = counts["ok"] / max(elapsed, 1e-9)
    metrics["train_bad_clips"] = counts["bad"]
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
    core: JointAttentionNet,
    device: torch.device,
    batch_size: int,
    read: ClipReader | None,
    class_names: list[str],
    test_videos: int,
    targets: TargetCells | None = None,
) -> ShardEvaluation:
    """Score this worker's shard of `val`; rank 0 gets the metrics of all the shards.

    Each test clip is in exactly one shard (`SplitEvalDataConfig`), so it is scored once
    whatever the number of workers; `val_worker_clips_min` is the fewest test clips one
    worker scored (0: a worker idled). A test video none of whose clips could be scored is
    counted in `val_videos_unscored` (the metrics cover `val_videos_scored` videos). When
    no clip at all could be scored there are no accuracies, only those counts.
    With `targets` (synthetic data), `val_attention_on_target[_<tap>]` says how strongly
    the attention looks at the moving shape (`evaluate.attention_on_target`).
    """
    started = time.perf_counter()
    batches = iter_clip_batches(ray.train.get_dataset_shard("val"), batch_size, read)
    local, local_failures, local_on_target = predict_clips(core, batches, device, targets)
    scored = int(_all_reduce({"clips": len(local.video_id)}, device, mean=False)["clips"])
    preds = _gather_to_rank0([local])
    failures = _gather_to_rank0(local_failures)
    on_target = _gather_to_rank0(local_on_target)
    if preds is None or failures is None or on_target is None:
        return ShardEvaluation(scored)
    counts = {
        "val_bad_clips": float(len(failures)),
        "val_worker_clips_min": float(min(len(p.video_id) for p in preds)),
    }
    if scored == 0:
        unscored = {"val_videos_scored": 0.0, "val_videos_unscored": float(test_videos)}
        return ShardEvaluation(0, counts | unscored, None, failures)
    merged = ClipPredictions.concat(preds).sorted()
    report = evaluate(merged, class_names)
    out = {f"val_{k}": float(v) for k, v in report.metrics.items()} | counts
    if on_target:  # [clips, branches]: the mean over test clips (and steps) per branch
        per_branch = np.concatenate(on_target).mean(axis=0)
        out |= {f"val_attention_on_target_{tap}": float(v)
                for tap, v in zip(core.cfg.taps, per_branch, strict=True)}
        out["val_attention_on_target"] = float(per_branch.mean())
    videos = len(np.unique(merged.video_id))
    out |= {"val_videos_scored": float(videos), "val_videos_unscored": float(test_videos - videos)}
    # Until the slowest worker's shard is scored and gathered: the evaluation's wall time.
    out[VAL_SECONDS] = time.perf_counter() - started
    return ShardEvaluation(scored, out, report, failures)


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


def write_bad_clips(directory: Path, failures: dict[str, list[BadClip]]) -> None:
    """`BAD_CLIPS_FILE` in `directory` when any clip failed: one row per failed clip."""
    rows = [{"subset": subset, **asdict(f)} for subset, fs in failures.items() for f in fs]
    if rows:
        pacsv.write_csv(pa.Table.from_pylist(rows), directory / BAD_CLIPS_FILE)


def eval_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point of `jlstm eval`: score this worker's shard of the test clips.

    `loop_config` holds the model config, the class names, the number of test videos, the
    test clips' reader and an object ref to the model's state dict (so workers on other
    nodes get it from the object store). Rank 0 gathers every shard and reports the
    metrics with the report files (and the failed clips) as a checkpoint.
    """
    model_cfg = ModelConfig.model_validate(loop_config["model_config"])
    device = ray.train.torch.get_device()
    core = JointAttentionNet(model_cfg)
    core.load_state_dict(ray.get(loop_config["state_ref"]))
    core.to(device)
    evaluated = evaluate_shard(
        core, device, loop_config["batch_size"], loop_config["read"],
        loop_config["class_names"], loop_config["test_videos"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        if ray.train.get_context().get_world_rank() != 0:
            ray.train.report({}, checkpoint=None)
            return
        if evaluated.report is not None:
            evaluated.report.write(Path(tmp) / EVAL_DIR)
        write_bad_clips(Path(tmp), {"test": evaluated.failures})
        ray.train.report(evaluated.metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _all_reduce(values: dict[str, float], device: torch.device, *, mean: bool) -> dict[str, float]:
    """Each value summed (or averaged) over the workers."""
    if not dist.is_initialized():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    scale = dist.get_world_size() if mean else 1
    return {k: float(v) / scale for k, v in zip(keys, tensor.tolist(), strict=True)}


def _gather_all(value: Any) -> list[Any]:
    """Every worker's `value`, in rank order, on every worker."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _gather_to_rank0(items: list[Any]) -> list[Any] | None:
    """Rank 0: every worker's `items`, concatenated in rank order; other ranks: None."""
    if not dist.is_initialized():
        return list(items)
    rank0 = dist.get_rank() == 0
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else None


def _node_system_metrics(settings: dict[str, Any] | None, ctx: Any) -> Any:
    """One MLflow system-metrics monitor per training node (its local rank 0), or None.

    A worker reaches a local SQLite store only on the driver's node, so with one the other
    nodes log none; with a tracking server every node does (`system/node<rank>/...`).
    """
    if not settings or ctx.get_local_rank() != 0:
        return None
    on_driver_node = ray.get_runtime_context().get_node_id() == settings["driver_node_id"]
    if settings["tracking_uri"].startswith("sqlite") and not on_driver_node:
        return None
    from orchestration.tracking import start_system_metrics

    return start_system_metrics(
        settings["run_id"], settings["tracking_uri"], f"node{ctx.get_node_rank()}",
        settings["interval_s"],
    )
