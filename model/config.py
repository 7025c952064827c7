"""The one validated configuration of the network, and the paper's named variants.

Symbols follow MODEL_SPEC.md: S frame_size, T (L1) clip_len, L2 last_steps, C channels,
K map_size, H hidden_size, N num_layers, F supervision_hidden, lambda attention_reg_weight,
alpha supervision_weight.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from model.inputs import input_kind, reads

# The inputs every model had before inputs were a registry (VGG16's RGB taps): a config of
# these only is saved exactly as then, under its old key `taps` and without `flow`, so its
# model_config.json, MLflow params and cache key stay byte-identical.
RGB_TAPS = ("conv4_3", "pool4", "conv5_3", "pool5")


def tap_side(tap: str, frame_size: int) -> int:
    """Side of an input's feature map (before pooling to K) for frames of side ``frame_size``."""
    return input_kind(tap).side(frame_size)


class FlowConfig(BaseModel):
    """How the `flow` inputs' optical flow is computed (`model.flow`): part of the model,
    since the shipped predict pipeline must compute it as training did."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stack: int = Field(
        1, ge=1, le=10,
        description="L: flows per step (from the step's frame to the next at the clip's "
        "frame interval, and on): the encoder reads 2L channels",
    )
    preset: Literal["ultrafast", "fast", "medium"] = Field(
        "medium",
        description="OpenCV DIS preset: medium follows small moving objects (limbs, balls) "
        "that fast blurs into their surroundings, at about 4.6x fast's cost "
        "(model/flow.py; benchmarks/README.md: flow_vs_rgb)",
    )
    compensation: Literal["median", "homography", "none"] = Field(
        "homography",
        description="camera motion subtracted from each flow: a fitted homography (pans, "
        "zooms, turns; model/flow.py measures it cheaper than the median), the median "
        "flow, or none",
    )
    bound_px: float = Field(20.0, gt=0, description="x and y clipped at +-bound_px, then uint8")


class ModelConfig(BaseModel):
    """Everything that defines a JointAttentionNet; a saved dump rebuilds the same network."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_classes: int = Field(ge=2)
    frame_size: int = Field(384, ge=32, description="S: side of the square frames fed to VGG16")
    clip_len: int = Field(30, ge=1, description="T = L1: frames per clip")
    last_steps: int = Field(16, ge=1, description="L2: last steps averaged into a clip score")
    inputs: list[str] = Field(
        default_factory=lambda: ["pool4", "conv5_3"],
        validation_alias=AliasChoices("inputs", "taps"),
        description="the joint LSTM's inputs, one branch each (model.inputs registers them: "
        "VGG16's taps conv4_3, pool4, conv5_3, pool5 of the RGB frames; flow, flow_cnn); "
        "`taps`, its old name, is accepted",
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
    flow: FlowConfig = Field(
        default_factory=FlowConfig, description="the optical flow of flow inputs"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name_for_inputs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "inputs" in data and "taps" in data:
            raise ValueError(
                "model.taps and model.inputs both given: taps is the old name of inputs, "
                "keep one of them"
            )
        return data

    @field_validator("inputs")
    @classmethod
    def _inputs_known_unique(cls, inputs: list[str]) -> list[str]:
        if not inputs:
            raise ValueError("inputs must name at least one input (e.g. pool4)")
        if len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be unique, got {inputs}")
        for name in inputs:
            input_kind(name)  # ValueError naming the registered inputs
        return inputs

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not isinstance(data, dict) or not set(self.inputs) <= set(RGB_TAPS):
            if isinstance(data, dict) and not self.reads_flow:
                data.pop("flow", None)
            return data
        # An RGB-only model: today's layout, key for key and in the same order.
        data.pop("flow", None)
        return {("taps" if key == "inputs" else key): value for key, value in data.items()}

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        if self.last_steps > self.clip_len:
            raise ValueError(
                f"last_steps = {self.last_steps} must be <= clip_len = {self.clip_len}"
            )
        for name in self.inputs:
            side = tap_side(name, self.frame_size)
            if self.map_size > side:
                raise ValueError(
                    f"map_size = {self.map_size} is larger than input {name!r}, which is "
                    f"{side}x{side} at frame_size = {self.frame_size}; use map_size <= {side}"
                )
        return self

    @property
    def taps(self) -> list[str]:
        """The old name of `inputs`."""
        return self.inputs

    @property
    def reads_flow(self) -> bool:
        """Whether an input reads optical flow (the pipeline then computes it)."""
        return reads(self.inputs, "optical_flow")

    @property
    def num_branches(self) -> int:
        return len(self.inputs)


# The paper's tables (MODEL_SPEC section 6): each variant is its overrides of the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "late_fusion": {},
    "early_fusion": {"fusion": "early"},
    "single_pool4": {"inputs": ["pool4"]},
    "single_conv5_3": {"inputs": ["conv5_3"]},
    "conv2d_reg": {"temporal": "conv2d"},
    "conv3d_plain": {"attention_reg_weight": 0.0},
    "vgg_lstm": {"temporal": "none"},
    # Sharma et al.: attention over the last conv layer feeding one plain LSTM input.
    "soft_attention": {
        "inputs": ["conv5_3"],
        "temporal": "none",
        "joint_inputs": False,
        "pyramid": False,
    },
}


def model_config(variant: str, num_classes: int, **overrides: Any) -> ModelConfig:
    """The validated config of a named variant, with ``overrides`` applied on top."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {sorted(VARIANTS)}")
    variant_keys = dict(VARIANTS[variant])
    if {"inputs", "taps"} & overrides.keys():  # either name of the inputs overrides both
        variant_keys.pop("inputs", None)
    return ModelConfig.model_validate({**variant_keys, "num_classes": num_classes, **overrides})
