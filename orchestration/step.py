"""One optimizer step, and what it needs: the batch on the device and the optimizer.

Plain PyTorch, no Ray: the training loop, the evaluation and the GPU benchmark all step
through here, and a machine that only times the model needs torch and pydantic alone.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from data_shards.config import TAP_PREFIX, TAP_SCALE_PREFIX
from model import JointAttentionNet, ModelOutput, normalize_frames
from orchestration.config import TrainConfig


@dataclass(frozen=True)
class BadClip:
    """A clip that could not be decoded or read: which one, and why."""

    video_id: int
    clip_start: int
    error: str


@dataclass
class Batch:
    """One batch on the worker's device: network input, labels, and which rows decoded."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    video_ids: np.ndarray
    clip_starts: np.ndarray
    ok: np.ndarray
    failures: list[BadClip] = field(default_factory=list)

    def select(self, keep: np.ndarray) -> Batch:
        """The rows where `keep` is true."""
        mask = torch.as_tensor(keep, device=self.labels.device)
        inputs = (
            {k: v[mask] for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[mask]
        )
        return Batch(
            inputs, self.labels[mask], self.video_ids[keep], self.clip_starts[keep], self.ok[keep]
        )


def to_batch(rows: dict[str, np.ndarray], device: torch.device) -> Batch:
    """Turn a numpy batch of clip rows (decoded frames or cached taps) into model input."""
    ok = np.asarray(rows.get("ok", np.ones(len(rows["label"]), dtype=bool)), dtype=bool)
    failures = [
        BadClip(int(rows["video_id"][i]), int(rows["clip_start"][i]), str(rows["error"][i]))
        for i in np.flatnonzero(~ok)
    ]
    labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long, device=device)
    taps = [k.removeprefix(TAP_PREFIX) for k in rows if k.startswith(TAP_PREFIX)]
    if taps:
        inputs: torch.Tensor | dict[str, torch.Tensor] = {
            tap: _tap_values(rows, tap, device) for tap in taps
        }
    else:
        frames = torch.as_tensor(np.asarray(rows["frames"]), device=device)
        inputs = normalize_frames(frames)
    return Batch(
        inputs, labels, np.asarray(rows["video_id"]), np.asarray(rows["clip_start"]), ok, failures
    )


def _tap_values(rows: dict[str, np.ndarray], tap: str, device: torch.device) -> torch.Tensor:
    """float16 [B, T, 512, K, K] of one cached tap; a uint8 cache's bytes times their
    per-channel scale, multiplied on `device` so only the bytes cross to it."""
    values = torch.as_tensor(np.asarray(rows[TAP_PREFIX + tap]), device=device)
    if TAP_SCALE_PREFIX + tap not in rows:
        return values
    scale = torch.as_tensor(np.asarray(rows[TAP_SCALE_PREFIX + tap]), device=device)
    return (values.float() * scale[:, None, :, None, None]).half()


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


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere (the CPU path serves tests and the demo)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(
    net: nn.Module,
    core: JointAttentionNet,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    weight: float = 1.0,
) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
    """One optimizer step on `batch`; returns the output and the loss terms.

    `net` is the DDP-wrapped `core` (or `core` itself on one worker); forward() takes frames
    or a dict of cached taps, so DDP's hooks see both paths.
    """
    with autocast(batch.labels.device):
        out = net(batch.inputs)
        losses = core.losses(out, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    (losses["total"] * weight).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
    optimizer.step()
    return out, losses
