"""Joint attention on multi-level deep features (Wu et al. 2016), in pure PyTorch."""

from model.backbone import VGG16Taps, normalize_frames
from model.config import VARIANTS, ModelConfig, model_config
from model.joint_lstm import JointLSTMCell, JointLSTMCellReference
from model.net import JointAttentionNet, ModelOutput, build_model, clip_scores

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
