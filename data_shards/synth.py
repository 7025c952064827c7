"""Synthetic videos: a motion-only dataset in the publishers' layouts, and test helpers.

Every file is a real MPEG-4 Part 2 stream in an AVI container (what UCF101 ships), written
with PyAV, so the whole pipeline (probe, decord decode, resize) runs on the real code path.
`synthesize_from_splits` writes one such video for every entry of real UCF101 split lists,
so the index, the cache and the clip stream can be run at UCF101's video count.

Two scenes (`synthesize_dataset(scene=...)`):
- "square": a square moves in a class-specific direction and speed over a static
  background. Easy: an RGB model can read the class off two frames.
- "camera": one object's speed and pattern of motion (steady slow or fast, back-and-forth,
  zig-zag, circle, stop-and-go) is the class, its direction is random, the camera pans and
  shakes, and a distractor moves too. Nothing in one frame tells the class, and the motion on
  screen is the object's minus the camera's: the set on which RGB + optical flow should beat
  RGB alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
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

Box = tuple[int, int, int]  # (top, left, side) in pixels of the generated frame


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


# ---- the "camera" scene ------------------------------------------------------------------

# Class k of the "camera" scene moves one object by the k-th pattern. Lengths are pixels at
# a 64 px frame (scaled with the frame size, as the square's speeds are), periods frames.
# The patterns differ in speed profile and path shape only: the direction of travel is
# random per video and the look comes from pools every class shares.
#   ObjectSteadySlow  1 px/frame along a line
#   ObjectSteadyFast  3 px/frame along a line
#   ObjectOscillate   back and forth on a line, 8 sin(2 pi t / 16): 0..3.1 px/frame, no travel
#   ObjectZigZag      2 px/frame forward, 1.5 sideways, switching side every 6 frames: 2.5
#                     px/frame, straight legs and sharp turns
#   ObjectCircle      a circle of radius 7 every 20 frames: 2.2 px/frame, turning steadily
#   ObjectStopGo      3 px/frame for 6 frames, then still for 6
CAMERA_CLASSES = (
    "ObjectSteadySlow",
    "ObjectSteadyFast",
    "ObjectOscillate",
    "ObjectZigZag",
    "ObjectCircle",
    "ObjectStopGo",
)
MAX_CAMERA_CLASSES = len(CAMERA_CLASSES)
_SLOW_SPEED, _FAST_SPEED = 1.0, 3.0
_OSCILLATE_AMPLITUDE, _OSCILLATE_PERIOD = 8.0, 16
_ZIGZAG_FORWARD, _ZIGZAG_SIDEWAYS, _ZIGZAG_LEG = 2.0, 1.5, 6
_CIRCLE_RADIUS, _CIRCLE_PERIOD = 7.0, 20
_STOPGO_SPEED, _STOPGO_LEG = 3.0, 6
# The world image is this many frames wide and high: room for the camera to pan.
_WORLD_SCALE = 2
# Pan: px/frame at 64 px, uniform in this range, random direction; it turns back at the
# world's edges. Shake: std of the per-frame jitter around the pan, px at 64 px. Both are
# below the slow class's speed, so the object's own motion stays the larger signal.
_PAN_SPEED = (0.3, 0.8)
_SHAKE_STD = 0.6
# Distractor: px/frame at 64 px, drifting by a random walk (std 0.1 a frame, kept within
# 0.3..2x), heading turning by a random walk of this std (radians a frame): smooth motion
# whose speed spans the classes' speeds, so "the moving thing" is not the class object.
_DISTRACTOR_SPEED = 1.5
_DISTRACTOR_TURN = 0.25
_TEXTURE_CELLS = 4  # an object's texture: a 4 x 4 grid of brightness factors


def _camera_class_names(classes: int) -> list[str]:
    """The first `classes` names of CAMERA_CLASSES."""
    if not 1 <= classes <= MAX_CAMERA_CLASSES:
        raise ValueError(
            f"classes={classes} is not allowed for scene 'camera': "
            f"choose 1..{MAX_CAMERA_CLASSES}"
        )
    return list(CAMERA_CLASSES[:classes])


def _camera_pools(size: int, seed: int) -> dict[str, list]:
    """Worlds (uint8 [2 size, 2 size, 3]), object colours (uint8 [3]), sides (px) and
    textures (float [4, 4] brightness factors), shared by every class and the distractor."""
    rng = np.random.default_rng([seed, 3])
    world_size = _WORLD_SCALE * size
    worlds = []
    for _ in range(_POOL_SIZE):
        # The square's clutter at the same density: texture that shows the camera's motion,
        # and static shapes the moving objects do not stand out from by look.
        world = rng.integers(0, 60, size=(world_size, world_size, 3), dtype=np.uint8)
        for _ in range(12 * _WORLD_SCALE**2):
            h, w = rng.integers(size // 16 + 1, size // 4 + 1, size=2)
            y, x = rng.integers(0, world_size, size=2)
            world[y : y + h, x : x + w] = rng.integers(30, 200, size=3, dtype=np.uint8)
        worlds.append(world)
    return {
        "world": worlds,
        "colour": [rng.integers(150, 256, size=3, dtype=np.uint8) for _ in range(_POOL_SIZE)],
        "side": [int(s) for s in rng.integers(max(2, size // 7), size // 4 + 1, _POOL_SIZE)],
        "texture": [
            rng.uniform(0.55, 1.0, size=(_TEXTURE_CELLS, _TEXTURE_CELLS))
            for _ in range(_POOL_SIZE)
        ],
    }


@dataclass(frozen=True)
class CameraScene:
    """Everything random about one "camera" video. `_draw_camera_scene` draws it without
    knowing the class, so one scene rendered for two classes differs only in how the object
    moves (the first frame is the same)."""

    world: np.ndarray  # uint8 [W, W, 3], W = 2 x frame size: what the camera films
    look: dict  # the class object's colour (uint8 [3]), side (px), texture (float [4, 4])
    distractor_look: dict  # the same keys, from the same pools
    direction: float  # radians: the object's line of travel, 0 = +x (right), pi/2 = +y (down)
    handed: int  # +1 or -1: the side a zig-zag starts on, the way a circle turns
    phase: float  # 0..1: where in its cycle a periodic pattern starts
    camera_start: tuple[float, float]  # (top, left) of the view in the world at frame 0
    camera_drift: tuple[float, float]  # (dy, dx) of the pan per frame, px
    shake: np.ndarray  # float [T, 2]: per-frame jitter added to the pan, px
    object_start: tuple[float, float]  # (top, left) on screen at frame 0
    distractor_start: tuple[float, float]
    distractor_velocity: np.ndarray  # float [T - 1, 2]: its own (dy, dx) per frame, px


def _draw_camera_scene(
    pools: dict[str, list], rng: np.random.Generator, num_frames: int, size: int
) -> CameraScene:
    """One video's random choices (look, world, direction, camera path, distractor path),
    drawn from `rng` independently of the class; speeds scaled to a `size` px frame."""
    scale = size / 64
    object_look = _pick_look(pools, rng)
    distractor_look = _pick_look(pools, rng)
    world = object_look.pop("world")
    distractor_look.pop("world")  # the distractor lives in the object's world
    room = world.shape[0] - size
    pan_angle = rng.uniform(0, 2 * math.pi)
    pan_speed = rng.uniform(*_PAN_SPEED) * scale
    steps = max(num_frames - 1, 0)
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, _DISTRACTOR_TURN, steps))
    speed = _DISTRACTOR_SPEED * scale * np.clip(
        1 + np.cumsum(rng.normal(0, 0.1, steps)), 0.3, 2.0
    )
    return CameraScene(
        world=world,
        look=object_look,
        distractor_look=distractor_look,
        direction=float(rng.uniform(0, 2 * math.pi)),
        handed=int(rng.choice([-1, 1])),
        phase=float(rng.uniform()),
        camera_start=(float(rng.uniform(0, room)), float(rng.uniform(0, room))),
        camera_drift=(pan_speed * math.sin(pan_angle), pan_speed * math.cos(pan_angle)),
        shake=rng.normal(0, _SHAKE_STD * scale, size=(num_frames, 2)),
        object_start=_screen_start(rng, size, object_look["side"]),
        distractor_start=_screen_start(rng, size, distractor_look["side"]),
        distractor_velocity=np.stack([speed * np.sin(heading), speed * np.cos(heading)], 1),
    )


def _screen_start(rng: np.random.Generator, size: int, side: int) -> tuple[float, float]:
    """A random on-screen (top, left) at which a `side` px object lies wholly in the frame."""
    return float(rng.uniform(0, size - side)), float(rng.uniform(0, size - side))


def _object_velocity(
    name: str, num_frames: int, scale: float, direction: float, handed: int, phase: float
) -> np.ndarray:
    """float [num_frames - 1, 2]: the class object's own motion (dy, dx) from frame t to
    t + 1, px in world coordinates, before the frame's borders bounce it.

    The pattern `name` (CAMERA_CLASSES) is built along +x, mirrored across its line by
    `handed` (+1/-1), rotated to `direction` (radians) and scaled by `scale` (frame / 64
    px); `phase` (0..1) shifts where in its cycle a periodic pattern starts.
    """
    steps = max(num_frames - 1, 0)
    t = np.arange(steps + 1, dtype=float)
    if name == "ObjectSteadySlow":
        along, across = np.full(steps, _SLOW_SPEED), np.zeros(steps)
    elif name == "ObjectSteadyFast":
        along, across = np.full(steps, _FAST_SPEED), np.zeros(steps)
    elif name == "ObjectOscillate":
        # Differences of positions (not sampled derivatives): the path is exactly the sine.
        angle = 2 * math.pi * (t / _OSCILLATE_PERIOD + phase)
        along, across = np.diff(_OSCILLATE_AMPLITUDE * np.sin(angle)), np.zeros(steps)
    elif name == "ObjectZigZag":
        leg = np.floor(t[:-1] / _ZIGZAG_LEG + 2 * phase) % 2
        along, across = np.full(steps, _ZIGZAG_FORWARD), _ZIGZAG_SIDEWAYS * (1 - 2 * leg)
    elif name == "ObjectCircle":
        angle = 2 * math.pi * (t / _CIRCLE_PERIOD + phase)
        along = np.diff(_CIRCLE_RADIUS * np.cos(angle))
        across = np.diff(_CIRCLE_RADIUS * np.sin(angle))
    elif name == "ObjectStopGo":
        moving = np.floor(t[:-1] / _STOPGO_LEG + 2 * phase) % 2 == 0
        along, across = _STOPGO_SPEED * moving, np.zeros(steps)
    else:
        raise ValueError(f"no motion pattern {name!r}: choose one of {CAMERA_CLASSES}")
    across = handed * across
    # (dy, dx) of the unit vectors along the line of travel and across it.
    dy = math.sin(direction) * along + math.cos(direction) * across
    dx = math.cos(direction) * along - math.sin(direction) * across
    return scale * np.stack([dy, dx], axis=1)


def _fold(x: np.ndarray, high: float) -> np.ndarray:
    """`x` reflected into [0, high] (a triangle wave): a path that turns back at the edges."""
    if high <= 0:
        return np.zeros_like(x)
    m = np.mod(x, 2 * high)
    return np.where(m > high, 2 * high - m, m)


def _camera_path(scene: CameraScene, num_frames: int, size: int) -> np.ndarray:
    """int [num_frames, 2]: the view's (top, left) in the world per frame: a steady pan from
    `camera_start`, turning back at the world's edges, plus the per-frame shake."""
    room = scene.world.shape[0] - size
    t = np.arange(num_frames)[:, None]
    pan = _fold(np.asarray(scene.camera_start) + np.asarray(scene.camera_drift) * t, room)
    # Whole pixels: a frame is a plain crop of the world (no resampling blur).
    return np.clip(np.rint(pan + scene.shake), 0, room).astype(np.int64)


def _keep_in_view(
    velocity: np.ndarray,
    camera: np.ndarray,
    start: tuple[float, float],
    size: int,
    side: int,
) -> np.ndarray:
    """int [T, 2]: an object's on-screen (top, left) per frame, 0..size - side.

    The object moves in the world by its own `velocity` (float [T - 1, 2], px) while the
    view moves by `camera` (int [T, 2], its offset in the world): on screen it moves by its
    velocity minus the camera's step. At a frame border it bounces: that axis of its own
    velocity flips for the rest of the video, which keeps its speed profile (the class cue),
    and the box never wraps. Only when the camera outruns it (the object stopped or slower
    than the pan) does the border push it along.
    """
    limit = size - side
    sign = np.ones(2)
    screen = np.empty((len(camera), 2))
    screen[0] = start
    for t in range(len(camera) - 1):
        step = sign * velocity[t]
        position = screen[t] + camera[t] + step - camera[t + 1]
        outside = (position < 0) | (position > limit)
        sign[outside] *= -1
        position[outside] -= 2 * step[outside]
        screen[t + 1] = np.clip(position, 0, limit)
    return np.rint(screen).astype(np.int64)


def _camera_tracks(
    name: str, scene: CameraScene, num_frames: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int [T, 2] each: the view's (top, left) in the world, and the class object's and the
    distractor's (top, left) on screen, per frame of a `size` px video of class `name`."""
    camera = _camera_path(scene, num_frames, size)
    velocity = _object_velocity(
        name, num_frames, size / 64, scene.direction, scene.handed, scene.phase
    )
    target = _keep_in_view(velocity, camera, scene.object_start, size, scene.look["side"])
    distractor = _keep_in_view(
        scene.distractor_velocity, camera, scene.distractor_start, size,
        scene.distractor_look["side"],
    )
    return camera, target, distractor


def _object_patch(look: dict) -> np.ndarray:
    """uint8 [side, side, 3]: the object's colour shaded by its texture grid."""
    side = look["side"]
    cells = np.arange(side) * _TEXTURE_CELLS // side
    shade = look["texture"][np.ix_(cells, cells)]
    return (look["colour"][None, None, :] * shade[:, :, None]).astype(np.uint8)


def _render_camera_frame(
    world: np.ndarray,
    view: tuple[int, int],
    size: int,
    objects: list[tuple[np.ndarray, tuple[int, int]]],
) -> np.ndarray:
    """uint8 [size, size, 3]: the world's crop at `view` (top, left) with each object
    (uint8 [side, side, 3] patch, on-screen (top, left)) drawn over it, later ones on top."""
    top, left = view
    frame = world[top : top + size, left : left + size].copy()
    for patch, (y, x) in objects:
        frame[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    return frame


def _camera_frames(
    name: str, scene: CameraScene, num_frames: int, size: int
) -> tuple[np.ndarray, list[Box]]:
    """uint8 [num_frames, size, size, 3]: `scene` filmed with the object moving as class
    `name`; and the object's box per frame, (top, left, side) on screen, never wrapping."""
    camera, target, distractor = _camera_tracks(name, scene, num_frames, size)
    patch, distractor_patch = _object_patch(scene.look), _object_patch(scene.distractor_look)
    frames = np.stack([
        # The class object last, on top: its box (the attention target) is always visible.
        _render_camera_frame(
            scene.world,
            (int(view[0]), int(view[1])),
            size,
            [(distractor_patch, (int(d[0]), int(d[1]))), (patch, (int(o[0]), int(o[1])))],
        )
        for view, d, o in zip(camera, distractor, target, strict=True)
    ])
    side = scene.look["side"]
    return frames, [(int(y), int(x), side) for y, x in target]


def _video_source(
    scene: str, classes: int, seed: int, frame_size: int, num_frames: int
) -> tuple[list[str], Callable[[int], tuple[np.ndarray, list[Box]]]]:
    """`scene`'s first `classes` class names, and what renders the next video of class k:
    frames uint8 [T, S, S, 3] and the class object's box per frame. Each video draws its
    look from one generator, so videos must be asked for in the dataset's order."""
    if scene == "square":
        specs = _class_specs(classes)
        pools = _pools(frame_size, seed)
        scale = frame_size / 64
        rng = np.random.default_rng([seed, 1])

        def square(k: int) -> tuple[np.ndarray, list[Box]]:
            _, dy, dx = specs[k]
            look = _pick_look(pools, rng)
            return _motion_frames(num_frames, frame_size, dy * scale, dx * scale, look)

        return [name for name, _, _ in specs], square
    if scene == "camera":
        names = _camera_class_names(classes)
        camera_pools = _camera_pools(frame_size, seed)
        camera_rng = np.random.default_rng([seed, 4])

        def camera(k: int) -> tuple[np.ndarray, list[Box]]:
            drawn = _draw_camera_scene(camera_pools, camera_rng, num_frames, frame_size)
            return _camera_frames(names[k], drawn, num_frames, frame_size)

        return names, camera
    raise ValueError(f"scene={scene!r} is not allowed: choose 'square' or 'camera'")


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
    scene: Literal["square", "camera"] = "square",
) -> Path:
    """Write a motion-only dataset of AVI files plus official-style split files.

    ucf101: out/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and out/ucfTrainTestlist/.
    hmdb51: out/hmdb51/<class>/<class>_video_NN.avi and out/testTrainMulti_7030_splits/.
    Both: out/target_boxes.parquet, the moving object's box in every frame (what the
    attention should find, `data_shards.targets`), written last.
    scene "square" (1..16 classes): a square's direction and speed is the class.
    scene "camera" (1..6 classes, CAMERA_CLASSES): an object's speed and pattern of motion
    is the class, under a panning, shaking camera, with a moving distractor.
    Returns `out_dir`, which `index_videos` accepts as the dataset root.
    """
    out = Path(out_dir)
    names, render = _video_source(scene, classes, seed, frame_size, num_frames)
    files: dict[str, list[tuple[str, int]]] = {}
    boxes: dict[str, list[Box]] = {}
    for k, name in enumerate(names):
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
            frames, video_boxes = render(k)
            write_video(video_path, frames)
            files[name].append((rel, group))
            boxes[video_path.relative_to(out).as_posix()] = video_boxes
    if layout == "ucf101":
        _write_ucf_splits(out, names, files)
    else:
        split_dir = out / "testTrainMulti_7030_splits"
        split_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
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
