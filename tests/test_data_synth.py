"""Synthetic data: deterministic per seed, official layouts, and the `data` CLI commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from data_shards.config import DataConfig
from data_shards.index import list_entries, probe_video
from data_shards.splits import parse_hmdb51_splits, parse_ucf101_splits
from data_shards.synth import (
    SPLIT_FILES,
    _grid_velocities,
    _motion_frames,
    synthesize_dataset,
    synthesize_from_splits,
)
from data_shards.targets import TARGETS_FILE, box_cells

REPO = Path(__file__).resolve().parents[1]
UCF_LISTS = REPO / "tests" / "fixtures" / "ucfTrainTestlist"
UCF_VIDEOS = 13_320


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_synth_is_deterministic_per_seed(tmp_path: Path) -> None:
    kwargs = {"classes": 2, "videos_per_class": 3, "frame_size": 32, "num_frames": 10}
    first = _files(synthesize_dataset(tmp_path / "a", seed=5, **kwargs))
    assert first == _files(synthesize_dataset(tmp_path / "b", seed=5, **kwargs))
    other = _files(synthesize_dataset(tmp_path / "c", seed=6, **kwargs))
    assert other.keys() == first.keys() and other != first


def test_synth_layouts_parse_as_the_publishers(tmp_path: Path) -> None:
    kwargs = {"classes": 3, "videos_per_class": 6, "frame_size": 32, "num_frames": 8}
    ucf = synthesize_dataset(tmp_path / "ucf", layout="ucf101", **kwargs)
    text = (ucf / "ucfTrainTestlist" / "trainlist01.txt").read_bytes()
    assert text.count(b"\r\n") == text.count(b"\n") > 0  # CRLF, like the publisher's
    for split in (1, 2, 3):
        entries = parse_ucf101_splits(ucf / "ucfTrainTestlist", split)
        assert len(entries) == 18 and all((ucf / "UCF-101" / e.path).is_file() for e in entries)
        assert {e.subset for e in entries} == {"train", "test"}
    hmdb = synthesize_dataset(tmp_path / "hmdb", layout="hmdb51", **kwargs)
    entries = parse_hmdb51_splits(hmdb / "testTrainMulti_7030_splits", 1)
    assert len(entries) == 15  # one video per class is tagged 0 (unused)
    assert all((hmdb / "hmdb51" / e.path).is_file() for e in entries)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run(
        [sys.executable, "-m", "data_shards.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_synth_then_index(ray_cluster: None, tmp_path: Path) -> None:
    synth = _cli(
        "synth",
        "--out",
        str(tmp_path / "d"),
        "--classes",
        "2",
        "--videos-per-class",
        "3",
        "--seed",
        "1",
        "--num-frames",
        "12",
    )
    assert synth.returncode == 0, synth.stderr
    index = _cli(
        "index",
        "--dataset",
        "ucf101",
        "--root",
        str(tmp_path / "d"),
        "--split",
        "2",
        "--out",
        str(tmp_path / "m.parquet"),
    )
    assert index.returncode == 0, index.stderr
    assert "listed 6 videos: 6 ok, 0 quarantined" in index.stdout
    manifest = pq.read_table(tmp_path / "m.parquet")
    assert manifest.num_rows == 6 and set(manifest["num_frames"].to_pylist()) == {12}
    bad = _cli("index", "--dataset", "kinetics", "--root", str(tmp_path))
    assert bad.returncode == 2 and "invalid choice: 'kinetics'" in bad.stderr


@pytest.mark.parametrize("classes", [0, 17])
def test_synth_refuses_a_class_count_it_cannot_make(tmp_path: Path, classes: int) -> None:
    with pytest.raises(ValueError, match=f"classes={classes} is not allowed: choose 1..16"):
        synthesize_dataset(tmp_path, classes=classes)


def test_synth_from_splits_keeps_a_consistent_subset_of_the_real_lists(tmp_path: Path) -> None:
    root = synthesize_from_splits(tmp_path / "a", UCF_LISTS, every=200, num_frames=3)
    out = root / "ucfTrainTestlist"
    assert (out / "classInd.txt").read_bytes() == (UCF_LISTS / "classInd.txt").read_bytes()
    for name in SPLIT_FILES[1:]:  # the publisher's lines, bytes and order, for kept videos
        original = (UCF_LISTS / name).read_bytes().splitlines(keepends=True)
        kept = (out / name).read_bytes().splitlines(keepends=True)
        assert kept and set(kept) <= set(original)
        assert kept == [line for line in original if line in set(kept)]
    videos = -(-UCF_VIDEOS // 200)
    for split in (1, 2, 3):  # every kept video, once per split, train or test
        entries = parse_ucf101_splits(out, split)
        assert len({e.path for e in entries}) == len(entries) == videos
        assert {e.subset for e in entries} == {"train", "test"}
        assert all((root / "UCF-101" / e.path).is_file() for e in entries)
    assert probe_video(str(root / "UCF-101" / entries[0].path))["num_frames"] == 3
    # A video is the same in any subset that keeps it (every 400th is in every 200th).
    half = synthesize_from_splits(tmp_path / "b", UCF_LISTS, every=400, num_frames=3)
    assert _files(half / "UCF-101").items() <= _files(root / "UCF-101").items()
    assert _files(synthesize_from_splits(tmp_path / "c", UCF_LISTS, every=400, num_frames=3)) == (
        _files(half)
    )


def test_synth_from_splits_gives_every_class_its_own_motion() -> None:
    velocities = _grid_velocities(101)
    assert len(set(velocities)) == 101 and (0.0, 0.0) not in velocities
    # Classes differ by at least 1 px per frame at a 32 px frame (2 px at the 64 px scale).
    assert (
        min(
            max(abs(a[0] - b[0]), abs(a[1] - b[1]))
            for i, a in enumerate(velocities)
            for b in velocities[:i]
        )
        == 2.0
    )


def _synth_from_ucf_lists(
    out: Path, flags: list[str], timeout_s: float
) -> subprocess.CompletedProcess:
    """`python -m data_shards.cli synth --out OUT --splits-from <UCF101's lists> FLAGS`."""
    return subprocess.run(
        [sys.executable, "-m", "data_shards.cli", "synth", "--out", str(out),
         "--splits-from", str(UCF_LISTS), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
    )


@pytest.mark.slow
def test_cli_synth_from_splits_at_ucf101_video_count(tmp_path: Path) -> None:
    """All of UCF101's listed videos, in the publisher's layout, as the index lists them."""
    synth = _synth_from_ucf_lists(tmp_path, ["--frame-size", "32", "--num-frames", "2"], 900)
    assert synth.returncode == 0, synth.stderr
    assert f"wrote {UCF_VIDEOS} videos" in synth.stdout
    for split in (1, 2, 3):
        entries, names = list_entries(DataConfig(dataset="ucf101", root=str(tmp_path), split=split))
        assert len(entries) == UCF_VIDEOS and len(names) == 101
        assert len({e.label for e in entries}) == 101
        assert all((tmp_path / "UCF-101" / e.path).is_file() for e in entries)
    # HandstandPushups/ holds v_HandStandPushups_* files: the real paths are kept as listed.
    assert (tmp_path / "UCF-101/HandstandPushups/v_HandStandPushups_g01_c01.avi").is_file()
    assert probe_video(str(tmp_path / "UCF-101" / entries[-1].path))["num_frames"] == 2


def test_cli_synth_refuses_flags_the_split_lists_decide(tmp_path: Path) -> None:
    refused = _synth_from_ucf_lists(tmp_path, ["--classes", "3"], 60)
    assert refused.returncode == 2 and "drop --classes" in refused.stderr
    assert not (tmp_path / "UCF-101").exists()


def test_target_boxes_record_where_the_square_is_drawn(tmp_path: Path) -> None:
    root = synthesize_dataset(tmp_path / "d", classes=2, videos_per_class=2, frame_size=32,
                              num_frames=40)
    boxes = pq.read_table(root / TARGETS_FILE).to_pandas()
    videos = sorted(str(p.relative_to(root)) for p in root.rglob("*.avi"))
    assert sorted(boxes["video"].unique()) == videos
    assert (boxes.groupby("video")["frame"].count() == 40).all()
    # The same draw as the generator: the box's pixels, wrapped, are the square's colour.
    look = {"background": np.zeros((32, 32, 3), np.uint8), "colour": np.full(3, 200, np.uint8),
            "side": 7, "start": (28, 3)}
    frames, drawn = _motion_frames(12, 32, 1.5, -3.0, look)
    for frame, (top, left, side) in zip(frames, drawn, strict=True):
        ys, xs = (top + np.arange(side)) % 32, (left + np.arange(side)) % 32
        assert (frame[np.ix_(ys, xs)] == 200).all()
        assert (frame != 0).any(axis=2).sum() == side * side  # nothing drawn outside it


def test_box_cells_cover_every_location_the_box_touches_wrapping() -> None:
    # 32 px frame, 4 x 4 grid (8 px a location): a 10 px box at (6, 6) spans rows/cols 0-1.
    cells = box_cells(6, 6, 10, 32, 4).reshape(4, 4)
    assert cells[:2, :2].all() and cells.sum() == 4
    # At (28, 30) it wraps: rows 3 and 0-0, cols 3 and 0.
    cells = box_cells(28, 30, 10, 32, 4).reshape(4, 4)
    assert set(zip(*np.nonzero(cells), strict=True)) == {(3, 3), (3, 0), (0, 3), (0, 0)}
    # A box inside one location.
    assert box_cells(9, 17, 4, 32, 4).reshape(4, 4)[1, 2] and box_cells(9, 17, 4, 32, 4).sum() == 1
