"""The joint LSTM's inputs as a registry: what each reads of a clip, what computes it, its size.

An input is one sequence of maps per clip, ``[B, T, C, K, K]``: one branch of its own (late
fusion) or one input of the joint LSTM cell (early fusion). `ModelConfig.inputs` names them;
everything else (the network's encoders and branches, the feature cache, the data pipeline,
sizing, Tune spaces, the plan) asks this registry and names no input. An `InputKind` says:

- `source`: what it reads of a clip: ``frames`` (decoded RGB, uint8 ``[B, T, S, S, 3]``) or
  ``optical_flow`` (the flow of those frames, uint8 ``[B, T, S, S, 2L]``, `model.flow`; the
  data pipeline computes it only for a model that reads it);
- `encoder`: the network attribute of the module that computes it. Inputs of one encoder are
  computed in one pass (VGG16's four taps share one network), and the attribute is the
  prefix of the encoder's weights in a state dict (``backbone`` for the RGB VGG16, as every
  saved model has it);
- `build`: ``"module:function"`` (or the function), ``(names, cfg) -> nn.Module`` whose
  forward maps the normalized source ``[N, Cin, S, S]`` to ``{name: [N, channels, K, K]}``;
- `channels` and `pools` (its map's side is ``frame_size // 2**pools``, pooled to K);
- `trainable`: trained with the rest of the network, so computed every step and never
  cached; otherwise a frozen feature extractor (under ``backbone: frozen``), whose maps the
  feature cache stores like VGG16's taps.

A new input kind is one module (its encoder) plus one `register` line below; a test can
register a kind of its own the same way. Torch-free: configs validate without torch, and an
encoder's module is imported only when a network is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

# A randomly initialized frozen encoder (no backbone_weights) is seeded with this wherever it
# must equal another copy: the feature cache's VGG16 (`data_shards.features`) and the flow
# VGG16 derived from it (`model.inputs.flow`).
RANDOM_INIT_SEED = 0

# A batch carries its sources under these names beside any cached maps under their input's
# name, so no input may be named as a source.
Source = Literal["frames", "optical_flow"]
SOURCES: tuple[Source, ...] = ("frames", "optical_flow")


@dataclass(frozen=True)
class InputKind:
    """One registered input (see the module's docstring)."""

    name: str
    source: Source
    encoder: str
    build: str | Callable[[Sequence[str], Any], nn.Module]  # (names, ModelConfig)
    channels: int
    pools: int
    trainable: bool = False
    # Place among its encoder's inputs (VGG16's layer order): a cache of several taps
    # stores them in this order.
    order: int = 0

    def side(self, frame_size: int) -> int:
        """Side of this input's map, before pooling to K, for frames of side `frame_size`."""
        return frame_size // 2**self.pools

    def build_encoder(self, names: Sequence[str], cfg: Any) -> nn.Module:
        """The module computing `names` (all of this kind's encoder) for `cfg`, a
        `ModelConfig` (not imported here: model.config validates against this registry)."""
        build = self.build
        if isinstance(build, str):
            module, _, attr = build.partition(":")
            build = getattr(import_module(module), attr)
        return build(names, cfg)


_REGISTRY: dict[str, InputKind] = {}


def register(kind: InputKind) -> InputKind:
    """Add `kind` to the registry (a name already taken is an error: kinds never shadow)."""
    if kind.name in _REGISTRY and _REGISTRY[kind.name] != kind:
        raise ValueError(f"input {kind.name!r} is registered already")
    if kind.source not in SOURCES:
        raise ValueError(f"input {kind.name!r}: source {kind.source!r} is not one of {SOURCES}")
    if kind.name in SOURCES:
        raise ValueError(f"input {kind.name!r}: a source's name, choose another")
    _REGISTRY[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (a test's own, when it is done)."""
    _REGISTRY.pop(name, None)


def input_kind(name: str) -> InputKind:
    """The registered kind `name`; ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown input {name!r}; registered inputs: {', '.join(sorted(_REGISTRY))}"
        ) from None


def input_names() -> list[str]:
    """Every registered input's name."""
    return list(_REGISTRY)


def encoder_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """{encoder attribute: its inputs among `names`, in the encoder's order}, encoders in
    the order of their first input in `names`."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(input_kind(name).encoder, []).append(name)
    return {enc: sorted(group, key=lambda n: input_kind(n).order) for enc, group in groups.items()}


def in_encoder_order(names: Iterable[str]) -> list[str]:
    """`names` sorted by encoder, then by place in it (a feature cache's file order)."""
    ordered: list[str] = []
    for group in encoder_groups(sorted(set(names), key=_rank)).values():
        ordered += group
    return ordered


def _rank(name: str) -> tuple[int, int]:
    kind = input_kind(name)
    encoders = list(dict.fromkeys(k.encoder for k in _REGISTRY.values()))
    return encoders.index(kind.encoder), kind.order


def reads(names: Iterable[str], source: Source) -> bool:
    """Whether any of the inputs `names` reads `source`."""
    return any(input_kind(name).source == source for name in names)


# VGG16's taps of the RGB frames (MODEL_SPEC section 1): model/backbone.py.
_VGG16 = "model.inputs.rgb:build_vgg16_taps"
for _order, (_tap, _pools) in enumerate(
    [("conv4_3", 3), ("pool4", 4), ("conv5_3", 4), ("pool5", 5)]
):
    register(InputKind(_tap, "frames", "backbone", _VGG16, channels=512, pools=_pools,
                       order=_order))
# Optical flow (model/flow.py computes it; model/inputs/flow.py encodes it): a frozen flow
# VGG16 read at pool4, initialized from the RGB weights (cross-modality, TSN), cacheable...
register(InputKind("flow", "optical_flow", "flow_backbone", "model.inputs.flow:build_flow_vgg16",
                   channels=512, pools=4))
# ... or a small encoder trained with the network on the flow itself.
register(InputKind("flow_cnn", "optical_flow", "flow_encoder", "model.inputs.flow:build_flow_cnn",
                   channels=128, pools=4, trainable=True))
