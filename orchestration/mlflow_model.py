"""The registered model's pyfunc: videos in, one labelled row per video out.

MLflow logs this file as "models from code" (see `orchestration.registry.log_model`): loading
runs this file and `load_context` rebuilds JointAttentionNet from three plain artifacts (a
state dict, its `ModelConfig` as JSON, the class names), so no pickled Python object is ever
unpickled. It imports only torch, numpy, pandas, mlflow and the `model` package (shipped with
the model as code), never the rest of `orchestration`: a video becomes a prediction in
`model.video`, the one pipeline `jlstm predict` and `jlstm eval` use too.

Input: a DataFrame with a `video_b64` column (the video file's bytes, base64) or a `video`
column (a path, read only under the folder the server names in `JLSTM_VIDEO_ROOT`; relative
paths are taken under it). Output, one row per input row: `label`, `score`, `top_k` (a list
of {label, score}), `num_clips`, `error` ("" when fine; else `label` is "", `score` 0). A
video that cannot be read gives its row an error; the other rows are still answered.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from model import JointAttentionNet, ModelConfig
from model.video import ClipGrid, VideoError, predict_video, top_k

WEIGHTS_FILE = "state_dict.pt"
CONFIG_FILE = "model_config.json"
CLASS_NAMES_FILE = "class_names.json"
# Names of the pyfunc artifacts (`context.artifacts[...]`) and their file names.
ARTIFACT_FILES = {
    "weights": WEIGHTS_FILE,
    "model_config": CONFIG_FILE,
    "class_names": CLASS_NAMES_FILE,
}
# The model's clip grid and format, in the MLmodel metadata (what the registry page shows and
# `registry.load_model` reads) and in the pyfunc's `model_config` (what `load_context` gets).
FRAME_INTERVAL_KEY = "frame_interval"  # the training clips' frame step
CLIP_STRIDE_KEY = "clip_stride"  # `jlstm eval`'s `data.eval_stride` (default clip_len)
FORMAT_KEY = "format_version"
# 1: uint8 clips [B, T, S, S, 3] in, class probabilities out (it recorded no version).
# 2: videos in (`video_b64` or `video`), one row of label, score, top_k, num_clips, error out.
MODEL_FORMAT = 2
VIDEO_ROOT_ENV = "JLSTM_VIDEO_ROOT"
INPUT_COLUMNS = ("video_b64", "video")
OUTPUT_COLUMNS = ("label", "score", "top_k", "num_clips", "error")
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with the config, class names and clip grid it was
    trained and evaluated with."""

    net: JointAttentionNet
    model_cfg: ModelConfig
    class_names: list[str]
    grid: ClipGrid

    @property
    def frame_interval(self) -> int:
        """The training clips' frame step (clips to score need the same)."""
        return self.grid.frame_interval


def grid_of(model_cfg: ModelConfig, pipeline: dict[str, Any] | None) -> ClipGrid:
    """The clip grid a logged model names (its metadata); a model logged before the grid was
    recorded scores clips every `clip_len` frames (what predict and eval both did then)."""
    pipeline = pipeline or {}
    return ClipGrid(
        clip_len=model_cfg.clip_len,
        stride=int(pipeline.get(CLIP_STRIDE_KEY) or model_cfg.clip_len),
        frame_interval=int(pipeline.get(FRAME_INTERVAL_KEY) or 1),
    )


def load_from_files(
    weights: str | Path,
    model_config: str | Path,
    class_names: str | Path,
    device: str | torch.device = "cpu",
    pipeline: dict[str, Any] | None = None,
) -> LoadedModel:
    """Rebuild the network from its config and load the saved weights (eval mode); `pipeline`
    is the logged model's metadata (its clip grid)."""
    cfg = ModelConfig.model_validate(json.loads(Path(model_config).read_text()))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return LoadedModel(
        net=net_from_state(cfg, state, device), model_cfg=cfg,
        class_names=json.loads(Path(class_names).read_text()), grid=grid_of(cfg, pipeline),
    )


def net_from_state(
    cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> JointAttentionNet:
    """The network of `cfg` with the weights `state`, in eval mode on `device` (also how
    `jlstm predict`'s scoring actors build it from the state dict they are sent)."""
    # The saved state dict already holds the backbone's weights, so the build must not need
    # the training machine's VGG16 file, and its "randomly initialized" warning is moot.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VGG16Taps: no backbone_weights")
        net = JointAttentionNet(cfg.model_copy(update={"backbone_weights": None}))
    net.load_state_dict(state)
    return net.to(device).eval()


def with_frame_interval(loaded: LoadedModel, frame_interval: int | None) -> LoadedModel:
    """`loaded` with its grid's frame step replaced (None: kept)."""
    if frame_interval is None:
        return loaded
    return replace(loaded, grid=replace(loaded.grid, frame_interval=frame_interval))


def _given(value: Any) -> bool:
    """Whether a cell holds a value (a column one row of a request leaves out is NaN)."""
    return isinstance(value, str) and value != ""


def _resolve_under_root(path: str) -> Path:
    """The file `path` names under `JLSTM_VIDEO_ROOT`; raises ValueError, before anything is
    read, for a server without a root, a path outside it (symlinks followed) or no file."""
    root = os.environ.get(VIDEO_ROOT_ENV)
    if not root:
        raise ValueError(
            f"video paths are refused: the server has no {VIDEO_ROOT_ENV}; send the file's "
            "bytes as video_b64"
        )
    root_dir = Path(root).resolve()
    resolved = (root_dir / path).resolve()  # an absolute `path` stays itself
    if not resolved.is_relative_to(root_dir):
        raise ValueError(f"video {path!r} is outside {VIDEO_ROOT_ENV}")
    if not resolved.is_file():
        raise ValueError(f"video {path!r}: no such file under {VIDEO_ROOT_ENV}")
    return resolved


def _video_of(row: dict[str, Any]) -> bytes | Path:
    """The video one input row names: its decoded bytes or its checked path."""
    b64, path = row.get("video_b64"), row.get("video")
    if _given(b64) and _given(path):
        raise ValueError("give video_b64 or video, not both")
    if _given(b64):
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"video_b64 is not base64: {err}") from None
        if not data:
            raise ValueError("video_b64 is empty")
        return data
    if _given(path):
        return _resolve_under_root(path)
    raise ValueError("no video: give video_b64 (the file's bytes, base64) or video (a path)")


def prediction_row(
    scores: np.ndarray, num_clips: int, class_names: list[str], k: int = DEFAULT_TOP_K
) -> dict[str, Any]:
    """The output row (`OUTPUT_COLUMNS`) of a video scored `scores` ``[C]`` over `num_clips`
    clips: the one row format of the served model, `jlstm predict` and `jlstm eval`'s
    video_predictions.parquet."""
    ranked = top_k(scores, class_names, k)
    return {
        "label": ranked[0][0], "score": float(ranked[0][1]),
        "top_k": [{"label": name, "score": float(score)} for name, score in ranked],
        "num_clips": int(num_clips), "error": "",
    }


def error_row(error: str) -> dict[str, Any]:
    """The output row of a video that has no prediction: no label, score 0, its error."""
    return {"label": "", "score": 0.0, "top_k": [], "num_clips": 0, "error": error}


def decode_error(err: BaseException) -> str:
    """The `error` of a video the decoder refused (`VideoError`, `DecodeTimeout`)."""
    return f"cannot decode the video: {err}"


def predict_videos(loaded: LoadedModel, rows: pd.DataFrame, k: int = DEFAULT_TOP_K) -> pd.DataFrame:
    """One output row per input row (see the module's docstring); never raises for a bad
    video, only for a broken model or machine."""
    out: dict[str, list[Any]] = {column: [] for column in OUTPUT_COLUMNS}
    for row in rows.to_dict(orient="records"):
        try:
            prediction = predict_video(loaded.net, _video_of(row), loaded.grid)
        except VideoError as err:
            result = error_row(decode_error(err))
        except ValueError as err:
            result = error_row(str(err))
        else:
            result = prediction_row(
                prediction.scores, prediction.num_clips, loaded.class_names, k
            )
        for column in OUTPUT_COLUMNS:
            out[column].append(result[column])
    frame = pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))
    return frame.astype({"score": np.float64, "num_clips": np.int64})


class JointAttentionPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc interface: a DataFrame of videos in, a DataFrame of predictions out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the network from the logged artifacts, on the GPU when there is one."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_from_files(
            context.artifacts["weights"],
            context.artifacts["model_config"],
            context.artifacts["class_names"],
            device=device,
            pipeline=context.model_config,
        )

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Rows of `video_b64` or `video` in; label, score, top_k, num_clips, error out.
        `params`: `top_k`, how many classes each row's `top_k` lists (default 5)."""
        k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
        return predict_videos(self.loaded, pd.DataFrame(model_input), k)


mlflow.models.set_model(JointAttentionPyfunc())
