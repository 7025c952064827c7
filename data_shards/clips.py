"""Clips: the clip tables Ray Data reads, and the frames a video's clips touch.

The clip grid itself (a clip is `clip_len` frames taken every `frame_interval` frames from
`start`; starts every `s` frames; a video shorter than one clip gives one looped clip at 0)
is the model's: `model.video`, shipped with the registered model, so training, `jlstm eval`,
`jlstm predict` and the served model sample clips with the same code. It is re-exported here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from model.video import clip_span, clip_starts, flow_frames, frame_indices

__all__ = [
    "CLIP_COLUMNS", "clip_span", "clip_starts", "clip_table", "flow_frames", "frame_indices",
    "needed_frames",
]

CLIP_COLUMNS = ("video_id", "video_path", "num_frames", "label", "clip_start")


def clip_table(videos: pa.Table, clip_len: int, stride: int, frame_interval: int = 1) -> pa.Table:
    """One row per clip of every video in `videos` (manifest rows), ordered by video, start.

    Columns: video_id, video_path, num_frames, label (int64), clip_start (int64).
    """
    counts = videos.column("num_frames").to_pylist()
    starts = [clip_starts(n, clip_len, stride, frame_interval) for n in counts]
    repeat = np.array([len(s) for s in starts], dtype=np.int64)
    rows = np.repeat(np.arange(videos.num_rows), repeat)
    table = videos.select(list(CLIP_COLUMNS[:-1])).take(pa.array(rows))
    flat = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
    return table.append_column("clip_start", pa.array(flat, pa.int64()))


def needed_frames(
    num_frames: int, clip_len: int, stride: int, frame_interval: int = 1
) -> list[int]:
    """Sorted distinct frames that the clips of one video touch (what the cache stores)."""
    frames = {
        f
        for start in clip_starts(num_frames, clip_len, stride, frame_interval)
        for f in frame_indices(start, num_frames, clip_len, frame_interval)
    }
    return sorted(frames)
