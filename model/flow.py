"""Optical flow between video frames: OpenCV's DIS, camera motion removed, stored as uint8.

Two-stream networks read motion as stacks of x and y flow images. This module makes them
from decoded RGB frames:

- `optical_flow`: DIS (Kroeger et al. 2016, "Fast optical flow using dense inverse
  search"), dense flow [H, W, 2] in pixels from one frame to another. DIS rather than TV-L1
  or a network: one CPU core makes about 900 pairs a second at 224x224 (figures below), so
  Ray Data's CPU tasks can make flow on the fly instead of reading it from a store.
- `compensate_camera`: subtracts the dominant motion, taken to be the camera's, so a pan
  or a zoom does not drown the actors' motion (as improved dense trajectories do, Wang &
  Schmid 2013).
- `encode_flow` / `decode_flow`: flow clipped at +-`FLOW_BOUND_PX` and quantised to uint8,
  as two-stream networks (Simonyan & Zisserman 2014; TSN) store it: a quarter of float32's
  bytes in shards and object stores, for at most bound/255 px (0.08 px) of error.
- `flow_fields`: the encoded, compensated flow for a list of frame-index pairs of a clip.

It ships with the registered model (only `model/` does), so it imports numpy and cv2 only.
`use_one_thread` sets OpenCV's pool to one thread on first use, not at import, where it
would change OpenCV for every importer, flow or not.

Measured on this 2-core development machine, one thread, opencv-python-headless 5.1.0,
smoothed-noise frames (Gaussian blur, sigma 1.5 px) shifted by (3, -2) px; `optical_flow`
pairs a second, RGB-to-gray conversion included:

    preset       64x64   96x96   224x224   320x240 (WxH)   384x384
    ultrafast     1855   11513      1841      1226             323
    fast           797    4732       894       622             197
    medium        2628    1050       196       126              36

(At 64x64 the frame is too small for the pyramid of "ultrafast" and "fast", whose finest
level is a quarter of the frame: OpenCV then works at full resolution, slower than at 96.)

Default preset "fast": what the presets trade, on the same synthetic frames:

- A small moving object (textured square moved by (3, -2) over a still background,
  largest error of the median flow inside it over 8 textures, 224x224): "medium" is within
  0.3 px from 24 px wide, "ultrafast" from 64 px (0.23), "fast" only from 96 px (0.34; 0.66
  at 64 px). "fast" works on a quarter-resolution pyramid with 8-px patches and smooths
  (variational refinement), so it blurs small objects' motion into their surroundings.
- Low-texture, noisy frames (blur sigma 12 px, a sixth of the contrast, noise sigma 3
  grey levels), mean end-point error of a whole-frame shift: "fast" 0.26 px, "ultrafast"
  0.42, "medium" 0.78. There the refinement pays.

"medium" costs 4.6x "fast" at 224x224; "fast" is the default, and a caller that needs
small limbs' motion passes preset="medium".

Default compensation "homography", at 224x224 after "fast" flow (residual camera motion:
mean |flow| of the background after compensation):

    motion                         median: ms, residual   homography: ms, residual
    pan (3, -2) px                 0.92 ms, 0.05 px       0.53 ms, 0.05 px
    pan + zoom 1.02 + rotate 1°    0.80 ms, 2.00 px       0.59 ms, 0.13 px

The homography removes zoom and rotation, which the per-axis median cannot (only 12% of
pixels under 1 px after the median, all of them after the homography), and costs less
than the median (numpy's median over 50,000 values per axis against RANSAC over 625 grid
samples; at 384x384, 0.93 ms against 3.09). With "fast" flow, `flow_fields` makes 526
pairs a second at 224x224 with the homography, 462 with the median, 739 with none.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

__all__ = [
    "FLOW_BOUND_PX", "Compensation", "FlowPreset", "compensate_camera", "decode_flow",
    "encode_flow", "flow_fields", "optical_flow", "use_one_thread",
]

# Two-stream networks clip x and y flow at +-20 px: larger displacements between
# neighbouring frames are rare and mostly errors, and the bound sets the uint8 step.
FLOW_BOUND_PX: float = 20.0

FlowPreset = Literal["ultrafast", "fast", "medium"]
Compensation = Literal["median", "homography", "none"]

_PRESETS: dict[str, int] = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
_COMPENSATIONS = ("median", "homography", "none")

# Homography fit: about this many flow samples on a regular grid. A few hundred points
# over-determine 8 parameters many times, and RANSAC's cost grows with their number.
_HOMOGRAPHY_SAMPLES = 576
# RANSAC inlier distance in px: above DIS's error on textured background (a few tenths
# of a pixel), below the motion of anything worth keeping.
_RANSAC_THRESHOLD_PX = 1.0
# Below this share of samples within that distance, no camera motion dominates the frame.
_MIN_INLIER_SHARE = 0.25

_local = threading.local()
_one_thread_lock = threading.Lock()
_one_thread_set = False


def use_one_thread() -> None:
    """Limit OpenCV to one thread in this process, once (later calls do nothing).

    Parallelism comes from processes: Ray Data tasks, each given its own CPU budget, make
    flow side by side. OpenCV's own thread pool (one thread per core by default) would
    put several threads on each CPU those tasks were given, oversubscribing the node.
    """
    global _one_thread_set
    if _one_thread_set:
        return
    with _one_thread_lock:
        if not _one_thread_set:
            cv2.setNumThreads(1)
            _one_thread_set = True


def _dis(preset: FlowPreset) -> cv2.DISOpticalFlow:
    """This thread's DIS object for `preset`, created on first use, set to the preset's scales.

    Creating one allocates its pyramids' buffers, a cost per call that reusing avoids; one
    object keeps per-call state in those buffers, so threads must not share it.
    """
    if preset not in _PRESETS:
        raise ValueError(f"preset = {preset!r}: expected one of {sorted(_PRESETS)}")
    cache: dict[str, tuple[cv2.DISOpticalFlow, int, int]] | None = getattr(_local, "dis", None)
    if cache is None:
        cache = _local.dis = {}
    entry = cache.get(preset)
    if entry is None:
        use_one_thread()
        dis = cv2.DISOpticalFlow_create(_PRESETS[preset])
        entry = cache[preset] = (dis, dis.getFinestScale(), dis.getPatchSize())
    dis, finest_scale, patch_size = entry
    # A frame too small for the preset's pyramid (64x64 at "fast": fewer levels than its
    # finest scale) makes `calc` pick a finer scale and patch and keep them in the object,
    # so every later frame, of any size, ran at full resolution: "fast" 14x slower at
    # 224x224 after one 64x64 pair. Setting the preset's values back before each call
    # makes a reused object compute what a new one would.
    dis.setFinestScale(finest_scale)
    dis.setPatchSize(patch_size)
    return dis


def _gray(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] or gray [H, W] -> contiguous uint8 gray [H, W] (DIS's input)."""
    if frame.dtype != np.uint8:
        raise TypeError(f"frame dtype {frame.dtype}: expected uint8")
    if frame.ndim == 2:
        return np.ascontiguousarray(frame)
    if frame.ndim == 3 and frame.shape[2] == 3:
        # Decoders here (decord, PyAV) give RGB; the channel order sets the luma weights.
        return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    raise ValueError(f"frame shape {frame.shape}: expected [H, W, 3] RGB or [H, W] gray")


def _dis_flow(prev_gray: np.ndarray, next_gray: np.ndarray, preset: FlowPreset) -> np.ndarray:
    """DIS on two gray frames [H, W] -> float32 [H, W, 2]."""
    if prev_gray.shape != next_gray.shape:
        raise ValueError(f"frame shapes differ: {prev_gray.shape} and {next_gray.shape}")
    return _dis(preset).calc(prev_gray, next_gray, None)


def optical_flow(prev: np.ndarray, nxt: np.ndarray, preset: FlowPreset = "fast") -> np.ndarray:
    """Dense flow from `prev` to `nxt` by DIS.

    uint8 RGB frames [H, W, 3] (or gray [H, W]) -> float32 [H, W, 2]: (dx, dy) in pixels,
    so the content at (x, y) in `prev` lies near (x + dx, y + dy) in `nxt`.
    """
    return _dis_flow(_gray(prev), _gray(nxt), preset)


def _homography_field(flow: np.ndarray) -> np.ndarray | None:
    """The flow of a homography fitted (RANSAC) to grid samples of `flow` [H, W, 2] ->
    float32 [H, W, 2], or None where no homography fits (too few or degenerate points)."""
    h, w = flow.shape[:2]
    step = max(1, round(float(np.sqrt(h * w / _HOMOGRAPHY_SAMPLES))))
    # Cell centres, so the samples keep off the border, where content enters or leaves
    # the frame and DIS extrapolates.
    ys, xs = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    if ys.size < 4:
        return None
    src = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    dst = src + flow[ys.ravel(), xs.ravel()]
    homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, _RANSAC_THRESHOLD_PX)
    # A homography that explains few samples says little about the rest of the frame and
    # can extrapolate large motion into it; the median at least stays within the flow.
    if homography is None or int(inliers.sum()) < _MIN_INLIER_SHARE * len(src):
        return None
    hm = homography.astype(np.float32)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    den = hm[2, 0] * x + hm[2, 1] * y + hm[2, 2]
    field = np.empty((h, w, 2), np.float32)
    field[..., 0] = (hm[0, 0] * x + hm[0, 1] * y + hm[0, 2]) / den - x
    field[..., 1] = (hm[1, 0] * x + hm[1, 1] * y + hm[1, 2]) / den - y
    # A homography whose horizon crosses the frame (den = 0) maps pixels to infinity:
    # no camera motion looks like that.
    return field if np.isfinite(field).all() else None


def compensate_camera(flow: np.ndarray, method: Compensation = "homography") -> np.ndarray:
    """Subtract the dominant (camera) motion from `flow`.

    float32 [H, W, 2] -> float32 [H, W, 2]:

    - "median": minus the per-axis median flow; removes a pan or a tilt (a translation) as
      long as the camera's motion covers more than half the pixels.
    - "homography": minus the flow field of a homography fitted (cv2.findHomography,
      RANSAC) to a grid of flow samples; also removes zoom, rotation and perspective of a
      camera moving over a far or flat scene (the default: see the module's docstring).
      Where no homography fits, or one fits fewer than a quarter of the samples (no
      motion dominates), falls back to "median".
    - "none": `flow` unchanged (the same array).
    """
    if method not in _COMPENSATIONS:
        raise ValueError(f"method = {method!r}: expected one of {list(_COMPENSATIONS)}")
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow shape {flow.shape}: expected [H, W, 2]")
    if method == "none":
        return flow
    flow = flow.astype(np.float32, copy=False)
    if method == "homography":
        field = _homography_field(flow)
        if field is not None:
            return flow - field
    median = np.median(flow.reshape(-1, 2), axis=0).astype(np.float32)
    return flow - median


def encode_flow(flow: np.ndarray, bound: float = FLOW_BOUND_PX) -> np.ndarray:
    """Flow in px -> uint8 codes.

    float [..., 2] -> uint8 [..., 2]: clipped at +-`bound`, mapped linearly so -bound -> 0
    and +bound -> 255, rounded half up: zero flow -> 127.5 -> 128 (which decodes to
    +bound/255 px, 0.08 px at the default bound: half a code step).
    """
    if bound <= 0:
        raise ValueError(f"bound = {bound}: expected > 0")
    if flow.shape[-1:] != (2,):
        raise ValueError(f"flow shape {flow.shape}: expected [..., 2]")
    # (f / bound + 1) * 127.5 keeps the ends and the middle exact for any bound: -bound ->
    # 0, 0 -> 127.5, +bound -> 255; floor(u + 0.5) rounds the halves up, not to even.
    unit = np.clip(np.asarray(flow, np.float32) / np.float32(bound), -1.0, 1.0)
    return np.floor((unit + 1.0) * 127.5 + 0.5).astype(np.uint8)


def decode_flow(encoded: np.ndarray, bound: float = FLOW_BOUND_PX) -> np.ndarray:
    """uint8 codes -> flow in px.

    uint8 [..., 2] -> float32 [..., 2]: the inverse of `encode_flow` up to its rounding,
    at most bound/255 px (half a code step) for flow within +-bound.
    """
    if bound <= 0:
        raise ValueError(f"bound = {bound}: expected > 0")
    if encoded.dtype != np.uint8:
        raise TypeError(f"encoded dtype {encoded.dtype}: expected uint8 (see encode_flow)")
    return (encoded.astype(np.float32) / np.float32(127.5) - 1.0) * np.float32(bound)


def flow_fields(
    frames: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    *,
    preset: FlowPreset = "fast",
    compensation: Compensation = "homography",
    bound: float = FLOW_BOUND_PX,
) -> np.ndarray:
    """The encoded, camera-compensated flow from frames[i] to frames[j] for each pair.

    uint8 frames [F, H, W, 3] (or gray [F, H, W]) and index pairs (i, j) into them ->
    uint8 [len(pairs), H, W, 2]. Indices may be negative, as numpy's. Each frame a pair
    uses is converted to gray once, a pair that appears twice is computed once, and a
    pair with i == j is zero flow (its code, `encode_flow` of 0) without running DIS.
    """
    if frames.ndim not in (3, 4):
        raise ValueError(f"frames shape {frames.shape}: expected [F, H, W, 3] or [F, H, W]")
    # Checked here, not only where used: a list of pairs with i == j alone never reaches them.
    if preset not in _PRESETS:
        raise ValueError(f"preset = {preset!r}: expected one of {sorted(_PRESETS)}")
    if compensation not in _COMPENSATIONS:
        raise ValueError(f"compensation = {compensation!r}: expected one of {list(_COMPENSATIONS)}")
    num_frames, height, width = frames.shape[:3]

    def index(i: int) -> int:
        i = operator.index(i)
        if not -num_frames <= i < num_frames:
            raise IndexError(f"frame index {i} out of range for {num_frames} frames")
        return i % num_frames

    keys = [(index(i), index(j)) for i, j in pairs]
    out = np.empty((len(keys), height, width, 2), np.uint8)
    zero_code = encode_flow(np.zeros(2, np.float32), bound)
    grays: dict[int, np.ndarray] = {}
    done: dict[tuple[int, int], int] = {}  # pair -> the row of `out` that holds it
    for row, (i, j) in enumerate(keys):
        if (i, j) in done:
            out[row] = out[done[(i, j)]]
            continue
        done[(i, j)] = row
        if i == j:
            out[row] = zero_code
            continue
        for k in (i, j):
            if k not in grays:
                grays[k] = _gray(frames[k])
        flow = compensate_camera(_dis_flow(grays[i], grays[j], preset), compensation)
        out[row] = encode_flow(flow, bound)
    return out
