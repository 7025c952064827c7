"""Soft attention driven by the top LSTM layer; spatial-pyramid pooling (MODEL_SPEC sec. 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SoftAttention(nn.Module):
    """att^b_t = softmax_i(W^b_att h_{t-1}), all maps' logits in one matmul.

    ``forward(h: [B, H]) -> [B, num_maps, K*K]``, rows summing to 1.
    """

    def __init__(self, hidden_size: int, num_maps: int, locations: int) -> None:
        super().__init__()
        self.num_maps = num_maps
        self.locations = locations
        self.logits = nn.Linear(hidden_size, num_maps * locations)

    def forward(self, h: Tensor) -> Tensor:
        return self.logits(h).view(-1, self.num_maps, self.locations).softmax(dim=-1)


def pyramid_masks(map_size: int, pyramid: bool) -> Tensor:
    """Membership of each location in each pyramid part: ``[P, K*K]``, P = 5 or 1.

    Parts: full map, then quadrants top-left, top-right, bottom-left, bottom-right. With an
    odd K the middle row and column belong to both halves.
    """
    full = torch.ones(map_size, map_size)
    if not pyramid:
        return full.flatten().unsqueeze(0)
    first_half = torch.arange(map_size) < (map_size + 1) // 2
    second_half = torch.arange(map_size) >= map_size // 2
    quadrants = [
        (rows[:, None] & cols[None, :]).float()
        for rows in (first_half, second_half)
        for cols in (first_half, second_half)
    ]
    return torch.stack([full, *quadrants]).flatten(1)


class SpatialPyramid(nn.Module):
    """x_part = sum_{i in part} att_i Y_i / sum_{i in part} att_i, parts concatenated.

    ``forward(attention: [B, nb, K*K], maps: [B, nb, K*K, C]) -> [B, nb, P*C]``.
    """

    def __init__(self, map_size: int, pyramid: bool) -> None:
        super().__init__()
        self.register_buffer("masks", pyramid_masks(map_size, pyramid), persistent=False)
        self.num_parts = self.masks.shape[0]

    def forward(self, attention: Tensor, maps: Tensor) -> Tensor:
        weights = attention.unsqueeze(-2) * self.masks.to(attention.dtype)  # [B, nb, P, K*K]
        # Softmax weights are positive; the floor only guards underflow in a far quadrant.
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(weights.dtype).tiny
        )
        return torch.matmul(weights, maps).flatten(-2)
