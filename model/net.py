"""The assembled network, its losses and clip scoring (MODEL_SPEC sections 1-5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import SoftAttention, SpatialPyramid
from model.branch import Branch, attention_regularization
from model.config import ModelConfig, model_config
from model.inputs import encoder_groups, input_kind
from model.joint_lstm import JointLSTMCell, LSTMState


@dataclass
class ModelOutput:
    """What one forward pass returns.

    Attributes:
        step_logits: ``[B, T, num_classes]`` top-layer prediction at every step.
        attention: ``[B, nb, T, K*K]`` each branch's attention (rows sum to 1); nb is the
            number of branches, which is the joint LSTM's number of inputs M.
        branch_logits: ``[B, nb, T, num_classes]`` deep supervision, None without temporal convs.
        attention_reg: ``[B]`` sum over branches of R^b; zeros when there is no such term.
    """

    step_logits: Tensor
    attention: Tensor
    branch_logits: Tensor | None
    attention_reg: Tensor


def clip_scores(step_logits: Tensor, last_steps: int, mode: Literal["vote", "prob"]) -> Tensor:
    """Class scores of each clip from its last L2 steps, ``[B, T, C] -> [B, C]``, rows sum to 1.

    ``vote`` (the paper): the fraction of those steps whose argmax is each class.
    ``prob``: their mean softmax.
    """
    if not 1 <= last_steps <= step_logits.shape[1]:
        raise ValueError(f"last_steps = {last_steps} must be in 1..{step_logits.shape[1]}")
    last = step_logits[:, -last_steps:]
    if mode == "vote":
        return F.one_hot(last.argmax(dim=-1), last.shape[-1]).to(last.dtype).mean(dim=1)
    if mode == "prob":
        return last.softmax(dim=-1).mean(dim=1)
    raise ValueError(f"mode must be 'vote' or 'prob', got {mode!r}")


class JointAttentionNet(nn.Module):
    """Inputs (VGG16 taps, flow) -> per-branch adapter and temporal convnet -> attention +
    pyramid -> joint LSTM.

    ``forward(frames: [B, T, 3, S, S])`` (ImageNet-normalized), or a dict of sources and
    cached maps (`encode`) -> ``ModelOutput``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # One encoder per group of inputs (`model.inputs`), under its registered attribute:
        # `backbone` is the RGB VGG16 of every saved model. Frozen unless trained by kind or
        # by `backbone: finetune`.
        self.encoder_inputs = encoder_groups(cfg.inputs)
        self.frozen_encoders: set[str] = set()
        for attr, names in self.encoder_inputs.items():
            kind = input_kind(names[0])
            self.add_module(attr, kind.build_encoder(names, cfg))
            if not kind.trainable and cfg.backbone == "frozen":
                getattr(self, attr).requires_grad_(False)
                self.frozen_encoders.add(attr)
        self.branches = nn.ModuleDict(
            {
                name: Branch(
                    cfg.channels, cfg.temporal, cfg.supervision_hidden, cfg.num_classes,
                    in_channels=input_kind(name).channels,
                )
                for name in cfg.inputs
            }
        )
        num_branches = cfg.num_branches
        locations = cfg.map_size**2
        hidden = cfg.hidden_size
        self.attention = SoftAttention(
            hidden, num_branches if cfg.attention == "per_branch" else 1, locations
        )
        self.pyramid = SpatialPyramid(cfg.map_size, cfg.pyramid)
        input_size = self.pyramid.num_parts * cfg.channels  # D = 5C with the pyramid
        self.first_layer: JointLSTMCell | nn.LSTMCell
        if cfg.joint_inputs:
            self.first_layer = JointLSTMCell([input_size] * num_branches, hidden, cfg.fusion)
        else:
            self.first_layer = nn.LSTMCell(input_size * num_branches, hidden)
        self.upper_layers = nn.ModuleList(
            nn.LSTMCell(hidden, hidden) for _ in range(cfg.num_layers - 1)
        )
        self.init_state = (
            nn.Linear(num_branches * cfg.channels, 2 * cfg.num_layers * hidden)
            if cfg.init_state == "mean"
            else None
        )
        self.classifier = nn.Linear(hidden, cfg.num_classes)

    @property
    def frozen_backbone(self) -> bool:
        return self.cfg.backbone == "frozen"

    def train(self, mode: bool = True) -> JointAttentionNet:
        super().train(mode)
        for attr in self.frozen_encoders:  # a frozen encoder's BatchNorm/dropout stay as built
            getattr(self, attr).eval()
        return self

    def encode(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every input's maps ``{name: [B, T, C, K, K]}`` from what a batch carries: the
        normalized sources (``frames`` ``[B, T, 3, S, S]``, ``optical_flow``
        ``[B, T, 2L, S, S]``) and/or cached maps by input name (which skip their encoder)."""
        maps = {name: inputs[name] for name in self.cfg.inputs if name in inputs}
        for attr, names in self.encoder_inputs.items():
            if all(name in maps for name in names):
                continue
            source_name = input_kind(names[0]).source
            if source_name not in inputs:
                raise ValueError(
                    f"inputs {names} read {source_name!r}, which the batch does not carry "
                    f"(it has {sorted(inputs)})"
                )
            source = inputs[source_name]
            frozen = attr in self.frozen_encoders
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                out = getattr(self, attr)(source.flatten(0, 1))
            maps |= {name: out[name].unflatten(0, source.shape[:2]) for name in names}
        return maps

    def extract_taps(self, frames: Tensor) -> dict[str, Tensor]:
        """``[B, T, 3, S, S]`` -> ``{tap: [B, T, 512, K, K]}`` (an RGB-only model's maps)."""
        return self.encode({"frames": frames})

    def forward(self, inputs: Tensor | dict[str, Tensor]) -> ModelOutput:
        """inputs: normalized frames ``[B, T, 3, S, S]``, or a dict of sources and/or cached
        maps (see `encode`).

        Every input goes through forward() so DDP's gradient hooks see the cached path too.
        """
        if isinstance(inputs, Tensor):
            inputs = {"frames": inputs}
        return self.forward_taps(self.encode(inputs))

    def _initial_states(self, mean_feature: Tensor) -> list[LSTMState]:
        """h_0, c_0 of every layer: zeros, or tanh of a linear map of the clip's mean feature."""
        batch, layers, hidden = mean_feature.shape[0], self.cfg.num_layers, self.cfg.hidden_size
        if self.init_state is None:
            zeros = mean_feature.new_zeros(batch, hidden)
            return [(zeros, zeros)] * layers
        states = torch.tanh(self.init_state(mean_feature)).view(batch, layers, 2, hidden)
        return [(states[:, n, 0], states[:, n, 1]) for n in range(layers)]

    def forward_taps(self, taps: dict[str, Tensor]) -> ModelOutput:
        """Everything after the encoders. ``taps[input]: [B, T, C, K, K]``, any float dtype."""
        branch_maps, branch_logits, branch_inputs = [], [], []
        for tap, branch in self.branches.items():
            tap_maps = taps[tap]
            if self.cfg.center_taps and input_kind(tap).source == "frames":
                # A random VGG16 maps every frame of a clip to nearly the same taps (static
                # content dominates); without the clip's mean, the motion is what is left.
                tap_maps = tap_maps.float() - tap_maps.float().mean(dim=1, keepdim=True)
            maps, logits, adapted = branch(tap_maps)
            branch_maps.append(maps)
            branch_logits.append(logits)
            branch_inputs.append(adapted)
        maps = torch.stack(branch_maps, dim=1)  # Y: [B, nb, T, C, K, K]
        batch, num_branches, steps = maps.shape[:3]
        has_temporal = self.cfg.temporal != "none"

        lstm_maps = maps.detach() if has_temporal and not self.cfg.conv3d_grad_from_lstm else maps
        # [T, B, nb, K*K, C]: each step's slice contiguous, locations ready for the pyramid.
        step_maps = lstm_maps.flatten(-2).permute(2, 0, 1, 4, 3).contiguous()
        states = self._initial_states(lstm_maps.mean(dim=(2, 4, 5)).flatten(1))

        top_hidden, attention = [], []
        for t in range(steps):
            att = self.attention(states[-1][0]).expand(-1, num_branches, -1)
            inputs = self.pyramid(att, step_maps[t])  # [B, nb, D]
            if isinstance(self.first_layer, JointLSTMCell):
                states[0] = self.first_layer(inputs.unbind(1), states[0])
            else:
                states[0] = self.first_layer(inputs.flatten(1), states[0])
            for n, cell in enumerate(self.upper_layers, start=1):
                states[n] = cell(states[n - 1][0], states[n])
            top_hidden.append(states[-1][0])
            attention.append(att)

        attention_maps = torch.stack(attention, dim=2)  # [B, nb, T, K*K]
        if has_temporal:
            logits = torch.stack(branch_logits, dim=1)
            regularized = branch_maps if self.cfg.attention_reg_maps == "output" else branch_inputs
            reg = sum(
                attention_regularization(
                    regularized[b], attention_maps[:, b], self.cfg.attention_reg_grad
                )
                for b in range(num_branches)
            )
        else:
            logits, reg = None, maps.new_zeros(batch)
        return ModelOutput(
            step_logits=self.classifier(torch.stack(top_hidden, dim=1)),
            attention=attention_maps,
            branch_logits=logits,
            attention_reg=reg,
        )

    def losses(
        self, out: ModelOutput, labels: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``lstm``, ``supervision``, ``attention_reg`` and
        ``total = lstm + alpha * (supervision + lambda * attention_reg)``.

        Each term is a mean over the clips of the batch; with ``weights`` (``[B]``, 0 or 1)
        over the clips of weight 1 only: the padding rows of a fixed-shape batch
        (`orchestration.graphed_step`) weigh nothing, and the terms equal those of the batch
        without them. No host sync either way (the divisor stays a tensor).
        """
        batch, steps, num_classes = out.step_logits.shape
        lstm_rows = F.cross_entropy(
            out.step_logits.reshape(-1, num_classes), labels.repeat_interleave(steps),
            reduction="none",
        ).view(batch, steps).mean(dim=1)
        if out.branch_logits is None:
            supervision_rows = out.step_logits.new_zeros(batch)
        else:
            per_step_labels = labels.view(batch, 1, 1).expand(out.branch_logits.shape[:3])
            supervision_rows = (
                F.cross_entropy(
                    out.branch_logits.reshape(-1, num_classes),
                    per_step_labels.reshape(-1),
                    reduction="none",
                )
                .view(batch, -1)
                .sum(dim=1)
            )
        if weights is None:
            lstm, supervision = lstm_rows.mean(), supervision_rows.mean()
            attention_reg = out.attention_reg.mean()
        else:
            total_weight = weights.sum().clamp_min(1.0)
            lstm = (lstm_rows * weights).sum() / total_weight
            supervision = (supervision_rows * weights).sum() / total_weight
            attention_reg = (out.attention_reg * weights).sum() / total_weight
        total = lstm + self.cfg.supervision_weight * (
            supervision + self.cfg.attention_reg_weight * attention_reg
        )
        return {
            "lstm": lstm,
            "supervision": supervision,
            "attention_reg": attention_reg,
            "total": total,
        }

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters (a frozen backbone is left out).

        Decision: weight decay applies to weights (matrices, conv kernels); biases and
        BatchNorm affine parameters get none.
        """
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def build_model(variant: str, num_classes: int, **overrides: Any) -> JointAttentionNet:
    """The network of a named variant (see ``VARIANTS``), with validated ``overrides``."""
    return JointAttentionNet(model_config(variant, num_classes, **overrides))
