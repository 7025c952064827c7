"""What `data_shards` reads of the model: the clips it cuts, decodes and caches.

The data side needs five things of the network's config, not the whole of it: a clip's
frames (`frame_size`, `clip_len`) and the frozen taps it caches (`taps`, `map_size`, and
the backbone's identity, `backbone_weights`). Taking only these keeps what changes a
dataset or a cache visible in one place, and lets a caller that holds no `ModelConfig`
(a benchmark, a test) say exactly what it means. The frame interval is the data's own
setting (`DataConfig.frame_interval`), not the model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the spec is read off a model config; building one needs no import
    from model.config import ModelConfig


@dataclass(frozen=True)
class ClipSpec:
    """A clip as the data side cuts, decodes and caches it (symbols of MODEL_SPEC.md)."""

    frame_size: int  # S: side of the square frames decoded (and fed to VGG16)
    clip_len: int  # T = L1: frames per clip
    taps: tuple[str, ...]  # VGG16 layers cached, in the cache files' order
    map_size: int  # K: side of every cached tap
    # The frozen backbone's identity: a torchvision VGG16 state dict, None = random init
    # (seeded by the cache, `features.RANDOM_INIT_SEED`).
    backbone_weights: str | None = None

    @classmethod
    def of(cls, model_cfg: ModelConfig) -> ClipSpec:
        """The clip spec of a validated model config (its sizes are checked there)."""
        return cls(
            frame_size=model_cfg.frame_size,
            clip_len=model_cfg.clip_len,
            taps=tuple(model_cfg.taps),
            map_size=model_cfg.map_size,
            backbone_weights=model_cfg.backbone_weights,
        )

    def with_taps(self, taps: Sequence[str]) -> ClipSpec:
        """The same clips with other taps (a cache of more taps serves any subset)."""
        return dataclasses.replace(self, taps=tuple(taps))
