"""The one validated configuration of the network, and the paper's named variants.

Symbols follow MODEL_SPEC.md: S frame_size, T (L1) clip_len, L2 last_steps, C channels,
K map_size, H hidden_size, N num_layers, F supervision_hidden, lambda attention_reg_weight,
alpha supervision_weight.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TapName = Literal["conv4_3", "pool4", "conv5_3", "pool5"]

# How many 2x2 max-pools of VGG16 precede each tap: its side is frame_size // 2**n.
TAP_POOLS: dict[str, int] = {"conv4_3": 3, "pool4": 4, "conv5_3": 4, "pool5": 5}


def tap_side(tap: str, frame_size: int) -> int:
    """Side of a VGG16 tap's feature map for square frames of side ``frame_size``."""
    return frame_size // 2 ** TAP_POOLS[tap]


class ModelConfig(BaseModel):
    """Everything that defines a JointAttentionNet; a saved dump rebuilds the same network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_classes: int = Field(ge=2)
    frame_size: int = Field(384, ge=32, description="S: side of the square frames fed to VGG16")
    clip_len: int = Field(30, ge=1, description="T = L1: frames per clip")
    last_steps: int = Field(16, ge=1, description="L2: last steps averaged into a clip score")
    taps: list[TapName] = Field(
        default_factory=lambda: ["pool4", "conv5_3"], description="VGG16 layers, one branch each"
    )
    channels: int = Field(256, ge=1, description="C: channels of a branch after its adapter")
    map_size: int = Field(11, ge=1, description="K: side of every branch's map (K*K locations)")
    hidden_size: int = Field(1024, ge=1, description="H")
    num_layers: int = Field(3, ge=1, description="N: LSTM layers, the first one joint")
    supervision_hidden: int = Field(512, ge=1, description="F: deep supervision head width")
    fusion: Literal["early", "late"] = "late"
    temporal: Literal["conv3d", "conv2d", "none"] = "conv3d"
    attention: Literal["per_branch", "shared"] = "per_branch"
    pyramid: bool = True
    joint_inputs: bool = Field(
        True, description="False: one plain LSTM input (branches concatenated), the baseline"
    )
    init_state: Literal["zeros", "mean"] = "mean"
    backbone: Literal["frozen", "finetune"] = "frozen"
    backbone_weights: str | None = Field(
        None, description="local path to a torchvision VGG16 state dict; None = random init"
    )
    conv3d_grad_from_lstm: bool = True
    center_taps: bool = Field(
        False,
        description="subtract each clip's temporal mean from the taps before the adapter: "
        "leaves only what changes over time (for a random, untrained backbone)",
    )
    attention_reg_weight: float = Field(1000.0, ge=0.0, description="lambda")
    attention_reg_maps: Literal["output", "input"] = Field(
        "output",
        description="whose activity map R compares with the attention: the temporal "
        "convnet's output Y (the paper's text) or its input X (the paper's formula)",
    )
    attention_reg_grad: Literal["conv", "attention", "conv_and_attention"] = Field(
        "conv",
        description="what R trains: the temporal convnet toward the attention (the paper), "
        "the attention toward the convnet's activity map, or both",
    )
    supervision_weight: float = Field(1.0, ge=0.0, description="alpha")
    prediction: Literal["vote", "prob"] = "vote"

    @field_validator("taps")
    @classmethod
    def _taps_nonempty_unique(cls, taps: list[str]) -> list[str]:
        if not taps:
            raise ValueError("taps must name at least one VGG16 layer")
        if len(set(taps)) != len(taps):
            raise ValueError(f"taps must be unique, got {taps}")
        return taps

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        if self.last_steps > self.clip_len:
            raise ValueError(
                f"last_steps = {self.last_steps} must be <= clip_len = {self.clip_len}"
            )
        for tap in self.taps:
            side = tap_side(tap, self.frame_size)
            if self.map_size > side:
                raise ValueError(
                    f"map_size = {self.map_size} is larger than tap {tap!r}, which is "
                    f"{side}x{side} at frame_size = {self.frame_size}; use map_size <= {side}"
                )
        return self

    @property
    def num_branches(self) -> int:
        return len(self.taps)


# The paper's tables (MODEL_SPEC section 6): each variant is its overrides of the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "late_fusion": {},
    "early_fusion": {"fusion": "early"},
    "single_pool4": {"taps": ["pool4"]},
    "single_conv5_3": {"taps": ["conv5_3"]},
    "conv2d_reg": {"temporal": "conv2d"},
    "conv3d_plain": {"attention_reg_weight": 0.0},
    "vgg_lstm": {"temporal": "none"},
    # Sharma et al.: attention over the last conv layer feeding one plain LSTM input.
    "soft_attention": {
        "taps": ["conv5_3"],
        "temporal": "none",
        "joint_inputs": False,
        "pyramid": False,
    },
}


def model_config(variant: str, num_classes: int, **overrides: Any) -> ModelConfig:
    """The validated config of a named variant, with ``overrides`` applied on top."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {sorted(VARIANTS)}")
    return ModelConfig.model_validate(
        {**VARIANTS[variant], "num_classes": num_classes, **overrides}
    )
