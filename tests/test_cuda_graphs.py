"""The training step as one CUDA graph (`orchestration.graphed_step`) is the same training.

On the CPU: the switch, the fixed-shape batch (padding rows of weight 0), the weighted
loss, the learning rate kept as each optimizer takes it, and the graph's step checked op by
op for anything a capture refuses (a value read back, a tensor made from host data, a
data-dependent shape). Marked `gpu` (skipped without CUDA; `benchmarks/gpu_suite.py` runs
them): K steps eager and K steps graphed from the same seed and state, compared step by
step; a changed learning rate or input changes what a replay does; the DDP path at world
size 1 over NCCL.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_model import NUM_CLASSES, random_taps, small_net
from torch.utils._python_dispatch import TorchDispatchMode

from model import JointAttentionNet
from orchestration.config import TrainConfig, load_config, validate_config
from orchestration.errors import ConfigError
from orchestration.graphed_step import (
    WARMUP_STEPS,
    WARMUP_STEPS_DDP,
    GraphedTrainStep,
    fixed_shape_step,
    pad_rows,
    use_cuda_graphs,
)
from orchestration.step import (
    EagerTrainStep,
    EpochSums,
    build_optimizer,
    current_lr,
    input_arrays,
    keep_lr_kind,
    model_inputs,
)

CPU = torch.device("cpu")


ON_GPU = {"cluster": {"use_gpu": True}}


def _config(**train: Any) -> dict[str, Any]:
    return {"data": {"dataset": "folder", "root": "."}, "train": train}


def _rows(net: JointAttentionNet, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    taps = random_taps(net, batch=count)
    return {
        **{f"taps_{k}": v.half().numpy() for k, v in taps.items()},
        "label": (np.arange(seed, seed + count) % NUM_CLASSES).astype(np.int64),
        "video_id": np.arange(count), "clip_start": np.zeros(count, np.int64),
    }


# ---- the switch -------------------------------------------------------------------------

def test_auto_is_eager_on_the_cpu_and_on_is_refused_there() -> None:
    assert not use_cuda_graphs(TrainConfig(), CPU)
    assert not use_cuda_graphs(TrainConfig(cuda_graphs="off"), torch.device("cuda"))
    assert use_cuda_graphs(TrainConfig(), torch.device("cuda"))
    assert not use_cuda_graphs(TrainConfig(optimizer="sgd"), torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"cuda_graphs = on, but this worker trains on cpu"):
        use_cuda_graphs(TrainConfig(cuda_graphs="on"), CPU)


def test_cuda_graphs_on_is_checked_with_the_config() -> None:
    with pytest.raises(ConfigError, match=r"cuda_graphs = on needs CUDA: set cluster\.use_gpu"):
        validate_config(_config(cuda_graphs="on"))
    with pytest.raises(ConfigError, match=r"needs train\.optimizer = adamw"):
        validate_config(_config(cuda_graphs="on", optimizer="sgd") | ON_GPU)
    cfg = validate_config(_config(cuda_graphs="on") | ON_GPU)
    assert cfg.train.cuda_graphs == "on"
    with pytest.raises(ConfigError, match="cuda_graphs"):
        validate_config(_config(cuda_graphs="sometimes"))
    # YAML reads a bare on / off as a boolean: `--set train.cuda_graphs=off` as typed.
    off = load_config(Path("configs/demo.yaml"), ["train.cuda_graphs=off"])
    assert off.train.cuda_graphs == "off"
    assert TrainConfig(cuda_graphs=True).cuda_graphs == "on"


# ---- the fixed-shape batch --------------------------------------------------------------

def test_a_full_batch_of_good_clips_is_not_copied() -> None:
    arrays = {"x": np.arange(4), "label": np.arange(4) + 10}
    padded, valid = pad_rows(arrays, np.ones(4, bool), 4)
    assert padded is arrays and valid.tolist() == [1, 1, 1, 1]


def test_a_short_batch_is_padded_with_repeats_of_weight_zero() -> None:
    padded, valid = pad_rows({"x": np.array([5, 6])}, np.ones(2, bool), 5)
    assert padded["x"].tolist() == [5, 6, 5, 6, 5]
    assert valid.tolist() == [1, 1, 0, 0, 0] and valid.dtype == np.float32


def test_failed_clips_leave_the_batch_and_good_ones_fill_it() -> None:
    keep = np.array([True, False, True, False])
    padded, valid = pad_rows({"x": np.array([1, 2, 3, 4])}, keep, 4)
    assert padded["x"].tolist() == [1, 3, 1, 3] and valid.tolist() == [1, 1, 0, 0]


def test_a_batch_with_no_good_clip_still_steps_with_no_weight() -> None:
    padded, valid = pad_rows({"x": np.array([7, 8, 9])}, np.zeros(3, bool), 4)
    assert padded["x"].tolist() == [7, 8, 9, 7] and valid.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="batch of 5 rows is larger than the fixed batch of 4"):
        pad_rows({"x": np.arange(5)}, np.ones(5, bool), 4)


def test_padding_rows_weigh_nothing_in_any_loss_term() -> None:
    """Eval mode (BatchNorm's running statistics: a clip's forward does not depend on its
    batch): the weighted loss of a padded batch is the loss of its real clips."""
    net = small_net().eval()
    rows = _rows(net, 3)
    padded, valid = pad_rows(
        input_arrays(rows) | {"label": rows["label"]}, np.array([True, False, True]), 5
    )  # clips 0, 2, 0, 2, 0: unweighted, clip 0 would count 3 times
    labels = torch.as_tensor(padded.pop("label"))
    real = {k: torch.as_tensor(v[[0, 2]]) for k, v in input_arrays(rows).items()}
    with torch.no_grad():
        expected = net.losses(net(model_inputs(real)), torch.as_tensor(rows["label"][[0, 2]]))
        out = net(model_inputs({k: torch.as_tensor(v) for k, v in padded.items()}))
        weighted = net.losses(out, labels, weights=torch.from_numpy(valid))
        unweighted = net.losses(out, labels)
    for term, value in expected.items():
        torch.testing.assert_close(weighted[term], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unweighted["total"], expected["total"])  # the weights matter
    ones = net.losses(out, labels, weights=torch.ones(5))
    torch.testing.assert_close(ones["total"], unweighted["total"])


# ---- the learning rate as each optimizer takes it ---------------------------------------

def test_a_checkpoints_tensor_learning_rate_becomes_a_float_in_an_eager_optimizer() -> None:
    """A checkpoint of a graphed run holds tensor learning rates; the schedule still drives
    an eager optimizer restored from it (and its base rates stay floats)."""
    cfg = TrainConfig(lr=0.01, epochs=4)
    net = small_net()
    optimizer, scheduler = build_optimizer(net, cfg)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["lr"] = torch.tensor(group["lr"])
    optimizer.load_state_dict(state)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    keep_lr_kind(optimizer, scheduler)
    assert all(type(g["lr"]) is float for g in optimizer.param_groups)
    optimizer.step()  # no gradients: nothing moves, the schedule's order is kept
    scheduler.step()
    assert type(optimizer.param_groups[0]["lr"]) is float
    assert current_lr(scheduler) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi / 4)))


# ---- nothing in the graph's step that a capture refuses ---------------------------------

# Ops that read a value back to the host, make a tensor from host data (a host-to-device
# copy on CUDA) or give a shape that depends on the data: each stops a capture.
CAPTURE_BREAKERS = (
    "aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
    "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.lift_fresh",
    "aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor",
)


class CaptureAudit(TorchDispatchMode):
    """Records every op of the above that runs (and boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.breakers: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        masked = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if masked or name.startswith(CAPTURE_BREAKERS):
            self.breakers.append(name)
        return func(*args, **(kwargs or {}))


def test_the_audit_sees_a_value_read_back() -> None:
    with CaptureAudit() as audit:
        float(torch.ones(2).sum())
        x = torch.arange(4)
        _ = x[x > 1]
    assert any("_local_scalar_dense" in b for b in audit.breakers)
    assert any(b.startswith("aten.index.Tensor") for b in audit.breakers)


@pytest.mark.parametrize("cache_dtype", ["float16", "uint8"])
def test_the_graphed_step_reads_nothing_back_and_makes_no_host_tensor(cache_dtype: str) -> None:
    """`fixed_shape_step` on the CPU, every op audited: model, weighted loss, backward,
    clipping and the epoch's sums. The optimizer here is plain SGD (it syncs nowhere);
    fused capturable AdamW is PyTorch's own capture-safe optimizer, run on the GPU."""
    net = small_net().train()
    rows = _rows(net, 4)
    if cache_dtype == "uint8":  # bytes and per-channel scales, dequantized in the step
        for key in [k for k in rows if k.startswith("taps_")]:
            tap = key.removeprefix("taps_")
            rows[f"tap_scale_{tap}"] = np.full((4, 512), 0.01, np.float32)
            rows[key] = (rows[key] * 100).astype(np.uint8)
    inputs = {k: torch.as_tensor(v) for k, v in input_arrays(rows).items()}
    labels, valid = torch.as_tensor(rows["label"]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    weight, sums = torch.tensor(1.0), EpochSums(CPU)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    with CaptureAudit() as audit:
        fixed_shape_step(net, net, optimizer, 5.0, sums, inputs, labels, valid, weight)
    assert audit.breakers == []
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    assert sums.read()["total"] > 0


def test_the_fixed_shape_step_is_the_eager_step_on_a_full_batch() -> None:
    """One step each from the same weights on the same 4 clips: the same losses, the same
    weights after (fp32 on the CPU: only summation order differs)."""
    rows = _rows(small_net(), 4)
    cfg = TrainConfig(lr=0.01)
    eager_net, fixed_net = small_net(), small_net()
    eager_opt, _ = build_optimizer(eager_net, cfg)
    eager = EagerTrainStep(eager_net, eager_net, eager_opt, cfg.grad_clip, CPU)
    torch.manual_seed(1)
    assert eager.step(rows, 1.0) == 4
    fixed_opt, _ = build_optimizer(fixed_net, cfg)
    sums = EpochSums(CPU)
    torch.manual_seed(1)
    fixed_shape_step(
        fixed_net, fixed_net, fixed_opt, cfg.grad_clip, sums,
        {k: torch.as_tensor(v) for k, v in input_arrays(rows).items()},
        torch.as_tensor(rows["label"]), torch.ones(4), torch.tensor(1.0),
    )
    for key, value in eager.sums.read().items():
        assert sums.read()[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for a, b in zip(eager_net.parameters(), fixed_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- on a GPU ---------------------------------------------------------------------------

def _run(
    batches: list[dict[str, np.ndarray]], cfg: TrainConfig, *, graphed: bool, ddp: bool = False,
    lr_to_zero_at: int | None = None,
) -> tuple[list[float], JointAttentionNet, torch.optim.Optimizer, Any]:
    """Train `small_net` on `batches` from seed 0: each step's total loss, the net, the
    optimizer and the step object."""
    device = torch.device("cuda", torch.cuda.current_device())
    net = small_net().to(device).train()
    optimizer, _ = build_optimizer(net, cfg, graph_device=device if graphed else None)
    step: Any = (
        GraphedTrainStep(net, optimizer, cfg, device, len(batches[0]["label"]), ddp=ddp)
        if graphed else EagerTrainStep(net, net, optimizer, cfg.grad_clip, device)
    )
    torch.manual_seed(0)
    losses = []
    for i, rows in enumerate(batches):
        if i == lr_to_zero_at:
            for group in optimizer.param_groups:
                group["lr"].fill_(0.0) if graphed else group.update(lr=0.0)
        step.sums.reset()
        step.step(rows, 1.0)
        losses.append(step.sums.read()["total"])
    return losses, net, optimizer, step


def _batches(count: int, size: int = 8) -> list[dict[str, np.ndarray]]:
    net = small_net()
    return [_rows(net, size, seed=i) for i in range(count)]


def _assert_same_training(a: list[float], b: list[float], net_a: Any, net_b: Any) -> None:
    # bf16 autocast: the two runs differ by their optimizers' rounding (fused vs foreach
    # AdamW) and by kernel choice, which a few steps of Adam carry into the weights.
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-3)
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_steps_train_as_eager_steps() -> None:
    """K = 12 steps: 3 warm-up steps, the capture, 9 replays; per-step losses, weights and
    Adam's moments as eager's (bf16 tolerances)."""
    cfg, batches = TrainConfig(lr=1e-3), _batches(12)
    eager, eager_net, eager_opt, _ = _run(batches, cfg, graphed=False)
    graphed, graphed_net, graphed_opt, step = _run(batches, cfg, graphed=True)
    assert step.graph_replays == len(batches) - WARMUP_STEPS and step.graph is not None
    assert len(set(np.round(graphed, 6))) > 1  # each replay saw its own batch
    _assert_same_training(eager, graphed, eager_net, graphed_net)
    for p, q in zip(eager_net.parameters(), graphed_net.parameters(), strict=True):
        if not p.requires_grad:  # the frozen backbone: no optimizer state
            continue
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                eager_opt.state[p][moment], graphed_opt.state[q][moment], rtol=5e-2, atol=1e-5
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_replay_reads_the_current_learning_rate_and_inputs() -> None:
    """After the capture: with the learning rate set to 0 a replay leaves every weight as
    it was (a rate frozen into the graph would move them); set back, the next replay moves
    them; another batch gives another loss."""
    cfg, batches = TrainConfig(lr=1e-3), _batches(WARMUP_STEPS + 4)
    _, net, optimizer, step = _run(batches[:-2], cfg, graphed=True)
    assert step.graph is not None

    def weights() -> list[torch.Tensor]:
        return [p.detach().clone() for p in net.parameters()]

    before = weights()
    for group in optimizer.param_groups:
        group["lr"].fill_(0.0)
    step.step(batches[-2], 1.0)
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    for group in optimizer.param_groups:
        group["lr"].fill_(1e-3)
    step.sums.reset()
    step.step(batches[-1], 1.0)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    first = step.sums.read()["total"]
    step.sums.reset()
    step.step(batches[0], 1.0)
    assert step.sums.read()["total"] != first
    assert step.graph_replays == len(batches) - 2 - WARMUP_STEPS + 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_padded_and_failed_batches_replay_the_same_graph() -> None:
    """A short last batch and a batch with failed clips: padded to the fixed shape, they
    replay the captured graph and train on their real clips only."""
    cfg = TrainConfig(lr=1e-3)
    batches = _batches(WARMUP_STEPS + 1)
    net = small_net()
    short = _rows(net, 5, seed=99)
    failed = _rows(net, 8, seed=98) | {"ok": np.array([True, False] * 4),
                                       "error": np.array(["", "bad"] * 4)}
    _, _, _, step = _run(batches, cfg, graphed=True)
    assert step.step(short, 1.0) == 5 and step.step(failed, 1.0) == 4
    step.step_again()
    assert step.graph_replays == 1 + 3
    assert np.isfinite(step.sums.read()["total"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_ddp_path_at_world_size_one_over_nccl() -> None:
    """DDP wrapped on the capture stream, 11 warm-up steps, the all-reduce in the graph.
    NCCL will not put two ranks on one GPU, so world size 1: what stays unverified until
    two GPUs is the all-reduce of two ranks inside replays."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
        device_id=torch.device("cuda", torch.cuda.current_device()),
    )
    try:
        cfg, batches = TrainConfig(lr=1e-3), _batches(WARMUP_STEPS_DDP + 4)
        ddp, ddp_net, _, step = _run(batches, cfg, graphed=True, ddp=True)
        assert step.graph_replays == 4 and step.net is not step.core
        plain, plain_net, _, _ = _run(batches, cfg, graphed=True)
        _assert_same_training(plain, ddp, plain_net, ddp_net)
    finally:
        dist.destroy_process_group()
