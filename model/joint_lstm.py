"""The joint LSTM cell: M inputs, per-input sub-gates, early or late fusion (MODEL_SPEC section 4).

For input k (dimension D_k) and hidden size H::

    i^k = tanh(W_xi^k x^k + W_hi^k h + b_i^k)     (likewise f^k, o^k; all of dimension D_k)
    i = sigmoid(sum_k U_i^k i^k)                  (f from f^k, o from o^k; U^k is H x D_k)
    early: c~ = tanh(sum_k W_xc^k x^k          + W_hc h + b_c)
    late:  c~ = tanh(sum_k W_xc^k (x^k * i^k)  + W_hc h + b_c)
    c' = f * c + i * c~        h' = o * tanh(c')

Two implementations: ``JointLSTMCellReference`` writes the equations out one Linear per
term; ``JointLSTMCell`` computes the same function in a few large matmuls. Both route i^k
through an ``input_subgate`` module, so a forward hook can pin i^k (with i^k == 1 late
fusion is early fusion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Fusion = Literal["early", "late"]
LSTMState = tuple[Tensor, Tensor]
GATES = ("i", "f", "o")


def _check_fusion(fusion: str) -> None:
    if fusion not in ("early", "late"):
        raise ValueError(f"fusion must be 'early' or 'late', got {fusion!r}")


class JointLSTMCellReference(nn.Module):
    """Readable joint LSTM cell: one Linear per term of the equations.

    Args:
        input_sizes: D_1..D_M.
        hidden_size: H.
        fusion: ``early`` or ``late``.

    Shapes: ``forward(xs, (h, c))`` with ``xs[k]: [B, D_k]``, ``h, c: [B, H]`` -> ``(h', c')``.
    """

    def __init__(self, input_sizes: Sequence[int], hidden_size: int, fusion: Fusion) -> None:
        super().__init__()
        _check_fusion(fusion)
        self.input_sizes = list(input_sizes)
        self.hidden_size = hidden_size
        self.fusion = fusion
        sizes = self.input_sizes
        # W_x{g}^k with b_{g}^k, W_h{g}^k, U_{g}^k for g in i, f, o.
        self.sub_x = nn.ModuleDict(
            {g: nn.ModuleList(nn.Linear(d, d) for d in sizes) for g in GATES}
        )
        self.sub_h = nn.ModuleDict(
            {g: nn.ModuleList(nn.Linear(hidden_size, d, bias=False) for d in sizes) for g in GATES}
        )
        self.mix = nn.ModuleDict(
            {g: nn.ModuleList(nn.Linear(d, hidden_size, bias=False) for d in sizes) for g in GATES}
        )
        self.cand_x = nn.ModuleList(nn.Linear(d, hidden_size, bias=False) for d in sizes)
        self.cand_h = nn.Linear(hidden_size, hidden_size)  # W_hc and b_c
        self.input_subgate = nn.Tanh()

    def forward(self, xs: Sequence[Tensor], state: LSTMState) -> LSTMState:
        h, c = state
        sub: dict[str, list[Tensor]] = {}
        for g in GATES:
            act = self.input_subgate if g == "i" else torch.tanh
            sub[g] = [act(self.sub_x[g][k](x) + self.sub_h[g][k](h)) for k, x in enumerate(xs)]
        i, f, o = (
            torch.sigmoid(sum(self.mix[g][k](s) for k, s in enumerate(sub[g]))) for g in GATES
        )
        cand_inputs = (
            xs if self.fusion == "early" else [x * s for x, s in zip(xs, sub["i"], strict=True)]
        )
        candidate = torch.tanh(
            sum(self.cand_x[k](x) for k, x in enumerate(cand_inputs)) + self.cand_h(h)
        )
        c = f * c + i * candidate
        return o * torch.tanh(c), c


class JointLSTMCell(nn.Module):
    """Fast joint LSTM cell, the same function as ``JointLSTMCellReference``.

    Work is split by what depends on h:

    * ``precompute(xs)``: the x terms of the sub-gates (with their biases) and, for early
      fusion, of the candidate, for any leading shape (all T steps at once when the inputs
      are known ahead). One matmul per input: the sub-gate weights are block-diagonal
      across inputs, so a single matmul over the concatenated inputs would stream
      (M-1)/M zeros, and at small batch this cell is bound by reading weights.
    * ``step(x, x_gates, state)``: one ``addmm`` of h against every sub-gate's and the
      candidate's h weights, then the final-gate mix against U kept block-stacked as
      ``[U_i, U_f, U_o, W_xc]: [4, D, H]``, one ``[B, D] @ [D, H]`` product per slot:
      measured on CPU at B=8, H=1024, D=2560 that is a little faster than one ``bmm`` over
      the stack, which must first copy the sub-gates into a stack (the step is bound by
      streaming weights). Late fusion's candidate term ``W_xc (x * i)`` depends on h
      through i^k, so unlike early fusion's it cannot be precomputed: it is the fourth
      slot, a second matmul inside the step.

    Layouts (D = sum_k D_k): sub-gate columns are ``[i^1..i^M | f^1..f^M | o^1..o^M]``,
    so ``x * i`` is one product with the concatenated input; then H candidate columns.
    """

    def __init__(self, input_sizes: Sequence[int], hidden_size: int, fusion: Fusion) -> None:
        super().__init__()
        _check_fusion(fusion)
        self.input_sizes = list(input_sizes)
        self.hidden_size = hidden_size
        self.fusion = fusion
        total = sum(self.input_sizes)
        self.gate_width = 3 * total + hidden_size
        # x -> (i^k, f^k, o^k) of input k, rows gate-major: [3 * D_k, D_k], bias [3 * D_k].
        self.x_weight = nn.ParameterList(
            nn.Parameter(torch.empty(3 * d, d)) for d in self.input_sizes
        )
        self.x_bias = nn.ParameterList(nn.Parameter(torch.empty(3 * d)) for d in self.input_sizes)
        # h -> sub-gates and candidate, stored transposed for addmm: [H, 3D + H].
        self.h_weight = nn.Parameter(torch.empty(hidden_size, self.gate_width))
        self.cand_bias = nn.Parameter(torch.empty(hidden_size))  # b_c
        # [U_i, U_f, U_o, W_xc], each transposed to [D, H].
        self.mix_weight = nn.Parameter(torch.empty(4, total, hidden_size))
        self.input_subgate = nn.Tanh()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(+-1/sqrt(fan_in)) per term, as nn.Linear initializes the reference."""
        hidden = self.hidden_size
        for weight, bias, d in zip(self.x_weight, self.x_bias, self.input_sizes, strict=True):
            nn.init.uniform_(weight, -(d**-0.5), d**-0.5)
            nn.init.uniform_(bias, -(d**-0.5), d**-0.5)
        nn.init.uniform_(self.h_weight, -(hidden**-0.5), hidden**-0.5)
        nn.init.uniform_(self.cand_bias, -(hidden**-0.5), hidden**-0.5)
        with torch.no_grad():
            for k, block in enumerate(self._input_blocks(self.mix_weight)):
                bound = self.input_sizes[k] ** -0.5
                block.uniform_(-bound, bound)

    def _input_blocks(self, tensor: Tensor, dim: int = 1) -> tuple[Tensor, ...]:
        """Split ``tensor`` along ``dim`` into the per-input slices of widths D_k."""
        return tensor.split(self.input_sizes, dim=dim)

    @classmethod
    def from_reference(cls, ref: JointLSTMCellReference) -> JointLSTMCell:
        """A fast cell computing exactly ``ref``'s function (its weights copied)."""
        cell = cls(ref.input_sizes, ref.hidden_size, ref.fusion).to(ref.cand_h.weight)
        with torch.no_grad():
            for k in range(len(cell.input_sizes)):
                cell.x_weight[k].copy_(torch.cat([ref.sub_x[g][k].weight for g in GATES]))
                cell.x_bias[k].copy_(torch.cat([ref.sub_x[g][k].bias for g in GATES]))
            sub_h = [
                torch.cat([ref.sub_h[g][k].weight for k in range(len(cell.input_sizes))])
                for g in GATES
            ]
            cell.h_weight.copy_(torch.cat([*sub_h, ref.cand_h.weight]).t())
            cell.cand_bias.copy_(ref.cand_h.bias)
            for slot, g in enumerate(GATES):
                cell.mix_weight[slot].copy_(torch.cat([m.weight for m in ref.mix[g]], dim=1).t())
            cell.mix_weight[3].copy_(torch.cat([m.weight for m in ref.cand_x], dim=1).t())
        return cell

    def precompute(self, xs: Sequence[Tensor]) -> Tensor:
        """The x terms of every sub-gate and the candidate, biases included.

        ``xs[k]: [..., D_k]`` -> ``[..., 3D + H]``.
        """
        per_input = [
            F.linear(x, w, b).unflatten(-1, (3, d))
            for x, w, b, d in zip(xs, self.x_weight, self.x_bias, self.input_sizes, strict=True)
        ]
        sub_gates = torch.cat(per_input, dim=-1).flatten(-2)  # [..., 3, D] -> gate-major
        if self.fusion == "early":
            candidate = torch.addmm(
                self.cand_bias, torch.cat(list(xs), dim=-1).flatten(0, -2), self.mix_weight[3]
            ).view(*sub_gates.shape[:-1], self.hidden_size)
        else:
            candidate = self.cand_bias.expand(*sub_gates.shape[:-1], self.hidden_size)
        return torch.cat([sub_gates, candidate], dim=-1)

    def step(self, x: Tensor, x_gates: Tensor, state: LSTMState) -> LSTMState:
        """One step given its precomputed x terms.

        Args:
            x: ``[B, D]`` the step's inputs concatenated (read by late fusion only).
            x_gates: ``[B, 3D + H]`` ``precompute(xs)`` at this step.
            state: ``(h, c)``, each ``[B, H]``.
        """
        h, c = state
        total = x.shape[-1]
        gates = torch.addmm(x_gates, h, self.h_weight)
        sub_i = self.input_subgate(gates[:, :total])
        sub_f, sub_o = torch.tanh(gates[:, total : 3 * total]).split(total, dim=1)
        u_i, u_f, u_o, w_xc = self.mix_weight.unbind(0)
        i = torch.sigmoid(sub_i @ u_i)
        f = torch.sigmoid(sub_f @ u_f)
        o = torch.sigmoid(sub_o @ u_o)
        candidate_pre = gates[:, 3 * total :]
        if self.fusion == "late":
            candidate_pre = torch.addmm(candidate_pre, x * sub_i, w_xc)
        c = f * c + i * torch.tanh(candidate_pre)
        return o * torch.tanh(c), c

    def forward(self, xs: Sequence[Tensor], state: LSTMState) -> LSTMState:
        """One step: ``xs[k]: [B, D_k]``, ``(h, c): [B, H]`` -> ``(h', c')``."""
        return self.step(torch.cat(list(xs), dim=-1), self.precompute(xs), state)
