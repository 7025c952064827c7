"""Synthetic data: deterministic per seed, official layouts, and the `data` CLI commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from data_shards.splits import parse_hmdb51_splits, parse_ucf101_splits
from data_shards.synth import synthesize_dataset

REPO = Path(__file__).resolve().parents[1]


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
