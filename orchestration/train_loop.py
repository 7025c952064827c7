"""The per-worker training loop that Ray Train runs on every DDP worker.

Read it top to bottom: build the net, restore the last checkpoint if there is one, then
for each epoch train on this worker's shard, score this worker's shard of the test clips
(rank 0 gathers them and computes the metrics), and report the epoch's metrics with a
checkpoint.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from model import JointAttentionNet, ModelConfig, clip_scores
from orchestration.config import JlstmConfig
from orchestration.evaluate import ClipPredictions, EvalReport, evaluate
from orchestration.step import autocast, build_optimizer, to_batch, train_step

CHECKPOINT_FILE = "state.pt"
EVAL_DIR = "eval"  # the epoch's evaluation report (metrics, per-class CSV, confusion matrix)
LOSS_TERMS = ("total", "lstm", "supervision", "attention_reg")
VAL_SECONDS = "val_seconds"


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
