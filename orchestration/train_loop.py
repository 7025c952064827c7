"""The per-worker training loop that Ray Train runs on every DDP worker.

Read it top to bottom: build the net, restore the last checkpoint if there is one, then
for each epoch train on this worker's shard, score this worker's shard of the test clips
(rank 0 gathers them and computes the metrics), and report the epoch's metrics with a
checkpoint.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from model import JointAttentionNet, ModelConfig, ModelOutput, clip_scores, normalize_frames
from orchestration.config import JlstmConfig, TrainConfig
from orchestration.evaluate import ClipPredictions, EvalReport, evaluate

CHECKPOINT_FILE = "state.pt"
EVAL_DIR = "eval"  # the epoch's evaluation report (metrics, per-class CSV, confusion matrix)
TAP_PREFIX = "taps_"
LOSS_TERMS = ("total", "lstm", "supervision", "attention_reg")
VAL_SECONDS = "val_seconds"


@dataclass
class Batch:
    """One batch on the worker's device: network input, labels, and which rows decoded."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    video_ids: np.ndarray
    ok: np.ndarray
    errors: list[str] = field(default_factory=list)

    def select(self, keep: np.ndarray) -> Batch:
        """The rows where `keep` is true."""
        mask = torch.as_tensor(keep, device=self.labels.device)
        inputs = (
            {k: v[mask] for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[mask]
        )
        return Batch(inputs, self.labels[mask], self.video_ids[keep], self.ok[keep])


def to_batch(rows: dict[str, np.ndarray], device: torch.device) -> Batch:
    """Turn a numpy batch of clip rows (decoded frames or cached taps) into model input."""
    ok = np.asarray(rows.get("ok", np.ones(len(rows["label"]), dtype=bool)), dtype=bool)
    errors = [str(e) for e, good in zip(rows.get("error", []), ok, strict=False) if not good]
    labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long, device=device)
    tap_columns = [k for k in rows if k.startswith(TAP_PREFIX)]
    if tap_columns:
        inputs: torch.Tensor | dict[str, torch.Tensor] = {
            k.removeprefix(TAP_PREFIX): torch.as_tensor(np.asarray(rows[k]), device=device)
            for k in tap_columns
        }
    else:
        frames = torch.as_tensor(np.asarray(rows["frames"]), device=device)
        inputs = normalize_frames(frames)
    return Batch(inputs, labels, np.asarray(rows["video_id"]), ok, errors)


def build_optimizer(
    net: JointAttentionNet, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Optimizer with weight decay zeta on every trained weight, and an epoch-wise LR schedule."""
    groups = net.parameter_groups(cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum
        )
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / (cfg.warmup_epochs + 1)
        if cfg.lr_schedule == "cosine":
            progress = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "step":
            return 0.1 ** (epoch // cfg.step_size)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_state(path: Path, **state: Any) -> None:
    torch.save(state, path / CHECKPOINT_FILE)


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state on the CPU (the optimizer moves its part to the params' device)."""
    return torch.load(path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, tensor.tolist(), strict=True)}


def _batches(shard: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False)


def train_step(
    net: nn.Module,
    core: JointAttentionNet,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    weight: float = 1.0,
) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
    """One optimizer step on `batch` (bf16 autocast on GPU); returns the output and losses.

    `net` is the DDP-wrapped `core` (or `core` itself on one worker).
    """
    device = batch.labels.device
    # forward() takes frames or a dict of cached taps, so DDP's hooks see both paths.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(batch.inputs)
        losses = core.losses(out, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    (losses["total"] * weight).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
    optimizer.step()
    return out, losses


def train_epoch(
    net: nn.Module,
    core: JointAttentionNet,
    shard: Any,
    optimizer: torch.optim.Optimizer,
    cfg: JlstmConfig,
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """One pass over this worker's shard; returns loss terms, accuracy and throughput."""
    net.train()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    steps = clips = correct = bad = 0
    started = time.perf_counter()
    for rows in _batches(shard, batch_size):
        batch = to_batch(rows, device)
        bad += int((~batch.ok).sum())
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
    metrics = _all_reduce_mean(local, device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    metrics["train_clips_per_s"] = clips / max(elapsed, 1e-9) * world
    metrics["bad_clips"] = float(bad * world)
    return metrics


@torch.no_grad()
def predict_clips(
    core: JointAttentionNet, batches: Any, device: torch.device, batch_size: int
) -> tuple[ClipPredictions, list[str]]:
    """Clip scores (vote and prob) for every decodable clip; errors of the ones that failed."""
    core.eval()
    parts: list[ClipPredictions] = []
    errors: list[str] = []
    for rows in _batches(batches, batch_size):
        batch = to_batch(rows, device)
        errors.extend(batch.errors)
        if not batch.ok.any():
            continue
        batch = batch.select(batch.ok)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
    if not parts:  # a worker whose shard of the test clips came out empty
        parts.append(ClipPredictions.empty(core.cfg.num_classes))
    return ClipPredictions.concat(parts), errors


def gather_predictions(
    preds: ClipPredictions, errors: list[str]
) -> tuple[ClipPredictions, list[str]] | None:
    """Rank 0: every worker's clip predictions and errors, ordered by video.

    Other ranks return None. Sorting makes the video averages independent of which worker
    scored which clip, so 1 and N workers report the same metrics.
    """
    if not dist.is_initialized():
        gathered = [(preds, errors)]
    else:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((preds, errors), gathered, dst=0)
        if dist.get_rank() != 0:
            return None
    merged = ClipPredictions.concat([p for p, _ in gathered]).sorted()
    return merged, [e for _, errs in gathered for e in errs]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config` holds the validated config and the class names."""
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
            state = load_state(Path(ckpt_dir))
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank % len(state["rng"])])
        start_epoch, best, history = state["epoch"], state["best_metric"], state["history"]
    net = ray.train.torch.prepare_model(core)
    per_worker_batch = max(1, cfg.train.batch_size // world)
    monitor = _node_system_metrics(loop_config.get("system_metrics"), ctx)

    for epoch in range(start_epoch, cfg.train.epochs):
        metrics = train_epoch(
            net, core, ray.train.get_dataset_shard("train"), optimizer, cfg, device,
            per_worker_batch,
        )
        scheduler.step()
        metrics |= {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]}
        rng_states = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(rng_states, _rng_state())
        else:
            rng_states = [_rng_state()]
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint = None
            # Every worker scores its own shard of the test clips; rank 0 gets them all.
            evaluated = evaluate_shard(core, device, per_worker_batch, class_names)
            if evaluated is not None:
                val_metrics, report = evaluated
                metrics |= val_metrics
                best = max(best, metrics["val_video_top1_vote"])
                metrics["best_val_video_top1_vote"] = best
                history = [*history, metrics]
                save_state(
                    Path(tmp),
                    model=core.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch + 1,
                    rng=rng_states,
                    best_metric=best,
                    history=history,
                    model_config=model_cfg.model_dump(mode="json"),
                    class_names=class_names,
                )
                report.write(Path(tmp) / EVAL_DIR)
                report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=report_checkpoint)
    if monitor is not None:
        monitor.finish()


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


def evaluate_shard(
    core: JointAttentionNet, device: torch.device, batch_size: int, class_names: list[str]
) -> tuple[dict[str, float], EvalReport] | None:
    """Score this worker's shard of `val`; rank 0 returns the metrics of all the shards.

    Each test clip is in exactly one shard (`SplitEvalDataConfig`), so it is scored once
    whatever the number of workers.
    """
    started = time.perf_counter()
    shard = ray.train.get_dataset_shard("val")
    gathered = gather_predictions(*predict_clips(core, shard, device, batch_size))
    if gathered is None:
        return None
    preds, errors = gathered
    report = evaluate(preds, class_names)
    out = {f"val_{k}": float(v) for k, v in report.metrics.items()}
    out["val_bad_clips"] = float(len(errors))
    # Until the slowest worker's shard is scored and gathered: the evaluation's wall time.
    out[VAL_SECONDS] = time.perf_counter() - started
    return out, report


def eval_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point of `jlstm eval`: score this worker's shard of the test clips.

    `loop_config` holds the model config, the class names and an object ref to the model's
    state dict (so workers on other nodes get it from the object store). Rank 0 gathers
    every shard and reports the metrics with the report files as a checkpoint.
    """
    model_cfg = ModelConfig.model_validate(loop_config["model_config"])
    device = ray.train.torch.get_device()
    core = JointAttentionNet(model_cfg)
    core.load_state_dict(ray.get(loop_config["state_ref"]))
    core.to(device)
    evaluated = evaluate_shard(
        core, device, loop_config["batch_size"], loop_config["class_names"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        if evaluated is None:
            ray.train.report({}, checkpoint=None)
            return
        metrics, report = evaluated
        report.write(Path(tmp) / EVAL_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
