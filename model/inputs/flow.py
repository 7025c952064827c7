"""Optical flow as an input: the flow's normalization and its two encoders.

The flow itself (OpenCV's DIS between a clip's consecutive frames, camera motion
compensated, x and y clipped at +-bound px and stored as uint8) is computed by the data
pipeline's CPU tasks and the shipped predict pipeline (`model.flow`, `model.video`); a step
of a clip carries a stack of L flows, ``[S, S, 2L]`` (x0, y0, x1, y1, ...).

Two encoders (`model.inputs` registers both; benchmarks/README.md says what each measured):

- ``flow``: a frozen VGG16 on the flow stack, read at pool4, initialized across modalities
  as TSN does (Wang et al. 2016): the first layer's RGB filters averaged over their three
  input channels and replicated over the 2L flow channels, every later layer the RGB
  network's. Frozen, so its maps are cached like the RGB taps. Its value rests on real
  pretrained RGB weights; with a random VGG16 it is a random projection of the flow.
- ``flow_cnn``: a small encoder (four strided 3x3 convs, BN, ReLU) trained with the network
  on the flow itself: computed every step, never cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbone import VGG16Taps
from model.inputs import RANDOM_INIT_SEED

if TYPE_CHECKING:
    from model.config import ModelConfig

# The flow VGG16's tap: pool4, S/16 a side, as the RGB pool4 branch.
FLOW_VGG16_TAP = "pool4"
# uint8 flow -> the scale of an ImageNet-normalized RGB channel (std 0.226 of 255 around the
# zero-flow byte), so cross-modality-initialized filters see inputs of the scale they know.
_FLOW_ZERO, _FLOW_STD = 128.0, 0.226 * 255  # model.flow stores zero flow as 128


def normalize_flow(flow_uint8: Tensor) -> Tensor:
    """uint8 flow as the pipeline yields it, ``[B, T, S, S, 2L]`` -> float ``[B, T, 2L, S, S]``."""
    if flow_uint8.dtype != torch.uint8 or flow_uint8.ndim != 5 or flow_uint8.shape[-1] % 2:
        raise ValueError(
            f"expected uint8 flow [B, T, S, S, 2L], got {flow_uint8.dtype} "
            f"{tuple(flow_uint8.shape)}"
        )
    return flow_uint8.permute(0, 1, 4, 2, 3).float().sub_(_FLOW_ZERO).div_(_FLOW_STD)


def cross_modality_init_(vgg: VGG16Taps, in_channels: int) -> VGG16Taps:
    """Make `vgg`'s first conv take `in_channels` inputs: its RGB filters averaged over
    their 3 input channels and replicated `in_channels` times (TSN), in place."""
    first = vgg.features[0]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    conv = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(first.weight.mean(dim=1, keepdim=True).expand_as(conv.weight))
        conv.bias.copy_(first.bias)
    vgg.features[0] = conv
    return vgg


class FlowVGG16(nn.Module):
    """``[N, 2L, S, S] -> {name: [N, 512, K, K]}``: a VGG16 on a flow stack, read at pool4.

    Its weights come from the RGB VGG16 of ``backbone_weights`` (random ones seeded with
    `RANDOM_INIT_SEED`, as the feature cache seeds the RGB network, whatever the run's
    seed: the cache and the network then hold the same flow VGG16).
    """

    def __init__(self, name: str, map_size: int, weights: str | None, in_channels: int) -> None:
        super().__init__()
        self.name = name
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            vgg = VGG16Taps([FLOW_VGG16_TAP], map_size, weights)
        self.vgg = cross_modality_init_(vgg, in_channels)

    def forward(self, flow: Tensor) -> dict[str, Tensor]:
        return {self.name: self.vgg(flow)[FLOW_VGG16_TAP]}

    def weights_digest(self) -> str:
        """sha256 of its tensors (keys a feature cache, as `VGG16Taps.weights_digest`)."""
        return self.vgg.weights_digest()


class FlowCNN(nn.Module):
    """``[N, 2L, S, S] -> {name: [N, 128, K, K]}``: four stride-2 3x3 convs (32, 64, 128,
    128 channels, BN, ReLU), S/16 a side, average-pooled to K."""

    def __init__(self, name: str, map_size: int, in_channels: int) -> None:
        super().__init__()
        self.name, self.map_size = name, map_size
        layers: list[nn.Module] = []
        for width in (32, 64, 128, 128):
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            in_channels = width
        self.convs = nn.Sequential(*layers)

    def forward(self, flow: Tensor) -> dict[str, Tensor]:
        return {self.name: F.adaptive_avg_pool2d(self.convs(flow), self.map_size)}


def _one(names: Sequence[str]) -> str:
    if len(names) != 1:
        raise ValueError(f"a flow encoder computes one input, got {list(names)}")
    return names[0]


def build_flow_vgg16(names: Sequence[str], cfg: ModelConfig) -> FlowVGG16:
    return FlowVGG16(_one(names), cfg.map_size, cfg.backbone_weights, 2 * cfg.flow.stack)


def build_flow_cnn(names: Sequence[str], cfg: ModelConfig) -> FlowCNN:
    return FlowCNN(_one(names), cfg.map_size, 2 * cfg.flow.stack)
