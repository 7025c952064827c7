"""The training step as one CUDA graph (`orchestration.graphed_step`) is the same training.

On the CPU: the switch, the fixed-shape batch (padding rows of weight 0), the weighted
loss, the learning rate kept as each optimizer takes it, a resume that keeps its own
optimizer flags, the capture fallback decided by all ranks together (two gloo ranks), and
the graph's step checked op by op for anything a capture refuses (a value read back, a
tensor made from host data, a data-dependent shape). Marked `gpu` (skipped without CUDA;
`benchmarks/gpu_suite.py` runs them): 20 steps eager and 20 graphed from the same seed,
state and optimizer, in fp32 to tight bounds (losses, parameters, BatchNorm buffers, Adam's
moments) and in bf16 to loose ones, the schedule stepped after the capture; a learning rate
set by the schedule or an input changes what a replay does; padding weights applied in a
replay; the DDP path at world size 1 over NCCL, the graph released before the process group.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
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
    all_ranks_agree,
    fixed_shape_step,
    pad_rows,
    use_cuda_graphs,
)
from orchestration.step import (
    RUN_FLAGS,
    EagerTrainStep,
    EpochSums,
    build_optimizer,
    current_lr,
    input_arrays,
    keep_lr_kind,
    model_inputs,
    ok_rows,
    restore_optimizer,
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


# ---- one decision for every rank, and a resume that keeps its own optimizer ------------

def _agree_on_rank(rank: int, port: int, cases: list[tuple[bool, ...]], out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(cases[0])
    )
    try:
        agreed = [all_ranks_agree(case[rank], CPU) for case in cases]
        Path(out, str(rank)).write_text(",".join(map(str, agreed)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_capture_fallback_is_one_decision_taken_by_every_rank(tmp_path: Path) -> None:
    """Two real ranks (gloo on the CPU): a capture that failed on either one makes both
    step eagerly; only a capture that worked on both is replayed. Without a process group
    the rank's own outcome stands."""
    cases = [(True, True), (True, False), (False, True), (False, False)]
    torch.multiprocessing.spawn(
        _agree_on_rank, args=(_free_port(), cases, str(tmp_path)), nprocs=2, join=True
    )
    expected = ",".join(str(all(case)) for case in cases)
    assert (tmp_path / "0").read_text() == (tmp_path / "1").read_text() == expected
    assert all_ranks_agree(True, CPU) and not all_ranks_agree(False, CPU)


def test_a_resumed_optimizer_keeps_its_own_run_flags_and_step_counters() -> None:
    """A checkpoint from a graphed run (capturable fused AdamW) resumed eagerly, and one
    from an eager run resumed by a fused optimizer: each optimizer keeps the flags its run
    needs, its step counters where it keeps them, and steps."""
    cfg = TrainConfig(lr=0.01, epochs=4)
    saved_net = small_net()
    saved, saved_schedule = build_optimizer(saved_net, cfg)
    for p in saved_net.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    saved.step()
    graphed_state = saved.state_dict()
    for group in graphed_state["param_groups"]:
        group.update(capturable=True, fused=True, foreach=False)

    eager_net = small_net()
    eager, eager_schedule = build_optimizer(eager_net, cfg)
    flags = [{k: g[k] for k in RUN_FLAGS} for g in eager.param_groups]
    restore_optimizer(eager, eager_schedule, graphed_state, saved_schedule.state_dict())
    assert [{k: g[k] for k in RUN_FLAGS} for g in eager.param_groups] == flags
    assert all(not g["capturable"] and not g["fused"] for g in eager.param_groups)
    assert all(type(g["lr"]) is float for g in eager.param_groups)
    for p in eager_net.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    eager.step()  # a capturable optimizer on the CPU would refuse to step
    steps = [s["step"] for s in eager.state.values()]
    assert steps and all(float(step) == 2 and step.device.type == "cpu" for step in steps)

    fused_net = small_net()
    fused = torch.optim.AdamW(fused_net.parameter_groups(cfg.weight_decay), lr=0.01, fused=True)
    fused_schedule = torch.optim.lr_scheduler.LambdaLR(fused, lambda epoch: 1.0)
    restore_optimizer(fused, fused_schedule, saved.state_dict(), fused_schedule.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
    assert all(s["step"].dtype == torch.float32 for s in fused.state.values())


# ---- on a GPU ---------------------------------------------------------------------------
#
# Both sides of every comparison run the same optimizer (fused, capturable AdamW with a
# tensor learning rate), so a difference can only come from the graph; fp32 (train.precision)
# for the strict bounds, bf16 apart with looser ones.

@dataclass
class Trained:
    losses: list[float]  # each step's total loss
    net: JointAttentionNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: Any  # EagerTrainStep | GraphedTrainStep, closed unless keep_open


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _run(
    batches: list[dict[str, np.ndarray]], cfg: TrainConfig, *, graphed: bool, ddp: bool = False,
    schedule_every: int | None = None, keep_open: bool = False,
) -> Trained:
    """Train `small_net` on `batches` from seed 0 with the graph-capable optimizer; with
    `schedule_every`, `scheduler.step()` after every that many steps."""
    device = _device()
    net = small_net().to(device).train()
    optimizer, scheduler = build_optimizer(net, cfg, graph_device=device)
    step: Any = (
        GraphedTrainStep(net, optimizer, cfg, device, len(batches[0]["label"]), ddp=ddp)
        if graphed else EagerTrainStep(net, net, optimizer, cfg.grad_clip, device, cfg.precision)
    )
    torch.manual_seed(0)
    losses = []
    try:
        for i, rows in enumerate(batches):
            step.sums.reset()
            step.step(rows, 1.0)
            losses.append(step.sums.read()["total"])
            if schedule_every and (i + 1) % schedule_every == 0:
                scheduler.step()
    finally:
        if not keep_open:
            step.close()
    return Trained(losses, net, optimizer, scheduler, step)


def _batches(count: int, size: int = 8) -> list[dict[str, np.ndarray]]:
    net = small_net()
    return [_rows(net, size, seed=i) for i in range(count)]


def _first_parting(a: list[float], b: list[float], rtol: float) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True))
                 if abs(x - y) > rtol * max(abs(x), abs(y))), None)


def _assert_same_training(
    a: Trained, b: Trained, *, loss_rtol: float, rtol: float, atol: float
) -> None:
    """Per-step losses within `loss_rtol` (else: the first step where they part), then the
    final parameters and BatchNorm buffers within rtol / atol, each named."""
    parting = _first_parting(a.losses, b.losses, loss_rtol)
    assert parting is None, (
        f"the losses part at step {parting} of {len(a.losses)}: "
        f"{a.losses[parting]} vs {b.losses[parting]}"
    )
    for (name, p), (_, q) in zip(a.net.named_parameters(), b.net.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, x), (_, y) in zip(a.net.named_buffers(), b.net.named_buffers(), strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"buffer {n}: {m}")
        else:  # BatchNorm's num_batches_tracked: the graph counts each replay
            assert torch.equal(x, y), (name, x, y)


@pytest.fixture
def deterministic() -> Any:
    """Deterministic kernels where PyTorch has them (warnings elsewhere), so that two runs
    differ by the graph alone, not by the order of atomic adds."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


EQUIVALENCE_STEPS = 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("deterministic")
def test_graphed_steps_train_as_eager_steps_in_fp32() -> None:
    """20 steps, fp32, the same optimizer: 3 warm-up steps, the capture, 17 replays, and
    the schedule (cosine over 4 epochs) stepped every 5 steps, so a rate changed by
    `scheduler.step()` after the capture must reach the replays. Losses to 1e-3 relative;
    parameters and BatchNorm buffers to 1e-4 relative / 1e-6 absolute."""
    cfg = TrainConfig(lr=1e-3, epochs=4, precision="fp32")
    batches = _batches(EQUIVALENCE_STEPS)
    eager = _run(batches, cfg, graphed=False, schedule_every=5)
    graphed = _run(batches, cfg, graphed=True, schedule_every=5)
    assert graphed.step.graph_replays == EQUIVALENCE_STEPS - WARMUP_STEPS
    assert current_lr(graphed.scheduler) == current_lr(eager.scheduler) < cfg.lr
    assert len(set(np.round(graphed.losses, 6))) > 1  # each replay saw its own batch
    _assert_same_training(eager, graphed, loss_rtol=1e-3, rtol=1e-4, atol=1e-6)
    for p, q in zip(eager.net.parameters(), graphed.net.parameters(), strict=True):
        if not p.requires_grad:  # the frozen backbone: no optimizer state
            continue
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                eager.optimizer.state[p][moment], graphed.optimizer.state[q][moment],
                rtol=1e-4, atol=1e-6,
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_steps_train_as_eager_steps_under_bf16() -> None:
    """The same 20 steps under bf16 autocast (the default precision): bf16's rounding,
    which a few steps of Adam carry into the weights, allows only looser bounds."""
    cfg = TrainConfig(lr=1e-3, epochs=4)
    batches = _batches(EQUIVALENCE_STEPS)
    eager = _run(batches, cfg, graphed=False, schedule_every=5)
    graphed = _run(batches, cfg, graphed=True, schedule_every=5)
    assert graphed.step.graph_replays == EQUIVALENCE_STEPS - WARMUP_STEPS
    _assert_same_training(eager, graphed, loss_rtol=2e-2, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_replay_reads_the_learning_rate_the_schedule_sets_and_new_inputs() -> None:
    """After the capture, `scheduler.step()` to the end of a cosine schedule (rate 0): a
    replay leaves every weight as it was (a rate frozen into the graph would move them);
    a rate set back moves them again; another batch gives another loss."""
    cfg = TrainConfig(lr=1e-3, epochs=1, precision="fp32")
    batches = _batches(WARMUP_STEPS + 4)
    run = _run(batches[:-2], cfg, graphed=True, keep_open=True)
    net, step = run.net, run.step
    try:
        assert step.graph is not None

        def weights() -> list[torch.Tensor]:
            return [p.detach().clone() for p in net.parameters()]

        run.scheduler.step()
        assert current_lr(run.scheduler) == 0.0
        before = weights()
        step.step(batches[-2], 1.0)
        assert all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
        for group in run.optimizer.param_groups:
            group["lr"].fill_(1e-3)
        step.sums.reset()
        step.step(batches[-1], 1.0)
        assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
        first = step.sums.read()["total"]
        step.sums.reset()
        step.step(batches[0], 1.0)
        assert step.sums.read()["total"] != first
        assert step.graph_replays == len(batches) - 2 - WARMUP_STEPS + 3
    finally:
        step.close()
    assert step.graph is None and step.inputs == {}
    with pytest.raises(RuntimeError, match="after close"):
        step.step(batches[0], 1.0)


def _fixed_shape_run(
    steps: list[tuple[dict[str, np.ndarray], np.ndarray]], cfg: TrainConfig
) -> JointAttentionNet:
    """`fixed_shape_step` run eagerly on already padded batches with their row weights."""
    device = _device()
    net = small_net().to(device).train()
    optimizer, _ = build_optimizer(net, cfg, graph_device=device)
    sums = EpochSums(device)
    torch.manual_seed(0)
    for arrays, valid in steps:
        arrays = dict(arrays)
        labels = torch.as_tensor(arrays.pop("label"), device=device)
        inputs = {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}
        fixed_shape_step(net, net, optimizer, cfg.grad_clip, sums, inputs, labels,
                         torch.as_tensor(valid, device=device), torch.tensor(1.0, device=device),
                         cfg.precision)
    return net


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("deterministic")
def test_a_replay_applies_the_padding_rows_weights() -> None:
    """A short batch (5 of 8 rows) and a batch with failed clips, replayed: the weights end
    as eager steps on the same padded rows with the same row weights leave them, and not as
    they would with the padding rows counted (so the replay applied the weights)."""
    cfg = TrainConfig(lr=1e-3, precision="fp32")
    batches = _batches(WARMUP_STEPS + 1)
    net = small_net()
    short = _rows(net, 5, seed=99)
    failed = _rows(net, 8, seed=98) | {"ok": np.array([True, False] * 4),
                                       "error": np.array(["", "bad"] * 4)}
    run = _run(batches, cfg, graphed=True, keep_open=True)
    try:
        assert run.step.step(short, 1.0) == 5 and run.step.step(failed, 1.0) == 4
        assert run.step.graph_replays == 1 + 2
    finally:
        run.step.close()

    def padded(rows: dict[str, np.ndarray], count_padding: bool) -> tuple[dict, np.ndarray]:
        arrays, valid = pad_rows(
            input_arrays(rows) | {"label": np.asarray(rows["label"])}, ok_rows(rows), 8
        )
        return arrays, np.ones_like(valid) if count_padding else valid

    full = [padded(rows, False) for rows in batches]
    weighted = _fixed_shape_run([*full, padded(short, False), padded(failed, False)], cfg)
    counted = _fixed_shape_run([*full, padded(short, True), padded(failed, True)], cfg)
    for p, q in zip(weighted.parameters(), run.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(p, q, rtol=1e-4, atol=1e-6)
               for p, q in zip(counted.parameters(), run.net.parameters(), strict=True)
               if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("deterministic")
def test_the_ddp_path_at_world_size_one_over_nccl() -> None:
    """DDP wrapped on the capture stream, 11 warm-up steps, the all-reduce in the graph.
    NCCL will not put two ranks on one GPU, so world size 1: what stays unverified until
    two GPUs is the all-reduce of two ranks inside replays. The graph is released
    (`close`) before the process group is destroyed (pytorch issue 115388)."""
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
        device_id=_device(),
    )
    try:
        cfg, batches = TrainConfig(lr=1e-3, precision="fp32"), _batches(WARMUP_STEPS_DDP + 4)
        ddp = _run(batches, cfg, graphed=True, ddp=True)  # closed on its way out
        assert ddp.step.graph_replays == 4 and ddp.step.net is not ddp.step.core
        assert ddp.step.graph is None
        plain = _run(batches, cfg, graphed=True)
        _assert_same_training(plain, ddp, loss_rtol=1e-3, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
