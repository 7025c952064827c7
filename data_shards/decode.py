"""Decoding clips with decord, one clip or a Ray Data batch of clip rows at a time.

Every decode has a deadline (`data.decode_timeout_s`): it runs in this process's
`model.decode_process.BoundedDecoder`, a child process killed and replaced when a call
overruns, so a file that hangs the decoder (a FIFO, a decord native hang) costs one deadline
and becomes a bad clip with reason "timeout". `decode_timeout_s: null` decodes in this
process without a deadline (what benchmarks/decode.py compares against).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np

from data_shards.clips import frame_indices
from model.config import FlowConfig
from model.decode_process import (
    DEFAULT_TIMEOUT_S,
    VideoError,
    one_line,
    open_video,
    shared_decoder,
)
from model.video import read_clips

READERS_PER_WORKER = 4


@lru_cache(maxsize=READERS_PER_WORKER)
def _in_process_reader(path: str, frame_size: int) -> Any:
    """A reader opened in this process (no deadline); a worker keeps its last few, as the
    bounded decoder's child does: the next clips of the same video skip the open."""
    return open_video(path, frame_size)


def decode_clip(
    path: str, start: int, num_frames: int, clip_len: int, frame_interval: int, frame_size: int,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """uint8 [T, S, S, 3]: the clip of `clip_len` frames at `start` of the video at `path`
    (looped if short). Raises `model.video.VideoError` (`DecodeTimeout` past `timeout_s`)."""
    indices = frame_indices(start, num_frames, clip_len, frame_interval)
    return _read(path, frame_size, [indices], timeout_s)[0]


def _read(
    path: str, frame_size: int, clips: list[list[int]], timeout_s: float | None
) -> np.ndarray:
    """uint8 [N, T, S, S, 3]: the frames `clips[i]` of one video, in one decoder call."""
    if timeout_s is None:
        reader = _in_process_reader(path, frame_size)
        return np.stack([reader.get_batch(clip).asnumpy() for clip in clips])
    return shared_decoder(timeout_s).read(path, frame_size, clips)


def decode_batch(
    batch: dict[str, np.ndarray], *, clip_len: int, frame_interval: int, frame_size: int,
    root: str = "", timeout_s: float | None = DEFAULT_TIMEOUT_S, flow: FlowConfig | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: clip rows in, decoded clips out; never raises.

    In: video_path (relative to `root`, the run's absolute `data.root`; an absolute path is
    opened as it is), num_frames, label, video_id, clip_start ([B] each).
    Out: frames uint8 [B, T, S, S, 3], label, video_id, clip_start (int64 [B]), ok (bool),
    error (str, "" when ok); with `flow` (a model that reads it), optical_flow uint8
    [B, T, S, S, 2L], computed here from the frames around each clip (`model.video.
    read_clips`). A clip that fails (or overruns `timeout_s`) keeps its row, all-zero
    arrays, ok=False and the reason: "<path>: timeout: ..." for a deadline.
    """
    size = len(batch["video_id"])
    out = {"frames": np.zeros((size, clip_len, frame_size, frame_size, 3), dtype=np.uint8)}
    if flow is not None:
        out["optical_flow"] = np.zeros(
            (size, clip_len, frame_size, frame_size, 2 * flow.stack), dtype=np.uint8
        )
    ok = np.ones(size, dtype=bool)
    errors = np.full(size, "", dtype=object)
    # The rows of one video are decoded in one call: one round trip to the decoder process
    # per video of the batch, not per clip (clip rows of a video arrive together).
    rows_of: dict[tuple[str, int], list[int]] = {}
    for i in range(size):
        path = os.path.join(root, str(batch["video_path"][i]))
        rows_of.setdefault((path, int(batch["num_frames"][i])), []).append(i)

    def read(path: str, num_frames: int, rows: list[int]) -> None:
        clips = [frame_indices(int(batch["clip_start"][i]), num_frames, clip_len,
                               frame_interval) for i in rows]
        arrays = read_clips(lambda lists: _read(path, frame_size, lists, timeout_s), clips,
                            num_frames, frame_interval, flow)
        for name, values in arrays.items():
            out[name][rows] = values

    for (path, num_frames), rows in rows_of.items():
        try:
            read(path, num_frames, rows)
            continue
        except Exception:  # one clip of several may be the bad one: try each alone
            pass
        for i in rows:
            try:
                read(path, num_frames, [i])
            except Exception as e:  # VideoError, or decord's own (in-process decoding)
                ok[i] = False
                # One line: errors end up in CSV rows and one-line reports.
                errors[i] = f"{path}: {e if isinstance(e, VideoError) else one_line(e)}"
    return {
        **out,
        "label": batch["label"].astype(np.int64),
        "video_id": batch["video_id"].astype(np.int64),
        "clip_start": batch["clip_start"].astype(np.int64),
        "ok": ok,
        "error": errors,
    }
