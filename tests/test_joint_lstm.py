"""The fast joint LSTM cell against the plain reference, and early vs late fusion."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from model.joint_lstm import JointLSTMCell, JointLSTMCellReference

HIDDEN = 12
BATCH = 3
STEPS = 5


def random_inputs(input_sizes: list[int], steps: int = STEPS) -> list[Tensor]:
    return [torch.randn(steps, BATCH, d) for d in input_sizes]


def random_state() -> tuple[Tensor, Tensor]:
    return torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)


def unroll(cell: nn.Module, xs: list[Tensor], state: tuple[Tensor, Tensor]) -> Tensor:
    """h at every step, ``[T, B, H]``, stepping ``cell(xs_t, state)``."""
    hs = []
    for t in range(xs[0].shape[0]):
        state = cell([x[t] for x in xs], state)
        hs.append(state[0])
    return torch.stack(hs)


@contextmanager
def input_subgates_pinned_to_one(cell: nn.Module) -> Iterator[None]:
    """Force every i^k to 1 by replacing the output of the cell's input sub-gate."""
    handle = cell.input_subgate.register_forward_hook(lambda _m, _i, out: torch.ones_like(out))
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("input_sizes", [[7], [5, 9]], ids=["M1", "M2"])
def test_fast_cell_matches_reference(fusion: str, input_sizes: list[int]) -> None:
    torch.manual_seed(0)
    reference = JointLSTMCellReference(input_sizes, HIDDEN, fusion)
    fast = JointLSTMCell.from_reference(reference)
    xs, state = random_inputs(input_sizes), random_state()

    expected = unroll(reference, xs, state)
    torch.testing.assert_close(unroll(fast, xs, state), expected, atol=1e-5, rtol=0)

    # The precompute-all-steps path (inputs known ahead) is the same function.
    x_gates, x_all = fast.precompute(xs), torch.cat(xs, dim=-1)
    hs = []
    for t in range(STEPS):
        state = fast.step(x_all[t], x_gates[t], state)
        hs.append(state[0])
    torch.testing.assert_close(torch.stack(hs), expected, atol=1e-5, rtol=0)


def test_fast_cell_gradients_match_reference() -> None:
    torch.manual_seed(1)
    reference = JointLSTMCellReference([4, 6], HIDDEN, "late")
    fast = JointLSTMCell.from_reference(reference)
    xs = [x.requires_grad_() for x in random_inputs([4, 6])]
    state = random_state()
    grads = [
        torch.autograd.grad(unroll(cell, xs, state).square().sum(), xs)
        for cell in (reference, fast)
    ]
    for ref_grad, fast_grad in zip(*grads, strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell_type", [JointLSTMCellReference, JointLSTMCell])
def test_late_fusion_is_early_fusion_when_input_subgates_are_one(cell_type: type) -> None:
    torch.manual_seed(2)
    late = cell_type([5, 9], HIDDEN, "late")
    early = cell_type([5, 9], HIDDEN, "early")
    early.load_state_dict(late.state_dict())  # both fusions share every weight
    xs, state = random_inputs([5, 9]), random_state()

    assert (unroll(late, xs, state) - unroll(early, xs, state)).abs().max() > 1e-3
    with input_subgates_pinned_to_one(late), input_subgates_pinned_to_one(early):
        torch.testing.assert_close(unroll(late, xs, state), unroll(early, xs, state))


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion"):
        JointLSTMCell([4], HIDDEN, "middle")  # type: ignore[arg-type]
