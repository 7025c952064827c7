"""Decoding clips with decord, one clip or a Ray Data batch of clip rows at a time."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from data_shards.clips import frame_indices

READERS_PER_WORKER = 4


@lru_cache(maxsize=READERS_PER_WORKER)
def open_reader(path: str, frame_size: int):
    """A decord VideoReader that resizes to frame_size x frame_size while decoding.

    One decoder thread: parallelism comes from Ray tasks, each with its own CPU budget.
    Opening indexes the whole file, so a worker process keeps its last few readers: the
    next batch of clips of the same video (evaluation order) skips that cost.
    """
    import decord  # imported in the worker that decodes, not by the driver's import chain

    return decord.VideoReader(path, width=frame_size, height=frame_size, num_threads=1)


def read_clip(
    reader, start: int, num_frames: int, clip_len: int, frame_interval: int
) -> np.ndarray:
    """uint8 [T, S, S, 3] frames of the clip at `start` from an open reader (looped if short)."""
    indices = frame_indices(start, num_frames, clip_len, frame_interval)
    return reader.get_batch(indices).asnumpy()


def decode_clip(
    path: str, start: int, num_frames: int, clip_len: int, frame_interval: int, frame_size: int
) -> np.ndarray:
    """uint8 [T, S, S, 3]: the clip of `clip_len` frames at `start` of the video at `path`."""
    return read_clip(open_reader(path, frame_size), start, num_frames, clip_len, frame_interval)


def decode_batch(
    batch: dict[str, np.ndarray], *, clip_len: int, frame_interval: int, frame_size: int,
    root: str = "",
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: clip rows in, decoded clips out; never raises.

    In: video_path (relative to `root`, the run's absolute `data.root`; an absolute path is
    opened as it is), num_frames, label, video_id, clip_start ([B] each).
    Out: frames uint8 [B, T, S, S, 3], label, video_id, clip_start (int64 [B]), ok (bool),
    error (str, "" when ok). A clip that fails keeps its row, all-zero frames, ok=False.
    Clips of one video share one reader (see `open_reader`).
    """
    size = len(batch["video_id"])
    frames = np.zeros((size, clip_len, frame_size, frame_size, 3), dtype=np.uint8)
    ok = np.ones(size, dtype=bool)
    errors = np.full(size, "", dtype=object)
    for i in range(size):
        path = os.path.join(root, str(batch["video_path"][i]))
        try:
            frames[i] = read_clip(
                open_reader(path, frame_size),
                int(batch["clip_start"][i]),
                int(batch["num_frames"][i]),
                clip_len,
                frame_interval,
            )
        except Exception as e:  # decord raises DECORDError, RuntimeError, IndexError...
            ok[i] = False
            # One line: decord's messages span several, and errors end up in CSV rows and
            # one-line reports.
            errors[i] = f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return {
        "frames": frames,
        "label": batch["label"].astype(np.int64),
        "video_id": batch["video_id"].astype(np.int64),
        "clip_start": batch["clip_start"].astype(np.int64),
        "ok": ok,
        "error": errors,
    }
