"""decord decoding: exactly the intended frames, resized, looped; failures become rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_shards.decode import decode_batch, decode_clip
from data_shards.synth import read_frame_index, write_index_video


@pytest.fixture(scope="module")
def index_video(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_index_video(tmp_path_factory.mktemp("idx") / "idx.avi", 60, size=64))


@pytest.mark.parametrize(
    ("start", "interval", "expected"),
    [
        (0, 1, list(range(0, 8))),
        (29, 1, list(range(29, 37))),  # not on a key frame: decord must seek exactly
        (5, 3, list(range(5, 27, 3))),
        (55, 1, [55, 56, 57, 58, 59, 0, 1, 2]),  # past the end: loops
    ],
)
def test_decoded_clip_holds_exactly_the_intended_frames(
    index_video: str, start: int, interval: int, expected: list[int]
) -> None:
    clip = decode_clip(index_video, start, 60, clip_len=8, frame_interval=interval, frame_size=32)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    assert [read_frame_index(frame) for frame in clip] == expected


def test_short_video_is_looped(tmp_path: Path) -> None:
    path = str(write_index_video(tmp_path / "short.avi", 5, size=32))
    clip = decode_clip(path, 0, 5, clip_len=12, frame_interval=1, frame_size=32)
    assert [read_frame_index(frame) for frame in clip] == [0, 1, 2, 3, 4] * 2 + [0, 1]


def test_decode_batch_flags_failures_without_raising(index_video: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"not a video" * 100)
    batch = {
        "video_path": np.array([index_video, str(garbage), index_video, "/nonexistent.avi"]),
        "num_frames": np.array([60, 60, 200, 60]),  # 200: the manifest is out of date
        "label": np.array([1, 2, 3, 4]),
        "video_id": np.array([10, 11, 10, 12]),
        "clip_start": np.array([8, 0, 150, 0]),
    }
    out = decode_batch(batch, clip_len=4, frame_interval=1, frame_size=32)
    assert out["ok"].tolist() == [True, False, False, False]
    assert out["error"][0] == "" and all(out["error"][1:])
    assert [read_frame_index(f) for f in out["frames"][0]] == [8, 9, 10, 11]
    assert not out["frames"][1:].any()  # failed clips are all-zero frames
    assert out["label"].tolist() == [1, 2, 3, 4] and out["label"].dtype == np.int64
