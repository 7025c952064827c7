"""The pre-conv net: VGG16's ``features`` stack, read at several depths (MODEL_SPEC section 1)."""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's VGG16 configuration "D": conv widths, "M" = 2x2 max-pool.
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

# Index in torchvision's ``vgg16().features`` of the last module of each tap; conv taps are
# read after their ReLU, as feature extractors usually do.
TAP_LAST_INDEX: dict[str, int] = {"conv4_3": 22, "pool4": 23, "conv5_3": 29, "pool5": 30}


def normalize_frames(frames_uint8: Tensor) -> Tensor:
    """ImageNet-normalize frames as the data pipeline yields them.

    Args:
        frames_uint8: ``[B, T, S, S, 3]`` uint8, channels last.

    Returns:
        ``[B, T, 3, S, S]`` float32.
    """
    if frames_uint8.dtype != torch.uint8 or frames_uint8.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames [B, T, S, S, 3], got {frames_uint8.dtype} "
            f"{tuple(frames_uint8.shape)}"
        )
    frames = frames_uint8.permute(0, 1, 4, 2, 3).float().div_(255.0)
    mean, std = _imagenet_stats(frames.device)
    return (frames - mean) / std


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as ``[3, 1, 1]`` tensors on `device`, made once: a tensor built
    from Python floats is a host-to-device copy, which a CUDA graph capture refuses."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)


def _vgg16_features(num_modules: int) -> nn.Sequential:
    """The first ``num_modules`` modules of torchvision's ``vgg16().features``, same init."""
    layers: list[nn.Module] = []
    in_channels = 3
    for width in _VGG16_LAYOUT:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(width, int)
            conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_channels = width
    return nn.Sequential(*layers[:num_modules])


class VGG16Taps(nn.Module):
    """VGG16 features up to the deepest requested tap, each tap pooled to ``K x K``.

    Pooling here, before the branch adapters' 1x1 convs, is what lets frozen taps be cached
    (small, ``512 x K x K``) and still give exactly the network of the decode path: a 1x1
    conv commutes with average pooling.

    Args:
        taps: VGG16 layer names (``conv4_3``, ``pool4``, ``conv5_3``, ``pool5``).
        map_size: K, side of every pooled tap.
        weights: path of a torchvision VGG16 state dict (keys with or without the
            ``features.`` prefix; classifier keys ignored). None: random init, with a warning.
    """

    def __init__(
        self, taps: Sequence[str], map_size: int, weights: str | Path | None = None
    ) -> None:
        super().__init__()
        unknown = [t for t in taps if t not in TAP_LAST_INDEX]
        if unknown or not taps:
            raise ValueError(f"taps {list(taps)} must be a non-empty subset of {TAP_LAST_INDEX}")
        self.taps = list(taps)
        self.map_size = map_size
        self.features = _vgg16_features(max(TAP_LAST_INDEX[t] for t in taps) + 1)
        self._tap_at = {TAP_LAST_INDEX[t]: t for t in taps}
        if weights is None:
            warnings.warn(
                "VGG16Taps: no backbone_weights given, VGG16 is RANDOMLY INITIALIZED; "
                "features will carry little meaning. Pass a torchvision vgg16 state dict path.",
                stacklevel=2,
            )
        else:
            self.load_weights(weights)

    def load_weights(self, path: str | Path) -> None:
        """Load a torchvision VGG16 state dict saved with ``torch.save``."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {
            key.removeprefix("features."): value
            for key, value in state.items()
            if not key.startswith("classifier.")
        }
        wanted = self.features.state_dict().keys()
        missing = sorted(set(wanted) - set(features))
        if missing:
            raise ValueError(f"{path}: not a VGG16 features state dict, missing keys {missing}")
        # Deeper layers than the deepest tap are ignored, not an error.
        self.features.load_state_dict({key: features[key] for key in wanted})

    def raw_taps(self, frames: Tensor) -> dict[str, Tensor]:
        """Unpooled taps: ``[N, 3, S, S]`` -> ``{tap: [N, 512, S', S']}``."""
        out: dict[str, Tensor] = {}
        x = frames
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._tap_at:
                # Safe without a copy: every tap ends on a ReLU or a pool, whose output no
                # later in-place ReLU touches.
                out[self._tap_at[index]] = x
        return {tap: out[tap] for tap in self.taps}

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        """``[N, 3, S, S]`` -> ``{tap: [N, 512, K, K]}``, each tap adaptive-average-pooled."""
        return {
            tap: F.adaptive_avg_pool2d(x, self.map_size) for tap, x in self.raw_taps(frames).items()
        }

    def weights_digest(self) -> str:
        """sha256 over the names and values of the backbone's tensors (keys a feature cache)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.features.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()
