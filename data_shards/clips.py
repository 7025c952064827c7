"""Clips: which frames a clip holds, where clips start, and the clip tables Ray Data reads.

A clip is `clip_len` frames taken every `frame_interval` frames from `start`. Starts lie on
a grid of stride `s`. A video shorter than one clip gives one clip at 0 that loops the video.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

CLIP_COLUMNS = ("video_id", "video_path", "num_frames", "label", "clip_start")


def clip_span(clip_len: int, frame_interval: int) -> int:
    """Frames from a clip's first to its last frame, both included."""
    return (clip_len - 1) * frame_interval + 1


def clip_starts(num_frames: int, clip_len: int, stride: int, frame_interval: int = 1) -> list[int]:
    """Start frames of every clip of a video: 0, s, 2s, ... while the clip fits.

    A video shorter than one clip still gives the clip at 0 (looped by `frame_indices`).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames = {num_frames}: a video needs at least one frame")
    last = num_frames - clip_span(clip_len, frame_interval)
    return list(range(0, max(last, 0) + 1, stride))


def frame_indices(start: int, num_frames: int, clip_len: int, frame_interval: int = 1) -> list[int]:
    """The `clip_len` frame indices of the clip at `start`, wrapping past the video's end."""
    return [(start + i * frame_interval) % num_frames for i in range(clip_len)]


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
