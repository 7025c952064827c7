"""The training step captured as one CUDA graph: one launch a step instead of thousands.

Eager PyTorch pays the CPU for every kernel it launches: the paper's step is 5,356 kernels,
and on an H200 the GPU was busy 15% of it at a per-GPU batch of 16
(benchmarks/results/gpu_step_h200_profile.json). A CUDA graph records the step's kernels
once and replays them with one launch. What that asks of the step, and how it is met here:

- Fixed shapes. Every batch is padded to the rank's batch size (`pad_rows`): the clips that
  decoded first, then repeats of them, which weigh 0 in the loss
  (`JointAttentionNet.losses(weights=)`). Only an epoch's last short batch and a batch with
  failed clips are padded. Decision: pad, not drop, so no clip of the epoch goes untrained
  and the steps per epoch stay `batching.steps_per_epoch`. Repeats, not zeros, because
  BatchNorm's batch statistics count the padding rows: repeated clips keep them close to
  those of the real ones; that is the one way a padded step differs from the eager step on
  the unpadded batch.
- Fixed memory. Each batch is copied into input buffers the graph reads; the learning rate
  is a tensor the schedule fills (`step.build_optimizer(graph_device=)`); the epoch's sums
  are tensors the graph adds to (`step.EpochSums`).
- No host sync inside: fused capturable AdamW, `clip_grad_norm_` (no sync unless asked to
  check for non-finite norms), the loss's divisor a tensor, no `.item()`.
- DDP: wrapped here, on the stream the warm-up and the capture run on, and at least 11
  eager steps before the capture (PyTorch's CUDA graphs notes, "Usage with
  DistributedDataParallel": DDP builds its buckets over its first iterations); the
  all-reduce is captured with the rest (NCCL >= 2.9.6). Ray Train runs one GPU per worker.
  Whether to replay is decided by all ranks together (`all_ranks_agree`): a rank whose
  capture failed and fell back to eager alone would leave the others waiting in an
  all-reduce its eager step runs at another point.
- Released explicitly (`close`): a graph holding a captured NCCL all-reduce that is still
  alive when the process group is destroyed makes `destroy_process_group` hang (pytorch
  issue 115388), and a traceback would keep it alive; the worker closes its step when
  training ends, on error too.

The warm-up steps are ordinary training steps on the same buffers, so the run trains the
same steps either way; `graph_replays` counts the steps the graph ran.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model import JointAttentionNet
from orchestration.config import TrainConfig
from orchestration.errors import ConfigError
from orchestration.step import EpochSums, autocast, input_arrays, model_inputs, ok_rows

# Eager steps before the capture: DDP needs 11 (see the module docstring); one worker
# without DDP needs only cuDNN's and cuBLAS's first-call setup out of the way.
WARMUP_STEPS_DDP, WARMUP_STEPS = 11, 3


def use_cuda_graphs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether this worker's training step runs as a CUDA graph (`train.cuda_graphs`)."""
    if cfg.cuda_graphs == "off":
        return False
    if cfg.cuda_graphs == "on" and device.type != "cuda":
        raise ConfigError(
            f"train.cuda_graphs = on, but this worker trains on {device.type}: CUDA graphs "
            "need a CUDA device; set train.cuda_graphs = auto or off"
        )
    return device.type == "cuda" and cfg.optimizer == "adamw"


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """Whether `ok` holds on every rank of the default process group (an all-reduce of
    its minimum on `device`: a CUDA device under NCCL, the CPU under gloo); `ok` itself
    without a process group of more than one rank. Every rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def pad_rows(
    arrays: dict[str, np.ndarray], keep: np.ndarray, size: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`arrays`' rows where `keep`, then repeats of them, `size` rows in all; and `valid`,
    float32 [size]: 1 for those kept rows, 0 for the repeats.

    With no row kept (every clip of the batch failed) the rows stand in as they are, all of
    weight 0: the step still runs, as every rank's must. A full batch with every row kept
    comes back as it is, uncopied.
    """
    rows = len(keep)
    if rows > size:
        raise ValueError(f"a batch of {rows} rows is larger than the fixed batch of {size}")
    index = np.flatnonzero(keep)
    valid = np.zeros(size, dtype=np.float32)
    valid[: len(index)] = 1.0
    if len(index) == rows == size:
        return arrays, valid
    if len(index) == 0:
        index = np.arange(rows)
    take = index[np.arange(size) % len(index)]
    return {k: v[take] for k, v in arrays.items()}, valid


class GraphedTrainStep:
    """A worker's training step as one CUDA graph (the same steps as
    `step.EagerTrainStep`, with the padding rows of `pad_rows`).

    It owns the fixed-shape input buffers, the side stream, the DDP wrapper (`net`, with
    `ddp`) and the graph, captured once after the warm-up steps and replayed for every step
    after, in every epoch of this worker's life. With `train.cuda_graphs: auto` a capture
    that fails leaves the worker training eagerly on the same buffers, with a warning
    (`graph_replays` stays 0); with `on` it is an error.
    """

    def __init__(
        self, core: JointAttentionNet, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
        device: torch.device, batch_size: int, *, ddp: bool,
    ) -> None:
        self.core, self.optimizer, self.cfg = core, optimizer, cfg
        self.device, self.batch_size = device, batch_size
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.net: nn.Module = core
        if ddp:
            with torch.cuda.stream(self.stream):
                self.net = DistributedDataParallel(core, device_ids=[device.index])
        self.warmup_steps = WARMUP_STEPS_DDP if ddp else WARMUP_STEPS
        self.sums = EpochSums(device)
        self.inputs: dict[str, torch.Tensor] = {}  # allocated at the first batch
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, device=device)
        self.weight = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_only = False  # a capture failed under `auto`
        self.eager_steps = 0
        self.graph_replays = 0
        self.closed = False

    def step(self, rows: dict[str, np.ndarray], weight: float) -> int:
        """One optimizer step on `rows` padded to the fixed batch (its clips that decoded
        weigh `weight`); the clips it trained on."""
        arrays = input_arrays(rows) | {"label": np.asarray(rows["label"])}
        padded, valid = pad_rows(arrays, ok_rows(rows), self.batch_size)
        labels = padded.pop("label")
        if not self.inputs:
            self.inputs = {
                k: torch.empty(v.shape, dtype=_torch_dtype(v), device=self.device)
                for k, v in padded.items()
            }
        for key, values in padded.items():
            self.inputs[key].copy_(torch.as_tensor(values))
        self.labels.copy_(torch.as_tensor(labels))
        self.valid.copy_(torch.from_numpy(valid))
        self.weight.fill_(weight)
        self._run()
        return int(valid.sum()) if weight else 0

    def step_again(self, weight: float = 0.0) -> None:
        """The last batch again, weighted `weight`: with 0, a rank whose shard ran out still
        steps (benchmarks/gpu_step.py times the step with 1, its inputs already there)."""
        self.weight.fill_(weight)
        self._run()

    def close(self) -> None:
        """Release the graph (its `reset`) and the input buffers, and wait for the device.
        Call before the process group is destroyed (pytorch issue 115388, module
        docstring) and when the worker's training ends, on error too; no step after."""
        if self.graph is not None:
            torch.cuda.synchronize(self.device)
            self.graph.reset()
            self.graph = None
        self.inputs = {}
        self.closed = True
        torch.cuda.synchronize(self.device)

    def _run(self) -> None:
        if self.closed:
            raise RuntimeError("GraphedTrainStep.step after close()")
        if self.graph is not None:
            self.graph.replay()
            self.graph_replays += 1
        elif self.eager_only or self.eager_steps < self.warmup_steps:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.eager_steps += 1
        else:
            self._capture()
            self._run()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates them
        torch.cuda.synchronize(self.device)
        error: RuntimeError | None = None
        try:
            # thread_local: the clip reader's thread and Ray's may use CUDA meanwhile.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._step()
        except RuntimeError as err:
            error = err
        # Every rank replays, or every rank steps eagerly: decided together.
        if all_ranks_agree(error is None, self.device):
            self.graph = graph
            return
        if error is None:  # captured here, failed on another rank
            graph.reset()
        reason = str(error) if error is not None else "it failed on another rank"
        if self.cfg.cuda_graphs == "on":
            raise RuntimeError(
                f"CUDA graph capture of the training step failed (train.cuda_graphs = on): "
                f"{reason}"
            ) from error
        warnings.warn(
            f"CUDA graph capture of the training step failed, training eagerly "
            f"(train.cuda_graphs = auto): {reason}", stacklevel=2,
        )
        self.eager_only = True
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self) -> None:
        fixed_shape_step(
            self.net, self.core, self.optimizer, self.cfg.grad_clip, self.sums,
            self.inputs, self.labels, self.valid, self.weight, self.cfg.precision,
        )


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype


def fixed_shape_step(
    net: nn.Module, core: JointAttentionNet, optimizer: torch.optim.Optimizer,
    grad_clip: float | None, sums: EpochSums, inputs: dict[str, torch.Tensor],
    labels: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor, precision: str = "bf16",
) -> None:
    """The step that a graph holds, on tensors already on the device: forward, the loss
    over the rows of `valid` weighted `weight` (a 0-dim tensor), backward, clipping, the
    optimizer, the epoch's sums. Device work only: no value is read back, no tensor is made
    from host data (tests/test_cuda_graphs.py checks it op by op on the CPU)."""
    with autocast(labels.device, precision):
        out = net(model_inputs(inputs))
        losses = core.losses(out, labels, weights=valid)
    optimizer.zero_grad(set_to_none=True)
    (losses["total"] * weight).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
    optimizer.step()
    trained = (weight > 0).double() * (valid.sum() > 0).double()
    sums.add(out, losses, labels, core, valid.double(), trained)
