"""The attention grids a finished run logs (paper Figure 6): the first clip of one test
video per class, decoded, run through the net, drawn by `plots.plot_attention_overlay`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data_shards.decode import decode_batch
from data_shards.manifest import video_file
from model import JointAttentionNet
from model.inputs import SOURCES
from model.inputs.sources import normalize_sources
from orchestration.config import JlstmConfig
from orchestration.plots import plot_attention_overlay

log = logging.getLogger(__name__)


def attention_examples(
    net: JointAttentionNet, cfg: JlstmConfig, test_videos: pa.Table, names: list[str],
    out_dir: Path, skip: set[int] | frozenset[int] = frozenset(),
) -> list[Path]:
    """Attention grids (paper Fig. 6) for the first clip of a few of `test_videos` (manifest
    rows), one per class; the videos in `skip` (ids whose clips failed in the evaluation) and
    a video that no longer decodes, or not within `data.decode_timeout_s`, are skipped
    (their clips are in bad_clips)."""
    test = test_videos.to_pandas()
    model_cfg = net.cfg
    paths: list[Path] = []
    plotted: set[int] = set()
    net.eval()
    for row in test.itertuples():
        if len(paths) == cfg.tracking.attention_examples:
            break
        if row.label in plotted or row.video_id in skip:
            continue
        # The clip at 0 with every source the net reads (its optical flow too).
        clip = decode_batch(
            {"video_path": np.array([video_file(cfg.data.root, row.video_path)]),
             "num_frames": np.array([row.num_frames]), "label": np.array([row.label]),
             "video_id": np.array([row.video_id]), "clip_start": np.array([0])},
            clip_len=model_cfg.clip_len, frame_interval=cfg.data.frame_interval,
            frame_size=model_cfg.frame_size, timeout_s=cfg.data.decode_timeout_s,
            flow=model_cfg.flow if model_cfg.reads_flow else None,
        )
        if not clip["ok"][0]:  # VideoError (DecodeTimeout past data.decode_timeout_s), ...
            log.warning("attention example: skipped %s: %s", row.video_path, clip["error"][0])
            continue
        frames = clip["frames"][0]
        sources = {key: torch.as_tensor(clip[key]) for key in SOURCES if key in clip}
        with torch.no_grad():
            out = net(normalize_sources(sources))
        predicted = names[int(out.step_logits[0, -1].argmax())]
        path = out_dir / f"attention_{Path(row.video_path).stem}.png"
        plot_attention_overlay(
            frames, out.attention[0].numpy(), path,
            title=f"{Path(row.video_path).name}: true {row.label_name}, predicted {predicted}",
        )
        paths.append(path)
        plotted.add(row.label)
    return paths
