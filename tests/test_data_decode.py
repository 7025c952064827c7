"""decord decoding: exactly the intended frames, resized, looped; failures become rows; a
decode that hangs (a FIFO: its open blocks forever in native code) ends at its deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_shards.clips import flow_frames
from data_shards.decode import decode_batch, decode_clip
from data_shards.synth import read_frame_index, write_index_video, write_video
from model.config import FlowConfig
from model.decode_process import BoundedDecoder, DecodeTimeout
from model.flow import decode_flow


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
@pytest.mark.parametrize("timeout_s", [30.0, None], ids=["bounded", "in-process"])
def test_decoded_clip_holds_exactly_the_intended_frames(
    index_video: str, start: int, interval: int, expected: list[int], timeout_s: float | None
) -> None:
    clip = decode_clip(
        index_video, start, 60, clip_len=8, frame_interval=interval, frame_size=32,
        timeout_s=timeout_s,
    )
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


def test_a_decode_that_hangs_is_a_timeout_row_once_and_the_next_clips_decode(
    index_video: str, tmp_path: Path
) -> None:
    """A FIFO swapped in for a video: opening it blocks forever inside decord. Its two clips
    cost one deadline (the second fails at once), and the clips after it decode in the
    restarted decoder process."""
    fifo = tmp_path / "swapped.avi"
    os.mkfifo(fifo)
    timeout_s = 1.5
    batch = {
        "video_path": np.array([index_video, str(fifo), str(fifo), index_video]),
        "num_frames": np.array([60, 60, 60, 60]),
        "label": np.array([0, 1, 1, 0]),
        "video_id": np.array([1, 2, 2, 1]),
        "clip_start": np.array([0, 0, 8, 16]),
    }
    started = time.monotonic()
    out = decode_batch(batch, clip_len=4, frame_interval=1, frame_size=32, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    assert out["ok"].tolist() == [True, False, False, True]
    assert all(f"{fifo}: timeout" in e for e in out["error"][1:3]), out["error"]
    assert [read_frame_index(f) for f in out["frames"][3]] == [16, 17, 18, 19]
    assert timeout_s <= elapsed < 2 * timeout_s, elapsed


def test_the_decoder_process_does_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    """A worker killed (SIGKILL) while its decoder hangs in native code leaves no process
    behind: the child gets the kernel's parent-death signal."""
    fifo = tmp_path / "hang.avi"
    os.mkfifo(fifo)
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from model.decode_process import BoundedDecoder\n"
         "d = BoundedDecoder(600); d._start(); print(d._child.pid, flush=True)\n"
         f"d.read({str(fifo)!r}, 32, [[0]])"],
        stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the child is now blocked opening the FIFO
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_bounded_decoder_reports_a_broken_file_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"not a video" * 100)
    decoder = BoundedDecoder(10)
    try:
        with pytest.raises(ValueError) as err:
            decoder.num_frames(garbage, 32)
        assert not isinstance(err.value, DecodeTimeout)
        assert "\n" not in str(err.value) and str(err.value)
    finally:
        decoder.close()


def test_a_video_replaced_under_the_same_path_is_read_anew(tmp_path: Path) -> None:
    """The child keeps readers open across calls; a file swapped in place must not be read
    through the old one (a rebuilt dataset, a re-copied file)."""
    path = tmp_path / "v.avi"
    write_index_video(path, 20, size=32)
    decoder = BoundedDecoder(10)
    try:
        assert decoder.num_frames(path, 32) == 20
        replacement = write_index_video(tmp_path / "new.avi", 40, size=32)
        os.replace(replacement, path)
        assert decoder.num_frames(path, 32) == 40
        clip = decoder.read(path, 32, [[30, 31]])[0]
        assert [read_frame_index(frame) for frame in clip] == [30, 31]
    finally:
        decoder.close()


def test_flow_frames_pair_each_clip_frame_with_the_next_at_the_interval() -> None:
    # The clip's frames first, then the one frame past it; the last frame pairs with itself
    # where the video ends (a zero flow), never with the video's first.
    assert flow_frames([0, 2, 4, 6], 9, 2, 1) == ([0, 2, 4, 6, 8], [(0, 1), (1, 2), (2, 3),
                                                                     (3, 4)])
    assert flow_frames([4, 6], 7, 2, 1) == ([4, 6], [(0, 1), (1, 1)])
    frames, pairs = flow_frames([0, 1], 10, 1, 3)  # a stack of 3 flows a step
    assert frames == [0, 1, 2, 3, 4] and pairs == [(0, 1), (1, 2), (2, 3), (1, 2), (2, 3),
                                                   (3, 4)]


def test_decode_batch_computes_the_optical_flow_of_a_model_that_reads_it(
    tmp_path: Path,
) -> None:
    """A textured frame panned right by 2 px a frame: with compensation none the flow is
    +2 px in x and 0 in y, at the clip's frame interval (4 px at interval 2); the camera
    compensation of the default takes the pan away. Failed rows are zeros."""
    rng = np.random.default_rng(0)
    world = cv2.GaussianBlur(rng.integers(0, 256, (64, 200, 3), dtype=np.uint8), (0, 0), 2)
    frames = np.stack([world[:, 2 * t : 2 * t + 64] for t in range(40)])[:, :, ::-1]
    path = write_video(tmp_path / "pan.avi", np.ascontiguousarray(frames))
    batch = {
        "video_path": np.array([str(path), str(path), "/nonexistent.avi"]),
        "num_frames": np.array([40, 40, 40]), "label": np.array([0, 0, 1]),
        "video_id": np.array([0, 0, 1]), "clip_start": np.array([0, 10, 0]),
    }
    raw = decode_batch(batch, clip_len=4, frame_interval=2, frame_size=64,
                       flow=FlowConfig(compensation="none"))
    assert raw["ok"].tolist() == [True, True, False]
    assert raw["optical_flow"].shape == (3, 4, 64, 64, 2)
    assert raw["optical_flow"].dtype == np.uint8 and not raw["optical_flow"][2].any()
    flow = decode_flow(raw["optical_flow"][:2, :, 16:48, 16:48])
    assert np.median(flow[..., 0]) == pytest.approx(4.0, abs=0.5)  # 2 px x interval 2
    assert np.median(flow[..., 1]) == pytest.approx(0.0, abs=0.5)
    compensated = decode_batch(batch, clip_len=4, frame_interval=2, frame_size=64,
                               flow=FlowConfig(stack=2))
    assert compensated["optical_flow"].shape == (3, 4, 64, 64, 4)
    assert np.abs(np.median(decode_flow(compensated["optical_flow"][:2]))) < 0.5
    np.testing.assert_array_equal(compensated["frames"], raw["frames"])
