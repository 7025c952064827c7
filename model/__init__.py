"""Joint attention on multi-level deep features (Wu et al. 2016), in pure PyTorch.

Names are imported on first use (PEP 562): `model.video`'s clip grid, which Ray Data's
decode tasks use through `data_shards.clips`, then loads without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.backbone import VGG16Taps, normalize_frames
    from model.config import VARIANTS, ModelConfig, model_config
    from model.joint_lstm import JointLSTMCell, JointLSTMCellReference
    from model.net import JointAttentionNet, ModelOutput, build_model, clip_scores

# Each public name and the module that defines it.
_EXPORTS = {
    "VARIANTS": "model.config",
    "JointAttentionNet": "model.net",
    "JointLSTMCell": "model.joint_lstm",
    "JointLSTMCellReference": "model.joint_lstm",
    "ModelConfig": "model.config",
    "ModelOutput": "model.net",
    "VGG16Taps": "model.backbone",
    "build_model": "model.net",
    "clip_scores": "model.net",
    "model_config": "model.config",
    "normalize_frames": "model.backbone",
}

__all__ = [
    "VARIANTS",
    "JointAttentionNet",
    "JointLSTMCell",
    "JointLSTMCellReference",
    "ModelConfig",
    "ModelOutput",
    "VGG16Taps",
    "build_model",
    "clip_scores",
    "model_config",
    "normalize_frames",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
