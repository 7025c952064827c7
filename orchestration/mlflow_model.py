"""The registered model's pyfunc: JointAttentionNet rebuilt from a state dict and its config.

MLflow logs this file as "models from code" (see `orchestration.registry.log_model`): loading
runs this file and `load_context` rebuilds the network from three plain artifacts, so no
pickled Python object is ever unpickled. It imports only torch, numpy, mlflow and the
`model` package (shipped with the model as code), never the rest of `orchestration`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from model import JointAttentionNet, ModelConfig, clip_scores, normalize_frames

WEIGHTS_FILE = "state_dict.pt"
CONFIG_FILE = "model_config.json"
CLASS_NAMES_FILE = "class_names.json"
# Names of the pyfunc artifacts (`context.artifacts[...]`) and their file names.
ARTIFACT_FILES = {
    "weights": WEIGHTS_FILE,
    "model_config": CONFIG_FILE,
    "class_names": CLASS_NAMES_FILE,
}
# Clips per forward pass in `predict`: bounds memory for large requests.
PREDICT_BATCH = 8


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with the config and class names it was trained with."""

    net: JointAttentionNet
    model_cfg: ModelConfig
    class_names: list[str]
    frame_interval: int = 1  # the training clips' frame step; clips to score need the same


def load_from_files(
    weights: str | Path,
    model_config: str | Path,
    class_names: str | Path,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Rebuild the network from its config and load the saved weights (eval mode)."""
    cfg = ModelConfig.model_validate(json.loads(Path(model_config).read_text()))
    # The saved state dict already holds the backbone's weights, so the build must not need
    # the training machine's VGG16 file, and its "randomly initialized" warning is moot.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VGG16Taps: no backbone_weights")
        net = JointAttentionNet(cfg.model_copy(update={"backbone_weights": None}))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.to(device).eval()
    return LoadedModel(
        net=net, model_cfg=cfg, class_names=json.loads(Path(class_names).read_text())
    )


@torch.inference_mode()
def predict_proba(loaded: LoadedModel, frames: np.ndarray) -> np.ndarray:
    """Class scores [B, C] (rows sum to 1) of uint8 clips [B, T, S, S, 3].

    Scores follow the config's clip rule (`prediction`: the paper's `vote`, or `prob`).
    """
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 frames [B, T, S, S, 3], got {frames.dtype} {frames.shape}"
        )
    device = next(loaded.net.parameters()).device
    cfg = loaded.model_cfg
    out = []
    for start in range(0, len(frames), PREDICT_BATCH):
        batch = torch.from_numpy(frames[start : start + PREDICT_BATCH]).to(device)
        logits = loaded.net(normalize_frames(batch)).step_logits
        out.append(clip_scores(logits.float(), cfg.last_steps, cfg.prediction).cpu().numpy())
    if not out:
        return np.zeros((0, cfg.num_classes), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


class JointAttentionPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc interface: uint8 frames [B, T, S, S, 3] in, class probabilities [B, C] out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the network from the logged artifacts, on the GPU when there is one."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_from_files(
            context.artifacts["weights"],
            context.artifacts["model_config"],
            context.artifacts["class_names"],
            device=device,
        )

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """Class probabilities [B, C] of a batch of uint8 clips [B, T, S, S, 3]."""
        return predict_proba(self.loaded, model_input)


mlflow.models.set_model(JointAttentionPyfunc())
