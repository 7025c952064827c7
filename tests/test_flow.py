"""DIS optical flow (model/flow.py): known motions come out as flow, camera motion is
subtracted, the uint8 code round-trips, and flow_fields honours its pairs.

Frames are smoothed random noise: texture at every place and scale DIS's patches look at,
so a wrong flow cannot pass for an ambiguous one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from model import flow as flow_mod
from model.flow import (
    FLOW_BOUND_PX,
    Compensation,
    FlowPreset,
    compensate_camera,
    decode_flow,
    encode_flow,
    flow_fields,
    optical_flow,
)

SHIFT = (3, -2)  # (dx, dy) px: content moves right and up between the two frames


def _texture(height: int, width: int, seed: int, sigma: float = 1.5) -> np.ndarray:
    """Gaussian-blurred uniform noise, stretched to 0..255 -> uint8 RGB [H, W, 3]."""
    noise = np.random.default_rng(seed).uniform(0, 255, (height, width)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    return np.repeat(smooth.astype(np.uint8)[..., None], 3, axis=2)


def _panned(size: int, shift: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two [size, size, 3] crops of one larger texture: the camera pans so that the whole
    content moves by `shift` = (dx, dy) px: second[y + dy, x + dx] = first[y, x]."""
    dx, dy = shift
    margin = 10
    big = _texture(size + 2 * margin, size + 2 * margin, seed)
    first = big[margin : margin + size, margin : margin + size]
    second = big[margin - dy : margin - dy + size, margin - dx : margin - dx + size]
    return first.copy(), second.copy()


def _median(flow: np.ndarray) -> np.ndarray:
    """Per-axis median of flow [..., 2] -> [2]."""
    return np.median(flow.reshape(-1, 2), axis=0)


@pytest.mark.parametrize(
    ("preset", "frame", "size"),
    [
        # A 24-px object in a 96-px frame: "medium" resolves it (half-resolution pyramid).
        ("medium", 96, 24),
        # "fast" blurs objects under ~3 of its quarter-resolution patches wide into their
        # surroundings (module docstring): its object is 96 px in a 224-px frame.
        ("fast", 224, 96),
    ],
)
@pytest.mark.parametrize("compensation", ["none", "median", "homography"])
def test_object_moving_over_static_background(
    preset: FlowPreset, frame: int, size: int, compensation: Compensation
) -> None:
    background = _texture(frame, frame, seed=1)
    square = _texture(size, size, seed=2)
    top = left = (frame - size) // 2
    dx, dy = SHIFT
    first, second = background.copy(), background.copy()
    first[top : top + size, left : left + size] = square
    second[top + dy : top + dy + size, left + dx : left + dx + size] = square

    flow = compensate_camera(optical_flow(first, second, preset), compensation)

    assert flow.shape == (frame, frame, 2) and flow.dtype == np.float32
    # Inside the object, away from its edges (where flow blends with the background's).
    inset = size // 4
    inside = flow[top + inset : top + size - inset, left + inset : left + size - inset]
    np.testing.assert_allclose(_median(inside), SHIFT, atol=0.5)
    # The background, a patch away from the object, stays still: compensation must not
    # have taken the object's motion for the camera's (it covers 6% and 18% of the frame).
    still = np.ones((frame, frame), bool)
    still[top - 12 : top + size + 12, left - 12 : left + size + 12] = False
    assert np.abs(_median(flow[still])).max() < 0.5
    assert np.mean(np.abs(flow[still]).max(axis=-1) < 1.0) > 0.9


@pytest.mark.parametrize("preset", ["ultrafast", "fast", "medium"])
def test_camera_pan_is_flow_and_compensation_removes_it(preset: FlowPreset) -> None:
    first, second = _panned(128, SHIFT)

    raw = optical_flow(first, second, preset)

    # Away from the border, where content enters the frame and has nothing to match.
    np.testing.assert_allclose(_median(raw[8:-8, 8:-8]), SHIFT, atol=0.5)
    assert np.mean(np.abs(raw[8:-8, 8:-8] - np.float32(SHIFT)).max(axis=-1) < 1.0) > 0.9
    for method in ("median", "homography"):
        residual = compensate_camera(raw, method)
        assert np.abs(_median(residual)).max() < 0.5, method
        assert np.mean(np.abs(residual).max(axis=-1) < 1.0) > 0.9, method
    assert compensate_camera(raw, "none") is raw


def test_homography_removes_zoom_and_rotation_the_median_leaves() -> None:
    # The camera zooms in 2 %, turns 1° and pans: no single translation describes it.
    big = _texture(300, 300, seed=3)
    warp = cv2.getRotationMatrix2D((150, 150), 1.0, 1.02)
    warp[:, 2] += SHIFT
    first = big[38:262, 38:262]
    second = cv2.warpAffine(big, warp, (300, 300))[38:262, 38:262]

    raw = optical_flow(first, second, "fast")

    def share_still(method: Compensation) -> float:
        residual = compensate_camera(raw, method)[12:-12, 12:-12]
        return float(np.mean(np.linalg.norm(residual, axis=-1) < 1.0))

    assert share_still("homography") > 0.95
    assert share_still("median") < 0.5  # (measured 0.12): why the default is the homography


def test_homography_without_a_dominant_motion_falls_back_to_the_median() -> None:
    # Independent random motion everywhere: RANSAC finds no homography most samples obey.
    flow = np.random.default_rng(4).normal(0, 5, (96, 96, 2)).astype(np.float32)
    flow += np.float32([7, -3])

    np.testing.assert_array_equal(
        compensate_camera(flow, "homography"), compensate_camera(flow, "median")
    )


def test_encode_decode_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(5)
    for bound in (FLOW_BOUND_PX, 7.0):
        values = rng.uniform(-bound, bound, (64, 64, 2)).astype(np.float32)
        codes = encode_flow(values, bound)
        assert codes.dtype == np.uint8 and codes.shape == values.shape
        error = np.abs(decode_flow(codes, bound) - values)
        assert error.max() <= bound / 255 + 1e-5
        # Every code is reachable: the mapping spans 0..255, not a narrower band.
        assert codes.min() <= 1 and codes.max() >= 254


def test_encode_clips_at_the_bound_and_zero_is_128() -> None:
    flow = np.array([[-FLOW_BOUND_PX, FLOW_BOUND_PX], [-25.0, 30.0], [0.0, -0.0]], np.float32)

    codes = encode_flow(flow)

    np.testing.assert_array_equal(codes, [[0, 255], [0, 255], [128, 128]])
    np.testing.assert_allclose(
        decode_flow(codes), [[-20, 20], [-20, 20], [20 / 255, 20 / 255]], atol=1e-5
    )
    with pytest.raises(TypeError):
        decode_flow(flow)  # float flow is not a code


def _pan_clip(frames: int, size: int = 96) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the camera pans SHIFT px a frame over one texture."""
    big = _texture(size + 40, size + 40, seed=6)
    dx, dy = SHIFT
    crops = [
        big[20 - k * dy : 20 - k * dy + size, 20 - k * dx : 20 - k * dx + size]
        for k in range(frames)
    ]
    return np.stack(crops)


def test_flow_fields_shape_zero_pairs_and_order() -> None:
    frames = _pan_clip(3)
    pairs = [(0, 1), (1, 0), (1, 1), (0, 1), (2, 2), (-3, 2)]

    fields = flow_fields(frames, pairs, compensation="none")

    assert fields.shape == (len(pairs), 96, 96, 2) and fields.dtype == np.uint8
    # i == j: exactly the zero code everywhere.
    assert (fields[2] == 128).all() and (fields[4] == 128).all()
    forward = decode_flow(fields[0])[8:-8, 8:-8]
    backward = decode_flow(fields[1])[8:-8, 8:-8]
    np.testing.assert_allclose(_median(forward), SHIFT, atol=0.5)
    np.testing.assert_allclose(_median(backward), [-SHIFT[0], -SHIFT[1]], atol=0.5)
    np.testing.assert_array_equal(fields[3], fields[0])
    # -3 is frame 0: two frames apart, twice the shift.
    np.testing.assert_allclose(
        _median(decode_flow(fields[5])[12:-12, 12:-12]), [2 * SHIFT[0], 2 * SHIFT[1]], atol=0.5
    )
    # Each row is what the one-pair functions give.
    expected = encode_flow(optical_flow(frames[1], frames[0]))
    np.testing.assert_array_equal(fields[1], expected)
    with pytest.raises(IndexError):
        flow_fields(frames, [(0, 3)])


def test_flow_fields_default_compensation_removes_the_pan() -> None:
    fields = flow_fields(_pan_clip(2), [(0, 1)])

    still = np.abs(decode_flow(fields[0])) < 1.0
    assert np.mean(still.all(axis=-1)) > 0.9


def test_flow_fields_converts_each_frame_once_and_each_pair_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = _pan_clip(4)
    grays = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]  # all distinct
    converted: list[int] = []  # frame index of each gray conversion
    computed: list[tuple[int, int]] = []  # frame indices of each DIS run
    gray, dis_flow = flow_mod._gray, flow_mod._dis_flow

    def which(gray_frame: np.ndarray) -> int:
        return next(k for k, g in enumerate(grays) if np.array_equal(g, gray_frame))

    def counting_gray(frame: np.ndarray) -> np.ndarray:
        result = gray(frame)
        converted.append(which(result))
        return result

    def counting_dis_flow(prev: np.ndarray, nxt: np.ndarray, preset: FlowPreset) -> np.ndarray:
        computed.append((which(prev), which(nxt)))
        return dis_flow(prev, nxt, preset)

    monkeypatch.setattr(flow_mod, "_gray", counting_gray)
    monkeypatch.setattr(flow_mod, "_dis_flow", counting_dis_flow)

    flow_fields(frames, [(0, 1), (1, 2), (0, 1), (2, 2), (3, 3), (2, 1)])

    assert sorted(converted) == [0, 1, 2]  # frame 3 only appears in (3, 3): no flow needed
    # The repeated (0, 1) and the i == j pairs cost nothing.
    assert sorted(computed) == [(0, 1), (1, 2), (2, 1)]


def test_reused_flow_object_matches_a_new_one_after_a_small_frame() -> None:
    # OpenCV keeps the finer scale it picks for a frame too small for the preset's pyramid;
    # the module must set the preset back, or later flow differs (and costs 14x).
    large = _panned(160, SHIFT, seed=7)
    small = _panned(48, SHIFT, seed=8)
    fresh = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in large]

    optical_flow(*small, "fast")
    reused = optical_flow(*large, "fast")

    np.testing.assert_array_equal(reused, fresh.calc(gray[0], gray[1], None))


def test_threads_get_their_own_flow_objects() -> None:
    pairs = [_panned(96, (k % 4, -(k % 3)), seed=k) for k in range(8)]
    serial = [optical_flow(a, b) for a, b in pairs]

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda ab: optical_flow(*ab), pairs))

    for one, other in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(one, other)
    assert cv2.getNumThreads() == 1  # use_one_thread ran on first use
