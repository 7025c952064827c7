"""Where the action is: the synthetic generator's box of the moving shape, on the K x K grid.

`synthesize_dataset` knows where its moving square is in every frame and writes it to
`<root>/target_boxes.parquet` (TARGETS_FILE). Evaluation turns each test clip's boxes into
the grid locations the square touches, to measure whether the attention looks at it
(`orchestration.evaluate.attention_on_target`). Real datasets have no such file; then
there is nothing to measure.

Decision (which locations are "in the box"): every location of the K x K grid that the
box overlaps at all. Location (r, c) covers the frame's pixels [r * S/K, (r+1) * S/K) by
[c * S/K, (c+1) * S/K), the region AdaptiveAvgPool(K) averages (model/backbone.py), and
the square wraps past the borders as the generator draws it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_shards.clips import frame_indices

TARGETS_FILE = "target_boxes.parquet"
# (video_ids [N], clip_starts [N]) -> bool [N, T, K*K], or None for clips without boxes:
# `clip_target_cells` with a dataset's cells and clip settings bound (`target_reader`).
TargetCells = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]
_SCHEMA = pa.schema([
    ("video", pa.string()),  # the video's path relative to the dataset root (posix)
    ("frame", pa.int32()),
    ("top", pa.int32()),  # pixels of the generated frame, 0..frame_size-1
    ("left", pa.int32()),
    ("side", pa.int32()),
    ("frame_size", pa.int32()),
])


def write_target_boxes(
    root: str | os.PathLike, boxes: dict[str, list[tuple[int, int, int]]], frame_size: int
) -> Path:
    """`root/TARGETS_FILE`: one row per video and frame with the square's (top, left, side)."""
    rows = [
        {"video": video, "frame": t, "top": top, "left": left, "side": side,
         "frame_size": frame_size}
        for video, frames in boxes.items()
        for t, (top, left, side) in enumerate(frames)
    ]
    path = Path(root) / TARGETS_FILE
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), path)
    return path


def box_cells(top: int, left: int, side: int, frame_size: int, map_size: int) -> np.ndarray:
    """bool [K*K]: the grid locations a (wrapping) square box overlaps."""
    rows = np.zeros(map_size, dtype=bool)
    cols = np.zeros(map_size, dtype=bool)
    pixels = np.arange(side)
    rows[((top + pixels) % frame_size) * map_size // frame_size] = True
    cols[((left + pixels) % frame_size) * map_size // frame_size] = True
    return (rows[:, None] & cols[None, :]).reshape(-1)


def load_target_cells(
    root: str | os.PathLike, manifest: pa.Table, map_size: int
) -> dict[int, np.ndarray] | None:
    """{video_id: bool [num_frames, K*K]} for the manifest's videos that have boxes, or None
    when the dataset has no TARGETS_FILE (a real dataset)."""
    path = Path(root) / TARGETS_FILE
    if not path.is_file():
        return None
    boxes = pq.read_table(path).to_pandas().sort_values(["video", "frame"])
    by_video = {video: group for video, group in boxes.groupby("video", sort=False)}
    cells: dict[int, np.ndarray] = {}
    # Both are relative to the dataset root (manifest.py), so they match wherever it lies.
    for video_id, video_path in zip(
        manifest["video_id"].to_pylist(), manifest["video_path"].to_pylist(), strict=True
    ):
        group = by_video.get(video_path)
        if group is None:
            continue
        cells[int(video_id)] = np.stack([
            box_cells(r.top, r.left, r.side, r.frame_size, map_size)
            for r in group.itertuples()
        ])
    return cells


def clip_target_cells(
    targets: dict[int, np.ndarray],
    video_ids: np.ndarray,
    clip_starts: np.ndarray,
    clip_len: int,
    frame_interval: int,
) -> np.ndarray | None:
    """bool [N, T, K*K]: the box's locations at every step of each clip, or None when a
    clip's video has no boxes (then the batch is not measured)."""
    if any(int(v) not in targets for v in video_ids):
        return None
    return np.stack([
        targets[int(v)][frame_indices(int(s), len(targets[int(v)]), clip_len, frame_interval)]
        for v, s in zip(video_ids, clip_starts, strict=True)
    ])


def target_reader(
    root: str | os.PathLike, manifest: pa.Table, map_size: int, clip_len: int,
    frame_interval: int,
) -> TargetCells | None:
    """What evaluation calls per batch to get its clips' target locations; None without
    TARGETS_FILE. A plain partial of module functions, so it pickles to Ray workers."""
    cells = load_target_cells(root, manifest, map_size)
    if cells is None:
        return None
    return partial(clip_target_cells, cells, clip_len=clip_len, frame_interval=frame_interval)
