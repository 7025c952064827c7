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
from model import JointAttentionNet, ModelOutput, clip_scores, normalize_frames
from model.inputs import SOURCES
from model.inputs.sources import normalize_sources
from orchestration.config import TrainConfig
from orchestration.metrics import LOSS_TERMS


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
    ok = ok_rows(rows)
    raw = {k: torch.as_tensor(v, device=device) for k, v in input_arrays(rows).items()}
    labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long, device=device)
    return Batch(
        model_inputs(raw), labels, np.asarray(rows["video_id"]), np.asarray(rows["clip_start"]),
        ok, bad_clips(rows),
    )


def ok_rows(rows: dict[str, np.ndarray]) -> np.ndarray:
    """bool [B]: which rows decoded (or read) fine."""
    return np.asarray(rows.get("ok", np.ones(len(rows["label"]), dtype=bool)), dtype=bool)


def bad_clips(rows: dict[str, np.ndarray]) -> list[BadClip]:
    """The rows that failed to decode or read, with their error."""
    return [
        BadClip(int(rows["video_id"][i]), int(rows["clip_start"][i]), str(rows["error"][i]))
        for i in np.flatnonzero(~ok_rows(rows))
    ]


def input_arrays(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a batch that cross to the device as they are: each cached tap (and a
    uint8 cache's per-channel scales) and each decoded source (uint8 frames, and optical
    flow for a model that reads it)."""
    names = [k for k in rows if k.startswith((TAP_PREFIX, TAP_SCALE_PREFIX)) or k in SOURCES]
    return {k: np.asarray(rows[k]) for k in names}


def model_inputs(raw: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """`input_arrays`, on the device, as the network takes them: float16 taps
    ``{tap: [B, T, 512, K, K]}`` (a uint8 cache's bytes times their scale, multiplied on
    the device so only the bytes cross to it) and normalized sources (`normalize_sources`);
    frames alone as the tensor ``[B, T, 3, S, S]``. Device ops only, so a CUDA graph can
    hold them."""
    if set(raw) == {"frames"}:
        return normalize_frames(raw["frames"])
    inputs = normalize_sources({key: raw[key] for key in SOURCES if key in raw})
    for key, values in raw.items():
        if not key.startswith(TAP_PREFIX):
            continue
        tap = key.removeprefix(TAP_PREFIX)
        scale = raw.get(TAP_SCALE_PREFIX + tap)
        inputs[tap] = (
            values if scale is None
            else (values.float() * scale[:, None, :, None, None]).half()
        )
    return inputs


def build_optimizer(
    net: JointAttentionNet, cfg: TrainConfig, *, graph_device: torch.device | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Optimizer with weight decay zeta on every trained weight, and an epoch-wise LR schedule.

    With `graph_device` (a CUDA device), the optimizer a CUDA graph can hold: fused,
    capturable AdamW whose learning rate is a tensor on that device, which the schedule
    fills in place, so a graph replays the current rate instead of the one at capture.
    """
    groups = net.parameter_groups(cfg.weight_decay)
    if graph_device is not None:
        for group in groups:  # one tensor per group: the schedule fills each
            group["lr"] = torch.tensor(cfg.lr, device=graph_device)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, fused=True, capturable=True
        )
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
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

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    keep_lr_kind(optimizer, scheduler)
    return optimizer, scheduler


# Settings of how an optimizer runs, not of what it computes: a checkpoint's must not
# replace the resumed run's (a graphed run's capturable fused AdamW would slow an eager
# resume; an eager run's foreach AdamW cannot be captured).
RUN_FLAGS = ("capturable", "fused", "foreach", "differentiable")


def restore_optimizer(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    optimizer_state: dict, scheduler_state: dict,
) -> None:
    """Load a checkpoint's optimizer and schedule state into this run's optimizer, keeping
    this run's `RUN_FLAGS`, its kind of learning rate (`keep_lr_kind`) and Adam's step
    counters where this run's kind of optimizer keeps them (on the parameter's device when
    capturable or fused, else on the CPU)."""
    own = [{k: group[k] for k in RUN_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, flags in zip(optimizer.param_groups, own, strict=True):
        group.update(flags)
        on_device = bool(group.get("capturable") or group.get("fused"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                where = param.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(device=where, dtype=torch.float32)
    scheduler.load_state_dict(scheduler_state)
    keep_lr_kind(optimizer, scheduler)


def keep_lr_kind(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    """Each group's learning rate as this optimizer takes it (a tensor on its device for the
    graphed optimizer, else a float) and the schedule's base rates as floats; run after
    restoring a checkpoint, which may come from a run in the other mode (a saved float rate
    would be frozen into a graph; a saved tensor rate slows an eager step down)."""
    graphed = optimizer.defaults.get("capturable", False)
    scheduler.base_lrs = [float(lr) for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key not in group:
                continue
            value = float(group[key])
            if not graphed:
                group[key] = value
            elif isinstance(group[key], torch.Tensor) and group[key].device.type == "cuda":
                group[key].fill_(value)
            else:
                group[key] = torch.tensor(value, device=group["params"][0].device)


def current_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The first group's learning rate now, as a float (a tensor in the graphed optimizer)."""
    return float(scheduler.get_last_lr()[0])


def autocast(device: torch.device, precision: str = "bf16") -> AbstractContextManager:
    """bf16 autocast on CUDA unless `precision` is fp32 (`train.precision`); full precision
    elsewhere (the CPU path serves tests and the demo)."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16"
    )


def train_step(
    net: nn.Module,
    core: JointAttentionNet,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    weight: float = 1.0,
    precision: str = "bf16",
) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
    """One optimizer step on `batch`; returns the output and the loss terms.

    `net` is the DDP-wrapped `core` (or `core` itself on one worker); forward() takes frames
    or a dict of cached taps, so DDP's hooks see both paths.
    """
    with autocast(batch.labels.device, precision):
        out = net(batch.inputs)
        losses = core.losses(out, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    (losses["total"] * weight).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
    optimizer.step()
    return out, losses


class EpochSums:
    """What an epoch's training steps add up, kept on the device: each loss term summed
    over the steps that trained on something, and the clips those steps got right.

    Read once at the end of the epoch (`read`): reading a loss back as a float every step
    made the CPU wait for the GPU every step. A CUDA graph adds to the same tensors.
    """

    KEYS = (*LOSS_TERMS, "correct")

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    def add(
        self, out: ModelOutput, losses: dict[str, torch.Tensor], labels: torch.Tensor,
        core: JointAttentionNet, weights: torch.Tensor | None = None,
        trained: torch.Tensor | None = None,
    ) -> None:
        """Add one step: its loss terms and its correct clips (the rows of weight 1 with
        `weights`); times `trained` (0 or 1, a tensor) when whether the step trained is
        known on the device only."""
        terms = torch.stack([losses[t].detach().double() for t in LOSS_TERMS])
        scores = clip_scores(out.step_logits.detach().float(), core.cfg.last_steps, "prob")
        hits = (scores.argmax(1) == labels).double()
        correct = (hits if weights is None else hits * weights).sum()
        step = torch.cat([terms, correct.view(1)])
        self.totals += step if trained is None else step * trained

    def reset(self) -> None:
        self.totals.zero_()

    def read(self) -> dict[str, float]:
        """The sums as floats (the one wait for the device in an epoch's steps)."""
        return dict(zip(self.KEYS, self.totals.tolist(), strict=True))


class EagerTrainStep:
    """The training step as PyTorch runs it op by op: any batch shape, the clips that failed
    left out. The CPU path, and CUDA with `train.cuda_graphs: off`
    (`orchestration.graphed_step.GraphedTrainStep` is the graphed one; both step a worker's
    batches in `worker.train_epoch`)."""

    graph_replays = 0  # never graphed

    def __init__(
        self, net: nn.Module, core: JointAttentionNet, optimizer: torch.optim.Optimizer,
        grad_clip: float | None, device: torch.device, precision: str = "bf16",
    ) -> None:
        self.net, self.core, self.optimizer = net, core, optimizer
        self.grad_clip, self.device, self.precision = grad_clip, device, precision
        self.sums = EpochSums(device)
        self.last: Batch | None = None

    def step(self, rows: dict[str, np.ndarray], weight: float) -> int:
        """One optimizer step on `rows` (the clips that decoded, weighted `weight`; with
        weight 0 every row, for the all-reduce); the clips it trained on."""
        batch = to_batch(rows, self.device)
        if weight:
            batch = batch.select(batch.ok)
        self.last = batch
        out, losses = train_step(
            self.net, self.core, batch, self.optimizer, self.grad_clip, weight, self.precision
        )
        if not weight:
            return 0
        self.sums.add(out, losses, batch.labels, self.core)
        return len(batch.labels)

    def step_again(self) -> None:
        """The last batch again with weight 0: a rank whose shard ran out still steps."""
        assert self.last is not None, "step_again before any step"
        train_step(
            self.net, self.core, self.last, self.optimizer, self.grad_clip, 0.0, self.precision
        )

    def close(self) -> None:
        """Nothing to release (`GraphedTrainStep.close` has a graph); the same interface."""
        self.last = None
