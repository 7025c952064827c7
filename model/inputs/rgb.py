"""VGG16's taps of the RGB frames as inputs (`conv4_3`, `pool4`, `conv5_3`, `pool5`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from model.backbone import VGG16Taps

if TYPE_CHECKING:
    from model.config import ModelConfig


def build_vgg16_taps(names: Sequence[str], cfg: ModelConfig) -> VGG16Taps:
    """One VGG16 up to the deepest of `names`: ``[N, 3, S, S] -> {tap: [N, 512, K, K]}``."""
    return VGG16Taps(names, cfg.map_size, cfg.backbone_weights)
