"""Synthetic videos: a motion-only dataset in the publishers' layouts, and test helpers.

Every file is a real MPEG-4 Part 2 stream in an AVI container (what UCF101 ships), written
with PyAV, so the whole pipeline (probe, decord decode, resize) runs on the real code path.
`synthesize_from_splits` writes one such video for every entry of real UCF101 split lists,
so the index, the cache and the clip stream can be run at UCF101's video count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import av
import numpy as np

from data_shards.splits import ucf101_class_names
from data_shards.targets import write_target_boxes

FPS = 25
# Directions (dy, dx) at speed 1; classes are direction x speed. Speeds are pixels per frame
# at a 64 px frame and scale with the frame size, so a dataset looks the same at any size.
_DIRECTIONS = {
    "East": (0, 1),
    "West": (0, -1),
    "South": (1, 0),
    "North": (-1, 0),
    "SouthEast": (1, 1),
    "NorthWest": (-1, -1),
    "NorthEast": (-1, 1),
    "SouthWest": (1, -1),
}
_SPEEDS = {"": 1.5, "Fast": 3.0}
MAX_CLASSES = len(_DIRECTIONS) * len(_SPEEDS)
# Pools shared by every class: a video's look says nothing about its label (see the issue:
# unique backgrounds per video let a model memorize videos instead of learning motion).
_POOL_SIZE = 6

# Many-class motion (split lists of up to hundreds of classes): class k moves by the k-th
# shortest non-zero integer vector (a, b) times this many pixels per frame at 64 px, so
# any two classes differ by at least 1 px per frame at a 32 px frame.
_GRID_STEP = 2.0
SPLIT_FILES = ("classInd.txt", *(f"{s}list0{n}.txt" for s in ("train", "test") for n in (1, 2, 3)))

UCF_GROUPS = 25  # UCF101 groups g01..g25; testlistNN holds groups 7(N-1)+1 .. 7N


def _class_specs(classes: int) -> list[tuple[str, float, float]]:
    """[(name, dy, dx)] for the first `classes` motion classes (pixels per frame)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes={classes} is not allowed: choose 1..{MAX_CLASSES}")
    specs = [
        (f"Square{direction}{speed_name}", dy * speed, dx * speed)
        for speed_name, speed in _SPEEDS.items()
        for direction, (dy, dx) in _DIRECTIONS.items()
    ]
    return specs[:classes]


def _grid_velocities(classes: int) -> list[tuple[float, float]]:
    """(dy, dx) per frame at 64 px of `classes` classes: integer vectors by length, then angle."""
    radius = math.isqrt(classes) + 1  # a disc of this radius holds more than `classes` points
    vectors = [
        (a, b)
        for a in range(-radius, radius + 1)
        for b in range(-radius, radius + 1)
        if (a, b) != (0, 0)
    ]
    vectors.sort(key=lambda v: (v[0] ** 2 + v[1] ** 2, math.atan2(v[0], v[1])))
    return [(a * _GRID_STEP, b * _GRID_STEP) for a, b in vectors[:classes]]


def _pools(size: int, seed: int) -> dict[str, list]:
    """Backgrounds, colours, square sizes and start positions shared by all classes."""
    rng = np.random.default_rng(seed)
    backgrounds = []
    for _ in range(_POOL_SIZE):
        # Clutter: a dim noise floor with random static rectangles (distractors).
        bg = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        for _ in range(12):
            h, w = rng.integers(size // 16 + 1, size // 4 + 1, size=2)
            y, x = rng.integers(0, size, size=2)
            bg[y : y + h, x : x + w] = rng.integers(30, 200, size=3, dtype=np.uint8)
        backgrounds.append(bg)
    return {
        "background": backgrounds,
        "colour": [rng.integers(150, 256, size=3, dtype=np.uint8) for _ in range(_POOL_SIZE)],
        "side": [int(s) for s in rng.integers(size // 6, size // 3, size=_POOL_SIZE)],
        "start": [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(_POOL_SIZE)],
    }


def _motion_frames(
    num_frames: int, size: int, dy: float, dx: float, look: dict
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """uint8 [num_frames, size, size, 3]: a square moving by (dy, dx) per frame, wrapping;
    and its box in every frame, (top, left, side) in pixels (top, left in 0..size-1; the
    square wraps past the right and bottom borders)."""
    frames = np.repeat(look["background"][None], num_frames, axis=0)
    side = look["side"]
    y0, x0 = look["start"]
    grid = np.arange(size)
    boxes = []
    for t in range(num_frames):
        top, left = round(y0 + dy * t) % size, round(x0 + dx * t) % size
        # Wrap around the borders so the square never leaves the frame.
        ys = (top + np.arange(side)) % size
        xs = (left + np.arange(side)) % size
        mask = np.isin(grid, ys)[:, None] & np.isin(grid, xs)[None, :]
        frames[t][mask] = look["colour"]
        boxes.append((top, left, side))
    return frames, boxes


def write_video(
    path: Path,
    frames: np.ndarray,
    *,
    fps: int = FPS,
    bit_rate: int = 2_000_000,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode uint8 [T, H, W, 3] RGB frames as MPEG-4 Part 2 (codec "mpeg4") into `path`.

    The container follows the suffix (.avi like UCF101, .mp4 for the fast-start case).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bit_rate
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _pick_look(pools: dict[str, list], rng: np.random.Generator) -> dict:
    """One value from each shared pool, chosen independently of the class."""
    return {key: values[int(rng.integers(len(values)))] for key, values in pools.items()}


def _crlf(lines: list[str]) -> str:
    """Join lines the way the publishers' split files are written (CRLF, trailing newline)."""
    return "".join(f"{line}\r\n" for line in lines)


def _ucf_group(i: int, videos_per_class: int) -> int:
    """Spread a class's videos over groups 1..25 so each of the 3 splits has test videos."""
    return 1 + i * UCF_GROUPS // videos_per_class


def _write_ucf_splits(out: Path, names: list[str], files: dict[str, list[tuple[str, int]]]) -> None:
    """classInd.txt, trainlist0N.txt ("path label", 1-based), testlist0N.txt (path only)."""
    split_dir = out / "ucfTrainTestlist"
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "classInd.txt").write_bytes(
        _crlf([f"{k + 1} {name}" for k, name in enumerate(names)]).encode()
    )
    for split in (1, 2, 3):
        test_groups = range(7 * (split - 1) + 1, 7 * split + 1)
        train, test = [], []
        for k, name in enumerate(names):
            for rel, group in files[name]:
                (test.append(rel) if group in test_groups else train.append(f"{rel} {k + 1}"))
        (split_dir / f"trainlist0{split}.txt").write_bytes(_crlf(train).encode())
        (split_dir / f"testlist0{split}.txt").write_bytes(_crlf(test).encode())


def _hmdb_tag(i: int, videos_per_class: int, split: int) -> int:
    """HMDB51 tag: 1 train, 2 test (a different third per split), 0 unused (last, if >= 5)."""
    if videos_per_class >= 5 and i == videos_per_class - 1:
        return 0
    return 2 if (i + split) % 3 == 0 else 1


def synthesize_dataset(
    out_dir: str | os.PathLike,
    layout: Literal["ucf101", "hmdb51"] = "ucf101",
    classes: int = 4,
    videos_per_class: int = 6,
    seed: int = 0,
    frame_size: int = 64,
    num_frames: int = 48,
) -> Path:
    """Write a motion-only dataset of AVI files plus official-style split files.

    ucf101: out/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and out/ucfTrainTestlist/.
    hmdb51: out/hmdb51/<class>/<class>_video_NN.avi and out/testTrainMulti_7030_splits/.
    Both: out/target_boxes.parquet, the moving square's box in every frame (what the
    attention should find, `data_shards.targets`).
    Returns `out_dir`, which `index_videos` accepts as the dataset root.
    """
    out = Path(out_dir)
    specs = _class_specs(classes)
    pools = _pools(frame_size, seed)
    scale = frame_size / 64
    rng = np.random.default_rng([seed, 1])
    files: dict[str, list[tuple[str, int]]] = {}
    boxes: dict[str, list[tuple[int, int, int]]] = {}
    for name, dy, dx in specs:
        files[name] = []
        seen: dict[int, int] = {}
        for i in range(videos_per_class):
            group = _ucf_group(i, videos_per_class)
            seen[group] = seen.get(group, 0) + 1
            if layout == "ucf101":
                rel = f"{name}/v_{name}_g{group:02d}_c{seen[group]:02d}.avi"
                video_path = out / "UCF-101" / rel
            else:
                rel = f"{name.lower()}_video_{i:02d}.avi"
                video_path = out / "hmdb51" / name.lower() / rel
            look = _pick_look(pools, rng)
            frames, video_boxes = _motion_frames(
                num_frames, frame_size, dy * scale, dx * scale, look
            )
            write_video(video_path, frames)
            files[name].append((rel, group))
            boxes[video_path.relative_to(out).as_posix()] = video_boxes
    if layout == "ucf101":
        _write_ucf_splits(out, [name for name, _, _ in specs], files)
    else:
        split_dir = out / "testTrainMulti_7030_splits"
        split_dir.mkdir(parents=True, exist_ok=True)
        for name, _, _ in specs:
            for split in (1, 2, 3):
                lines = [
                    f"{rel} {_hmdb_tag(i, videos_per_class, split)} "
                    for i, (rel, _) in enumerate(files[name])
                ]
                (split_dir / f"{name.lower()}_test_split{split}.txt").write_bytes(
                    _crlf(lines).encode()
                )
    write_target_boxes(out, boxes, frame_size)
    return out


def _listed_path(line: bytes) -> str:
    """The video path of a split-file line ("Class/v_Class_g01_c01.avi[ label]")."""
    return line.split()[0].decode()


def synthesize_from_splits(
    out_dir: str | os.PathLike,
    splits_dir: str | os.PathLike,
    *,
    every: int = 1,
    seed: int = 0,
    frame_size: int = 32,
    num_frames: int = 4,
) -> Path:
    """One synthetic video per video of UCF101-style split lists, at its listed path.

    `splits_dir` holds classInd.txt and train/testlist0{1,2,3}.txt (the publisher's, e.g.
    tests/fixtures/ucfTrainTestlist: 13,320 videos, 101 classes). Writes
    out/UCF-101/<path> for every listed video (a video's class is its folder, as the index
    reads it) and out/ucfTrainTestlist/ with the lists' lines for those videos, byte for
    byte. `every` > 1 keeps every `every`-th video of the sorted listed paths and drops the
    others from all six lists, so each split still lists each kept video once. A video's
    content depends on `seed` and its place in the full list only: the subset's videos are
    the full set's. Returns `out_dir`, which `index_videos` accepts as the dataset root.
    """
    if every < 1:
        raise ValueError(f"every = {every} is not allowed: choose 1 or more")
    source, out = Path(splits_dir), Path(out_dir)
    lists = {name: (source / name).read_bytes().splitlines(keepends=True) for name in SPLIT_FILES}
    label_of = {name: k for k, name in enumerate(ucf101_class_names(source))}
    listed = sorted(
        {_listed_path(line) for name in SPLIT_FILES[1:] for line in lists[name] if line.strip()}
    )
    kept = set(listed[::every])
    velocities = _grid_velocities(len(label_of))
    pools = _pools(frame_size, seed)
    scale = frame_size / 64
    for position, rel in enumerate(listed):
        if rel not in kept:
            continue
        dy, dx = velocities[label_of[rel.split("/")[0]]]
        look = _pick_look(pools, np.random.default_rng([seed, 2, position]))
        frames, _ = _motion_frames(num_frames, frame_size, dy * scale, dx * scale, look)
        write_video(out / "UCF-101" / rel, frames)
    # The lists are written last, so a folder that has them holds every video they list.
    split_dir = out / "ucfTrainTestlist"
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "classInd.txt").write_bytes(b"".join(lists["classInd.txt"]))
    for name in SPLIT_FILES[1:]:
        lines = [line for line in lists[name] if line.strip() and _listed_path(line) in kept]
        (split_dir / name).write_bytes(b"".join(lines))
    return out


# ---- test helpers ------------------------------------------------------------------------

INDEX_BITS = 16
_INDEX_GRID = 4  # 4 x 4 cells, one bit each: big bright blocks survive lossy compression


def index_frame(index: int, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: `index` written as 16 bits, each a white or black cell."""
    bits = (index >> np.arange(INDEX_BITS)) & 1
    cells = bits.reshape(_INDEX_GRID, _INDEX_GRID).astype(np.uint8) * 255
    cell = -(-size // _INDEX_GRID)
    image = np.kron(cells, np.ones((cell, cell), dtype=np.uint8))[:size, :size]
    return np.repeat(image[:, :, None], 3, axis=2)


def read_frame_index(frame: np.ndarray) -> int:
    """Inverse of `index_frame` for a decoded (possibly resized) uint8 [H, W, 3] frame."""
    h, w = frame.shape[:2]
    centres_y = ((np.arange(_INDEX_GRID) + 0.5) * h / _INDEX_GRID).astype(int)
    centres_x = ((np.arange(_INDEX_GRID) + 0.5) * w / _INDEX_GRID).astype(int)
    cells = frame[np.ix_(centres_y, centres_x)].mean(axis=2) > 127
    return int((cells.reshape(-1).astype(np.int64) << np.arange(INDEX_BITS)).sum())


def write_index_video(path: str | os.PathLike, num_frames: int, size: int = 64) -> Path:
    """An AVI whose frame i shows the number i (read it back with `read_frame_index`)."""
    frames = np.stack([index_frame(i, size) for i in range(num_frames)])
    return write_video(Path(path), frames, bit_rate=4_000_000)


def write_broken_videos(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Files that must be quarantined, by kind of failure.

    Kinds: empty, truncated (an AVI cut at 40%), random_bytes, text (a text file named
    .avi), zero_frames (a valid AVI header with no frames), mp4_cut (a fast-start MP4,
    index first, cut short so the frames the index lists are missing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Noise frames compress badly, so a cut lands inside the frame data, past the headers.
    frames = np.random.default_rng(0).integers(0, 256, size=(50, 64, 64, 3), dtype=np.uint8)
    broken = {
        "empty": out / "empty.avi",
        "truncated": out / "truncated.avi",
        "random_bytes": out / "random_bytes.avi",
        "text": out / "text.avi",
        "zero_frames": out / "zero_frames.avi",
        "mp4_cut": out / "mp4_cut.mp4",
    }
    broken["empty"].write_bytes(b"")
    whole = write_video(out / "whole.avi", frames).read_bytes()
    (out / "whole.avi").unlink()
    broken["truncated"].write_bytes(whole[: len(whole) * 2 // 5])
    broken["random_bytes"].write_bytes(np.random.default_rng(0).bytes(50_000))
    broken["text"].write_text("this is not a video\n")
    with av.open(str(broken["zero_frames"]), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = 64
        container.start_encoding()  # headers written, no frame ever muxed
    write_video(broken["mp4_cut"], frames, options={"movflags": "+faststart"})
    data = broken["mp4_cut"].read_bytes()
    broken["mp4_cut"].write_bytes(data[: len(data) // 2])
    return broken
