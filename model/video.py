"""One video to one prediction: the clip grid, a video's clips decoded, their scores, the
video's score.

This module is the only place that turns a video into clip starts, clips, clip scores and a
video score. `jlstm predict`, the registered model's pyfunc (`orchestration/mlflow_model.py`)
and `jlstm eval` (its clip table and its per-video aggregation) all go through it, so they
cannot disagree. It ships with the registered model (only `model/` does), so it imports
neither `data_shards` nor MLflow; it decodes through `model.decode_process` (decord in a
child process, every call under a deadline) and imports torch only when clips are scored,
so the clip grid (Ray Data's decode tasks use it through `data_shards.clips`) loads with
numpy alone.

The model's pipeline, named by what the logged model carries (`ClipGrid` in its MLmodel
metadata, the clip rule in its `ModelConfig`):

- clip grid: a clip is `clip_len` frames taken every `frame_interval` frames from its
  start; starts lie every `stride` frames from 0 while the clip fits (`jlstm eval`'s grid:
  `data.eval_stride`, default `clip_len`, at the training clips' `data.frame_interval`). A
  video shorter than one clip gives one clip at 0 that loops the video.
- clip rule: `ModelConfig.prediction` over the last L2 steps (`vote`, the paper's and the
  figure the champion alias compares, or `prob`): `model.net.clip_scores`.
- video rule (`VIDEO_RULE`): a video's scores are the mean of its clips' scores.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.decode_process import BoundedDecoder, VideoError, shared_decoder

if TYPE_CHECKING:
    from model.config import FlowConfig
    from model.net import JointAttentionNet

# A clip's arrays by source (`model.inputs.SOURCES`): "frames" uint8 [N, T, S, S, 3] and, for
# a model that reads optical flow, "optical_flow" uint8 [N, T, S, S, 2L].
ClipArrays = dict[str, np.ndarray]

__all__ = [
    "SCORE_BATCH", "VIDEO_RULE", "ClipArrays", "ClipGrid", "VideoError", "VideoPrediction",
    "clip_span", "clip_starts", "flow_frames", "frame_indices", "predict_video", "read_clips",
    "score_clips", "step_flows", "top_k", "video_clips", "video_score", "video_scores",
]

# A video's class scores are the mean of its clips' scores (MODEL_SPEC section 5).
VIDEO_RULE = "mean"
# Clips per forward pass: bounds memory for long videos (their clips are never all held).
SCORE_BATCH = 8


def clip_span(clip_len: int, frame_interval: int) -> int:
    """Frames from a clip's first to its last frame, both included."""
    return (clip_len - 1) * frame_interval + 1


def clip_starts(num_frames: int, clip_len: int, stride: int, frame_interval: int = 1) -> list[int]:
    """Start frames of every clip of a video: 0, s, 2s, ... while the clip fits.

    A video shorter than one clip still gives the clip at 0 (looped by `frame_indices`).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames = {num_frames}: a video needs at least one frame")
    last = num_frames - clip_span(clip_len, frame_interval)
    return list(range(0, max(last, 0) + 1, stride))


def frame_indices(start: int, num_frames: int, clip_len: int, frame_interval: int = 1) -> list[int]:
    """The `clip_len` frame indices of the clip at `start`, wrapping past the video's end."""
    return [(start + i * frame_interval) % num_frames for i in range(clip_len)]


def flow_frames(
    frames: Sequence[int], num_frames: int, frame_interval: int, stack: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """What a clip's optical flow needs: the frames to decode (the clip's `frames` first, in
    order, then the others its flows reach) and, step by step, the `stack` (from, to)
    positions in that list of each step's flows.

    The flow at frame f goes from f to f + `frame_interval` (the clip's next frame), the
    next of a stack from there on; a frame past the video's last is its last frame (a zero
    flow), never a wrap to its first (a jump no camera made).
    """
    decode = [int(f) for f in frames]
    position = {f: i for i, f in enumerate(decode)}
    pairs: list[tuple[int, int]] = []
    for f in decode[: len(frames)]:  # the clip's own frames (the list grows below)
        chain = [min(f + j * frame_interval, num_frames - 1) for j in range(stack + 1)]
        for g in chain:
            if g not in position:
                position[g] = len(decode)
                decode.append(g)
        pairs += [(position[a], position[b]) for a, b in itertools.pairwise(chain)]
    return decode, pairs


def step_flows(
    frames: np.ndarray, pairs: Sequence[tuple[int, int]], steps: int, flow: FlowConfig
) -> np.ndarray:
    """uint8 ``[steps, S, S, 2L]``: the flow stacks of `steps` frames from `flow_frames`'
    decoded `frames` ``[F, S, S, 3]`` and its `pairs` (step-major, L a step); channels x0,
    y0, x1, y1, ..."""
    from model.flow import flow_fields  # OpenCV, for flow models only

    fields = flow_fields(frames, pairs, preset=flow.preset, compensation=flow.compensation,
                         bound=flow.bound_px)  # [steps * L, S, S, 2]
    size = fields.shape[1]
    return (fields.reshape(steps, flow.stack, size, size, 2).transpose(0, 2, 3, 1, 4)
            .reshape(steps, size, size, 2 * flow.stack))


def read_clips(
    read: Callable[[list[list[int]]], np.ndarray], clips: Sequence[Sequence[int]],
    num_frames: int, frame_interval: int, flow: FlowConfig | None,
) -> ClipArrays:
    """The arrays of clips of one video (their frame indices `clips`, T each): ``frames``
    and, with `flow`, ``optical_flow`` (`model.flow`, from `flow_frames`' pairs).
    `read(lists)` decodes frame lists of one length into uint8 ``[N, len, S, S, 3]``: every
    clip of the video in one call (lists padded with their last frame)."""
    lists = [[int(f) for f in clip] for clip in clips]
    if flow is None:
        return {"frames": read(lists)}
    plans = [flow_frames(clip, num_frames, frame_interval, flow.stack) for clip in lists]
    width = max(len(frames) for frames, _ in plans)
    decoded = read([frames + [frames[-1]] * (width - len(frames)) for frames, _ in plans])
    steps = len(lists[0])
    flows = [step_flows(clip, pairs, steps, flow)
             for clip, (_, pairs) in zip(decoded, plans, strict=True)]
    return {"frames": np.ascontiguousarray(decoded[:, :steps]), "optical_flow": np.stack(flows)}


@dataclass(frozen=True)
class ClipGrid:
    """Which clips of a video are scored: `clip_len` frames every `frame_interval` frames,
    starting every `stride` frames (see the module's docstring)."""

    clip_len: int
    stride: int
    frame_interval: int = 1

    def __post_init__(self) -> None:
        for name in ("clip_len", "stride", "frame_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be >= 1")

    def starts(self, num_frames: int) -> list[int]:
        """Start frames of the clips of a video of `num_frames` frames."""
        return clip_starts(num_frames, self.clip_len, self.stride, self.frame_interval)

    def frames(self, start: int, num_frames: int) -> list[int]:
        """The `clip_len` frame indices of the clip at `start`."""
        return frame_indices(start, num_frames, self.clip_len, self.frame_interval)


def score_clips(net: JointAttentionNet, clips: np.ndarray | ClipArrays) -> np.ndarray:
    """Class scores ``[N, C]`` (rows sum to 1) of uint8 clips (frames ``[N, T, S, S, 3]``, or
    `ClipArrays` for a model that reads more than frames) by the model's clip rule
    (`net.cfg.prediction`), `SCORE_BATCH` clips per forward pass."""
    import torch

    from model.inputs.sources import normalize_sources
    from model.net import clip_scores

    arrays = {"frames": clips} if isinstance(clips, np.ndarray) else dict(clips)
    frames = np.asarray(arrays["frames"])
    if frames.ndim != 5 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 frames [N, T, S, S, 3], got {frames.dtype} {frames.shape}"
        )
    cfg = net.cfg
    if cfg.reads_flow and "optical_flow" not in arrays:
        raise ValueError(
            "this model reads optical flow, which frames alone do not give: score video "
            "files (their flow is computed from the frames around each clip)"
        )
    device = next(net.parameters()).device
    out = [np.zeros((0, cfg.num_classes), dtype=np.float32)]
    with torch.inference_mode():
        for lo in range(0, len(frames), SCORE_BATCH):
            batch = {key: torch.from_numpy(np.asarray(value[lo : lo + SCORE_BATCH])).to(device)
                     for key, value in arrays.items()}
            logits = net(normalize_sources(batch)).step_logits.float()
            out.append(clip_scores(logits, cfg.last_steps, cfg.prediction).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def video_score(scores: np.ndarray) -> np.ndarray:
    """A video's class scores ``[C]`` from its clips' scores ``[N, C]`` (`VIDEO_RULE`)."""
    if len(scores) == 0:
        raise ValueError("a video needs at least one clip score")
    return np.asarray(scores, dtype=np.float64).mean(axis=0)


def video_scores(video_id: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every video's scores from the clip scores of many videos (`VIDEO_RULE`).

    Args:
        video_id: ``[N]`` the video of each clip (any sortable dtype).
        scores: ``[N, C]`` the clip scores.

    Returns:
        The sorted distinct video ids ``[V]`` and their scores ``[V, C]`` (float64), each row
        what `video_score` gives for that video's clips.
    """
    ids, inverse = np.unique(video_id, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    sums = np.zeros((len(ids), scores.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, scores)
    return ids, sums / counts[:, None]


def top_k(scores: np.ndarray, class_names: list[str], k: int) -> list[tuple[str, float]]:
    """The k best (class name, score) of a video's scores ``[C]``, ties to the lower index
    (as `argmax`: vote scores tie often)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[: max(k, 1)]
    return [(class_names[int(i)], float(scores[i])) for i in order]


@dataclass(frozen=True)
class VideoPrediction:
    """A video's prediction.

    Attributes:
        scores: ``[C]`` float64, the video's class scores (they sum to 1).
        num_clips: how many clips were scored.
        first_clip: ``[T, S, S, 3]`` uint8, the first clip (for an attention drawing).
        first_sources: the first clip as the network reads it, ``{source: [T, ...]}``
            (its frames, and its optical flow for a model that reads flow).
    """

    scores: np.ndarray
    num_clips: int
    first_clip: np.ndarray
    first_sources: ClipArrays


def video_clips(
    path: str | Path, grid: ClipGrid, frame_size: int, decoder: BoundedDecoder | None = None,
    flow: FlowConfig | None = None,
) -> Iterator[tuple[list[int], np.ndarray | ClipArrays]]:
    """Every clip of the grid of the video at `path`, `SCORE_BATCH` at a time: (starts,
    uint8 frames ``[n, T, S, S, 3]``), decoded by `decoder` (default: this process's, with
    the default deadline); with `flow` (a model that reads optical flow), (starts,
    `ClipArrays`). Raises `VideoError` (`DecodeTimeout` past the deadline)."""
    decoder = decoder or shared_decoder()
    num_frames = decoder.num_frames(path, frame_size)
    starts = grid.starts(num_frames)
    for lo in range(0, len(starts), SCORE_BATCH):
        batch = starts[lo : lo + SCORE_BATCH]
        clips = [grid.frames(s, num_frames) for s in batch]
        if flow is None:
            yield batch, decoder.read(path, frame_size, clips)
        else:
            yield batch, read_clips(lambda lists: decoder.read(path, frame_size, lists), clips,
                                    num_frames, grid.frame_interval, flow)


def predict_video(
    net: JointAttentionNet, video: str | Path | bytes, grid: ClipGrid,
    decoder: BoundedDecoder | None = None,
) -> VideoPrediction:
    """Decode every clip of the grid from `video` (a path, or a video file's bytes) and score
    them; raises `VideoError` when the video cannot be decoded (`DecodeTimeout` when the
    decoder does not answer within its deadline).

    Clips are decoded and scored `SCORE_BATCH` at a time: a long video never has all its
    clips in memory at once.
    """
    cfg = net.cfg
    if grid.clip_len != cfg.clip_len:
        raise ValueError(f"grid clip_len {grid.clip_len} != the model's {cfg.clip_len}")
    if isinstance(video, bytes):
        # decord's in-memory reader is not in every build of it; a file is read by all.
        with tempfile.NamedTemporaryFile(prefix="jlstm-video-") as tmp:
            tmp.write(video)
            tmp.flush()
            return predict_video(net, tmp.name, grid, decoder)
    parts, num_clips, first = [], 0, None
    flow = cfg.flow if cfg.reads_flow else None
    for starts, clips in video_clips(video, grid, cfg.frame_size, decoder, flow):
        frames = clips if isinstance(clips, np.ndarray) else clips["frames"]
        if first is None:
            first = ({"frames": frames[0].copy()} if isinstance(clips, np.ndarray)
                     else {key: value[0].copy() for key, value in clips.items()})
        parts.append(score_clips(net, clips))
        num_clips += len(starts)
    assert first is not None  # a video with frames has at least the clip at 0
    return VideoPrediction(video_score(np.concatenate(parts)), num_clips, first["frames"], first)
