"""Synthetic data: deterministic per seed, official layouts, and the `data` CLI commands."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from data_shards.cli import main as data_cli
from data_shards.config import DataConfig
from data_shards.index import list_entries, probe_video
from data_shards.splits import parse_hmdb51_splits, parse_ucf101_splits
from data_shards.synth import (
    CAMERA_CLASSES,
    SPLIT_FILES,
    _camera_frames,
    _camera_path,
    _camera_pools,
    _camera_tracks,
    _draw_camera_scene,
    _grid_velocities,
    _keep_in_view,
    _motion_frames,
    _object_patch,
    _object_velocity,
    _video_source,
    synthesize_dataset,
    synthesize_from_splits,
    write_video,
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


# ---- the "camera" scene --------------------------------------------------------------------

# sha256 of the frames and boxes the square scene rendered (seed 3, 2 classes x 2 videos,
# 32 px, 6 frames) before the camera scene existed: the default must keep writing them
# (the cached demo data and every test built on synthetic videos depend on it).
_SQUARE_RENDER_SHA256 = "26e03f6f223829e3c9447b46eb8a4fe4e133da6d5738a8c061e327f2f6ab4359"


def test_default_scene_writes_the_videos_it_always_did(tmp_path: Path) -> None:
    names, render = _video_source("square", classes=2, seed=3, frame_size=32, num_frames=6)
    digest = hashlib.sha256()
    for k in (0, 0, 1, 1):  # the dataset's order: class by class
        frames, boxes = render(k)
        digest.update(frames.tobytes())
        digest.update(np.asarray(boxes, dtype=np.int64).tobytes())
    assert names == ["SquareEast", "SquareWest"]
    assert digest.hexdigest() == _SQUARE_RENDER_SHA256
    kwargs = {"classes": 2, "videos_per_class": 2, "seed": 3, "frame_size": 32, "num_frames": 6}
    default = _files(synthesize_dataset(tmp_path / "default", **kwargs))
    assert default == _files(synthesize_dataset(tmp_path / "square", scene="square", **kwargs))


def test_camera_scene_writes_its_classes_in_both_layouts(tmp_path: Path) -> None:
    kwargs = {"scene": "camera", "videos_per_class": 3, "frame_size": 32, "num_frames": 8}
    ucf = synthesize_dataset(tmp_path / "ucf", classes=6, **kwargs)
    assert sorted(p.name for p in (ucf / "UCF-101").iterdir()) == sorted(CAMERA_CLASSES)
    entries = parse_ucf101_splits(ucf / "ucfTrainTestlist", 1)
    assert len(entries) == 18 and all((ucf / "UCF-101" / e.path).is_file() for e in entries)
    assert probe_video(str(ucf / "UCF-101" / entries[0].path))["num_frames"] == 8
    boxes = pq.read_table(ucf / TARGETS_FILE).to_pandas()
    assert sorted(boxes["video"].unique()) == sorted(
        str(p.relative_to(ucf)) for p in ucf.rglob("*.avi")
    )
    assert (boxes.groupby("video")["frame"].count() == 8).all()
    # The object stays wholly inside the frame: its box never wraps.
    assert (boxes["top"] >= 0).all() and (boxes["left"] >= 0).all()
    assert (boxes[["top", "left"]].max(axis=1) + boxes["side"] <= 32).all()
    hmdb = synthesize_dataset(tmp_path / "hmdb", layout="hmdb51", classes=2, **kwargs)
    assert sorted(p.name for p in (hmdb / "hmdb51").iterdir()) == ["objectsteadyfast",
                                                                  "objectsteadyslow"]
    assert len(parse_hmdb51_splits(hmdb / "testTrainMulti_7030_splits", 1)) == 6
    again = synthesize_dataset(tmp_path / "again", layout="hmdb51", classes=2, **kwargs)
    assert _files(again) == _files(hmdb)  # deterministic per seed


def _global_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(dy, dx) by which frame b's content is frame a's moved (phase correlation)."""
    fa, fb = (np.fft.fft2(f.astype(float).mean(axis=2) - f.mean()) for f in (a, b))
    cross = fb * np.conj(fa)
    peak = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)))
    y, x = np.unravel_index(np.argmax(peak), peak.shape)
    h, w = peak.shape
    return (int(y + h // 2) % h - h // 2, int(x + w // 2) % w - w // 2)


def test_the_camera_pans_and_shakes_and_the_video_shows_it(tmp_path: Path) -> None:
    size, num_frames = 48, 12
    scene = _draw_camera_scene(_camera_pools(size, 0), np.random.default_rng(1), num_frames, size)
    camera = _camera_path(scene, num_frames, size)
    steps = np.diff(camera, axis=0)
    assert np.abs(steps).sum(axis=1).mean() > 0.5  # it moves every frame or two
    assert (camera >= 0).all() and (camera <= size).all()  # the view stays in the world
    # Decoded, the background moves against the camera: -its step, frame after frame.
    frames, _ = _camera_frames("ObjectCircle", scene, num_frames, size)
    with av.open(str(write_video(tmp_path / "v.avi", frames))) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    shifts = np.array([_global_shift(a, b) for a, b in itertools.pairwise(decoded)])
    assert np.abs(shifts).sum(axis=1).mean() > 0.5
    assert (shifts == -steps).all(axis=1).mean() >= 0.8


def test_on_screen_motion_is_the_objects_own_minus_the_cameras() -> None:
    rng = np.random.default_rng(0)
    velocity = rng.normal(0, 2, size=(9, 2))
    camera = np.cumsum(rng.integers(-2, 3, size=(10, 2)), axis=0)
    # A frame so large the object never reaches a border: nothing bounces.
    screen = _keep_in_view(velocity, camera, (500.0, 500.0), 1000, 10)
    own = np.concatenate([np.zeros((1, 2)), np.cumsum(velocity, axis=0)])
    assert (screen == np.rint(500 + own - (camera - camera[0]))).all()
    # In a small frame it bounces off the borders instead of leaving or wrapping.
    screen = _keep_in_view(np.full((40, 2), 3.0), np.zeros((41, 2), int), (0.0, 0.0), 32, 8)
    assert screen.min() == 0 and screen.max() == 24 and len(np.unique(screen[:, 0])) > 2
    assert (np.abs(np.diff(screen, axis=0)) == 3).all()  # at its own speed all the way


def _profile(velocity: np.ndarray) -> np.ndarray:
    """(mean speed, speed std, net travel / path length over 24 frames) of [T - 1, 2] steps."""
    speed = np.linalg.norm(velocity, axis=1)
    straightness = np.linalg.norm(velocity[:24].sum(axis=0)) / speed[:24].sum()
    return np.array([speed.mean(), speed.std(), straightness])


def test_classes_differ_in_motion_and_not_in_look() -> None:
    size, num_frames = 64, 49
    pools = _camera_pools(size, 0)
    rng = np.random.default_rng(2)
    for _ in range(3):
        scene = _draw_camera_scene(pools, rng, num_frames, size)
        # One scene, every class: the same look, world, camera and distractor (frame 0 is
        # the same), only the object's own motion differs.
        firsts = [_camera_frames(n, scene, num_frames, size)[0][0] for n in CAMERA_CLASSES]
        assert all((first == firsts[0]).all() for first in firsts)
        cameras = [_camera_tracks(n, scene, num_frames, size)[0] for n in CAMERA_CLASSES]
        assert all((c == cameras[0]).all() for c in cameras)
        profiles = [
            _profile(_object_velocity(n, num_frames, 1.0, scene.direction, scene.handed,
                                      scene.phase))
            for n in CAMERA_CLASSES
        ]
        for i, a in enumerate(profiles):  # every pair of classes moves clearly differently
            assert all(np.abs(a - b).max() >= 0.3 for b in profiles[:i])
        # The direction is no cue: a class's speed profile is the same in every direction.
        for name in CAMERA_CLASSES:
            speeds = [
                np.linalg.norm(_object_velocity(name, num_frames, 1.0, d, 1, 0.0), axis=1)
                for d in (0.0, 2.0, 4.0)
            ]
            assert np.allclose(speeds[0], speeds[1]) and np.allclose(speeds[0], speeds[2])
        # Object and distractor looks come from the pools every class shares.
        for look in (scene.look, scene.distractor_look):
            assert any(look["colour"] is c for c in pools["colour"])
            assert look["side"] in pools["side"]
            assert any(look["texture"] is t for t in pools["texture"])
        assert any(scene.world is w for w in pools["world"])


def test_camera_boxes_are_where_the_object_is_drawn() -> None:
    size, num_frames = 32, 20
    scene = _draw_camera_scene(_camera_pools(size, 4), np.random.default_rng(4), num_frames, size)
    frames, boxes = _camera_frames("ObjectZigZag", scene, num_frames, size)
    assert frames.shape == (num_frames, size, size, 3) and frames.dtype == np.uint8
    patch = _object_patch(scene.look)
    for frame, (top, left, side) in zip(frames, boxes, strict=True):
        assert 0 <= top <= size - side and 0 <= left <= size - side
        assert (frame[top : top + side, left : left + side] == patch).all()


@pytest.mark.parametrize("classes", [0, 7])
def test_camera_scene_refuses_a_class_count_it_cannot_make(tmp_path: Path, classes: int) -> None:
    match = f"classes={classes} is not allowed for scene 'camera': choose 1..6"
    with pytest.raises(ValueError, match=match):
        synthesize_dataset(tmp_path, scene="camera", classes=classes)
    with pytest.raises(ValueError, match="scene='tilt' is not allowed"):
        synthesize_dataset(tmp_path, scene="tilt")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_cli_synth_camera_scene(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = data_cli(["synth", "--out", str(tmp_path / "d"), "--scene", "camera", "--classes",
                     "2", "--videos-per-class", "2", "--frame-size", "32", "--num-frames", "4"])
    assert code == 0
    assert "wrote 4 videos (ucf101 layout, camera scene)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "d" / "UCF-101").iterdir()) == [
        "ObjectSteadyFast", "ObjectSteadySlow"]
    refused = _synth_from_ucf_lists(tmp_path / "s", ["--scene", "camera"], 60)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "--splits-from writes the square scene only: drop --scene camera"]
    assert not (tmp_path / "s" / "UCF-101").exists()
