"""Clip grids, looping of short videos, and the clip table."""

from __future__ import annotations

import pyarrow as pa

from data_shards.clips import clip_starts, clip_table, frame_indices, needed_frames


def test_clip_grid() -> None:
    assert clip_starts(100, clip_len=16, stride=8) == [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80]
    assert clip_starts(16, clip_len=16, stride=8) == [0]  # exactly one clip fits
    # With frame_interval 2 a clip spans (16 - 1) * 2 + 1 = 31 frames.
    assert clip_starts(40, clip_len=16, stride=4, frame_interval=2) == [0, 4, 8]
    assert frame_indices(4, 40, clip_len=3, frame_interval=2) == [4, 6, 8]


def test_short_videos_are_looped_not_dropped() -> None:
    assert clip_starts(5, clip_len=8, stride=4) == [0]
    assert frame_indices(0, 5, clip_len=8) == [0, 1, 2, 3, 4, 0, 1, 2]
    assert frame_indices(0, 1, clip_len=3) == [0, 0, 0]
    assert needed_frames(5, clip_len=8, stride=4) == [0, 1, 2, 3, 4]


def test_needed_frames_skip_gaps_between_clips() -> None:
    # Stride 10 > clip_len 4: frames 4..9 and 14..19 are in no clip.
    assert needed_frames(24, clip_len=4, stride=10) == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]


def test_clip_table_has_one_row_per_clip() -> None:
    videos = pa.table(
        {
            "video_id": [3, 7],
            "video_path": ["a.avi", "b.avi"],
            "num_frames": [20, 4],
            "label": [1, 0],
            "subset": ["test", "test"],
        }
    )
    table = clip_table(videos, clip_len=8, stride=6)
    assert table.to_pydict() == {
        "video_id": [3, 3, 3, 7],
        "video_path": ["a.avi"] * 3 + ["b.avi"],
        "num_frames": [20, 20, 20, 4],
        "label": [1, 1, 1, 0],
        "clip_start": [0, 6, 12, 0],
    }
