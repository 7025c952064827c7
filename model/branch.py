"""One branch per input: adapter, temporal convnet, deep supervision (MODEL_SPEC section 2)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn


class Adapter(nn.Sequential):
    """``[N, 512, K, K] -> [N, C, K, K]``.

    Decision (adapter order): AdaptiveAvgPool(K) (in VGG16Taps) -> 1x1 Conv -> BN -> ReLU.
    """

    def __init__(self, channels: int, in_channels: int = 512) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )


class TemporalConv3d(nn.Module):
    """Two 3x3x3 convs with ReLU over the clip volume: ``[B, T, C, K, K]`` -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, maps: Tensor) -> Tensor:
        return self.convs(maps.transpose(1, 2)).transpose(1, 2)


class TemporalConv2d(nn.Module):
    """The conv2d ablation: the same two layers, 3x3 per frame. ``[B, T, C, K, K]`` -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, maps: Tensor) -> Tensor:
        return self.convs(maps.flatten(0, 1)).view_as(maps)


class SupervisionHead(nn.Module):
    """Deep supervision: ``[B, T, C, K, K]`` -> per-step logits ``[B, T, num_classes]``."""

    def __init__(self, channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, maps: Tensor) -> Tensor:
        return self.mlp(maps.mean(dim=(-2, -1)))


def init_relu_convs_(module: nn.Module) -> None:
    """He (fan-in, ReLU) init for every conv in `module`, zero biases.

    PyTorch's default conv init shrinks the activations by about sqrt(3) per ReLU layer;
    after the adapter and two temporal convs the LSTM inputs were nearly constant and the
    network did not even memorize 48 clips (measured). He init keeps their scale.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Branch(nn.Module):
    """Everything h-independent of one input, batched over all T steps.

    ``forward(taps: [B, T, Cin, K, K])`` (Cin: the input's channels, 512 for VGG16's taps)
    returns ``Y``: ``[B, T, C, K, K]`` (non-negative), the deep supervision logits
    ``[B, T, num_classes]`` (None when ``temporal`` is ``none``) and ``X``, the adapted maps
    the temporal convnet reads (``[B, T, C, K, K]``, ``Y`` itself when there is no temporal
    convnet).
    """

    def __init__(
        self,
        channels: int,
        temporal: Literal["conv3d", "conv2d", "none"],
        supervision_hidden: int,
        num_classes: int,
        in_channels: int = 512,
    ) -> None:
        super().__init__()
        self.adapter = Adapter(channels, in_channels)
        self.temporal: nn.Module | None
        self.head: SupervisionHead | None
        if temporal == "none":
            self.temporal, self.head = None, None
        else:
            conv = TemporalConv3d if temporal == "conv3d" else TemporalConv2d
            self.temporal = conv(channels)
            self.head = SupervisionHead(channels, supervision_hidden, num_classes)
        init_relu_convs_(self)

    def forward(self, taps: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        weight = self.adapter[0].weight
        adapted = self.adapter(taps.flatten(0, 1).to(weight.dtype)).unflatten(0, taps.shape[:2])
        if self.temporal is None or self.head is None:
            return adapted, None, adapted
        maps = self.temporal(adapted)
        return maps, self.head(maps), adapted


def activity_map(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """m_{t,i}: each location's share of the total activity, ``[..., C, K, K] -> [..., K*K]``."""
    activity = maps.sum(dim=-3).flatten(-2)
    return activity / (activity.sum(dim=-1, keepdim=True) + eps)


def attention_regularization(
    maps: Tensor, attention: Tensor, grad: Literal["conv", "attention", "conv_and_attention"]
) -> Tensor:
    """R = sum_t sum_i (m_{t,i} - att_{t,i})^2 per sample.

    `grad` says which side R trains (MODEL_SPEC section 2): ``conv`` pulls the convnet's
    activity map m toward the attention (the attention detached, the paper), ``attention``
    pulls the attention toward m (m detached), ``conv_and_attention`` both.

    Args:
        maps: ``[B, T, C, K, K]`` non-negative maps: the temporal convnet's output Y, or its
            input X (``ModelConfig.attention_reg_maps``).
        attention: ``[B, T, K*K]``.

    Returns:
        ``[B]``.
    """
    activity = activity_map(maps)
    if grad == "attention":
        activity = activity.detach()
    if grad == "conv":
        attention = attention.detach()
    return (activity - attention).pow(2).sum(dim=(-2, -1))
