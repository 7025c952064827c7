"""What `data_shards` reads of the model: the clips it cuts, decodes and caches.

The data side needs a few things of the network's config, not the whole of it: a clip's
frames (`frame_size`, `clip_len`), the frozen inputs it caches (`taps`: VGG16's taps, the
flow VGG16's; `map_size`; the backbone's identity, `backbone_weights`), the inputs trained
with the network (`trained`: computed every step from their sources, never cached) and how
optical flow is computed (`flow`, used when an input reads it). Taking only these keeps
what changes a dataset or a cache visible in one place, and lets a caller that holds no
`ModelConfig` (a benchmark, a test) say exactly what it means. The frame interval is the
data's own setting (`DataConfig.frame_interval`), not the model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from model.config import FlowConfig, ModelConfig
from model.inputs import input_kind, reads


@dataclass(frozen=True)
class ClipSpec:
    """A clip as the data side cuts, decodes and caches it (symbols of MODEL_SPEC.md)."""

    frame_size: int  # S: side of the square frames decoded (and fed to VGG16)
    clip_len: int  # T = L1: frames per clip
    taps: tuple[str, ...]  # frozen inputs (`model.inputs`) cached, in the cache files' order
    map_size: int  # K: side of every cached tap
    # The frozen backbone's identity: a torchvision VGG16 state dict, None = random init
    # (seeded by the cache, `model.inputs.RANDOM_INIT_SEED`).
    backbone_weights: str | None = None
    # How optical flow is computed, for inputs that read it (`model.flow`).
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)
    # Inputs trained with the network: their sources are decoded every step.
    trained: tuple[str, ...] = ()

    @classmethod
    def of(cls, model_cfg: ModelConfig) -> ClipSpec:
        """The clip spec of a validated model config (its sizes are checked there)."""
        trained = tuple(n for n in model_cfg.inputs if input_kind(n).trainable)
        return cls(
            frame_size=model_cfg.frame_size,
            clip_len=model_cfg.clip_len,
            taps=tuple(n for n in model_cfg.inputs if n not in trained),
            map_size=model_cfg.map_size,
            backbone_weights=model_cfg.backbone_weights,
            flow=model_cfg.flow,
            trained=trained,
        )

    @property
    def reads_flow(self) -> bool:
        """Whether a decoded clip must carry optical flow (an input reads it)."""
        return reads((*self.taps, *self.trained), "optical_flow")

    def decode_flow(self) -> FlowConfig | None:
        """The flow settings a decode task computes with, or None (no input reads flow)."""
        return self.flow if self.reads_flow else None

    def encoder_config(self) -> ModelConfig:
        """A model config of these taps alone: what the cache's encoders are built from
        (they depend on nothing else of it)."""
        return ModelConfig(
            num_classes=2, frame_size=self.frame_size, clip_len=self.clip_len, last_steps=1,
            inputs=list(self.taps), map_size=self.map_size,
            backbone_weights=self.backbone_weights, flow=self.flow,
        )

    def with_taps(self, taps: Sequence[str]) -> ClipSpec:
        """The same clips with other taps (a cache of more taps serves any subset)."""
        return dataclasses.replace(self, taps=tuple(taps))
