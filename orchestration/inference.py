"""Using a logged model: `jlstm eval` on every test clip, `jlstm predict` on one video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_shards import build_datasets, class_names, clip_starts, decode_clip, ensure_index
from model import clip_scores, normalize_frames
from orchestration import tracking
from orchestration.config import JlstmConfig
from orchestration.evaluate import EvalReport, evaluate
from orchestration.plots import plot_attention_overlay
from orchestration.train_loop import predict_clips
from orchestration.trainer import init_ray


def evaluate_model(model_uri: str, cfg: JlstmConfig, out_dir: str | Path) -> EvalReport:
    """Score every test clip of `cfg.data` with the model at `model_uri`; write the report."""
    tracking.connect()
    loaded = tracking.load_model(model_uri)
    init_ray()
    manifest = ensure_index(cfg.data)
    if class_names(manifest) != loaded.class_names:
        raise ValueError(
            f"model {model_uri} was trained on classes {loaded.class_names[:5]}..., "
            f"but {manifest} lists {class_names(manifest)[:5]}...: not the same dataset"
        )
    val = build_datasets(cfg.data, loaded.model_cfg)["val"]
    preds, _ = predict_clips(loaded.net, val, torch.device("cpu"), cfg.train.batch_size)
    report = evaluate(preds, loaded.class_names)
    report.write(Path(out_dir))
    return report


def predict_video(
    video: str | Path,
    model_uri: str,
    *,
    top_k: int = 5,
    attention_png: str | Path | None = None,
    frame_interval: int | None = None,
) -> list[tuple[str, float]]:
    """Top-k (class, probability) for one video: clip scores averaged over all its clips.

    `frame_interval` defaults to the one the model was trained with.
    """
    video = Path(video)
    if not video.is_file():
        raise FileNotFoundError(f"video {str(video)!r} does not exist")
    tracking.connect()
    loaded = tracking.load_model(model_uri)
    cfg = loaded.model_cfg
    if frame_interval is None:
        frame_interval = loaded.frame_interval
    from decord import VideoReader

    num_frames = len(VideoReader(str(video)))
    starts = clip_starts(num_frames, cfg.clip_len, cfg.clip_len, frame_interval)
    clips = np.stack(
        [
            decode_clip(str(video), s, num_frames, cfg.clip_len, frame_interval, cfg.frame_size)
            for s in starts
        ]
    )
    with torch.no_grad():
        out = loaded.net(normalize_frames(torch.as_tensor(clips)))
    scores = clip_scores(out.step_logits, cfg.last_steps, cfg.prediction).mean(0)
    top = torch.topk(scores, min(top_k, len(loaded.class_names)))
    if attention_png:
        plot_attention_overlay(
            clips[0], out.attention[0].numpy(), Path(attention_png),
            title=f"{video.name}: {loaded.class_names[int(top.indices[0])]}",
        )
    return [
        (loaded.class_names[int(i)], float(p))
        for p, i in zip(top.values, top.indices, strict=True)
    ]
