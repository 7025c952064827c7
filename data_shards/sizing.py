"""How big an epoch and a feature cache are for a config, before anything is decoded.

From the manifest when it exists (exact frame counts); else from the split files alone,
with each video assumed to have the dataset's typical length (an estimate, flagged);
else unknown. `jlstm plan` reports these beside the resource plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_shards.clip_spec import ClipSpec
from data_shards.clips import clip_starts, needed_frames
from data_shards.config import DataConfig
from data_shards.features import TAP_CHANNELS
from data_shards.index import list_entries
from model.inputs import reads

# Typical frames per video, for estimates from split files alone. UCF101: 7.21 s on
# average at 25 fps (Soomro et al. 2012, "UCF101", section 3). HMDB51: every clip has at
# least 101 frames (Kuehne et al. 2011), so this estimate is a lower bound.
TYPICAL_FRAMES = {"ucf101": 180, "hmdb51": 101}
CACHE_BYTES_PER_VALUE = {"float16": 2, "uint8": 1}  # data.cache_dtype
FRAME_BYTES_PER_PIXEL = 3  # decoded clips are uint8 RGB
# Optical flow pairs (`model.flow.flow_fields`: DIS, camera compensation by homography,
# uint8 encoding) one CPU makes a second at 224 x 224, per DIS preset, on the 2-core
# development machine: medium from benchmarks/flow.py (benchmarks/results/flow.json,
# `fields_pairs_per_s`), fast from model/flow.py's docstring; ultrafast is DIS's own rate
# there (1,841) scaled by fast's share of it left after compensation and encoding (526 of
# 894). Other frame sizes are scaled by their pixels (an estimate: DIS's pyramid is not
# exactly linear in them). Decoding the frames is not counted (it is the decode's cost).
FLOW_PAIRS_PER_CPU_S_224 = {"ultrafast": 1083.0, "fast": 526.0, "medium": 145.0}


@dataclass(frozen=True)
class DataSize:
    """Clips per subset and bytes on disk; None where neither manifest nor splits exist."""

    source: str  # "manifest", "split files (estimate)" or "none: <why>"
    train_videos: int | None
    test_videos: int | None
    train_clips: int | None
    test_clips: int | None
    cache_bytes: int | None  # the feature cache of this config's taps, train + test frames
    bytes_per_clip: int  # what one clip moves from the cache (taps) or the decoder (frames)
    # Optical flow (a model with a flow input): the DIS pairs computed once, by the cache
    # build (a cached flow input), or every epoch, by the decode tasks (`flow_when`), and the
    # CPU hours they cost (`FLOW_PAIRS_PER_CPU_S_224`). None: no flow, or sizes unknown.
    flow_pairs: int | None = None
    flow_cpu_hours: float | None = None
    flow_when: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def tap_bytes_per_frame(data_cfg: DataConfig, clip_spec: ClipSpec) -> int:
    """Bytes of one frame's cached taps: taps x 512 x K x K values of `data.cache_dtype`
    (a uint8 cache's per-video scales, 2 KB a tap, are left out)."""
    values = len(clip_spec.taps) * TAP_CHANNELS * clip_spec.map_size**2
    return values * CACHE_BYTES_PER_VALUE[data_cfg.cache_dtype]


def bytes_per_clip(data_cfg: DataConfig, clip_spec: ClipSpec) -> int:
    """One clip's input as it reaches a training worker: cached taps or decoded frames."""
    if data_cfg.use_feature_cache:
        return clip_spec.clip_len * tap_bytes_per_frame(data_cfg, clip_spec)
    return clip_spec.clip_len * clip_spec.frame_size**2 * FRAME_BYTES_PER_PIXEL


def data_size(data_cfg: DataConfig, clip_spec: ClipSpec) -> DataSize:
    """Clip counts and cache size of `data_cfg` for `clip_spec`'s clips and taps."""
    clip_len, interval = clip_spec.clip_len, data_cfg.frame_interval
    strides = {"train": data_cfg.train_stride, "test": data_cfg.eval_stride_for(clip_len)}
    per_clip = bytes_per_clip(data_cfg, clip_spec)
    path = data_cfg.manifest_path()
    if path.is_file():
        manifest = pq.read_table(path, columns=["num_frames", "subset"])
        videos = {s: manifest.filter(pc.equal(manifest["subset"], s)) for s in strides}
        frames = {s: t["num_frames"].to_pylist() for s, t in videos.items()}
        source = "manifest"
    else:
        typical = TYPICAL_FRAMES.get(data_cfg.dataset)
        try:
            entries, _ = list_entries(data_cfg)
        except FileNotFoundError as err:
            return DataSize(f"none: {err}", None, None, None, None, None, per_clip)
        if typical is None:
            return DataSize(
                f"none: no manifest at {path} and no typical length for "
                f"{data_cfg.dataset!r} videos", None, None, None, None, None, per_clip,
            )
        frames = {s: [typical for e in entries if e.subset == s] for s in strides}
        source = f"split files (estimate: {typical} frames per video)"
    clips = {
        s: sum(len(clip_starts(n, clip_len, strides[s], interval)) for n in frames[s])
        for s in strides
    }
    cached_frames = sum(
        len(needed_frames(n, clip_len, strides[s], interval)) for s in strides for n in frames[s]
    )
    flow_pairs, when = None, ""
    if clip_spec.reads_flow:
        cached = data_cfg.use_feature_cache and reads(clip_spec.taps, "optical_flow")
        # Cached: each needed frame's flow once (a stack's later flows are the next frames'
        # first ones when the frames lie every frame_interval). Decoded: each clip's T + L - 1.
        flow_pairs = (cached_frames if cached
                      else (clips["train"] + clips["test"]) * (clip_len + clip_spec.flow.stack - 1))
        when = "once, building the feature cache" if cached else "every epoch, decoding"
    return DataSize(
        source=source,
        train_videos=len(frames["train"]),
        test_videos=len(frames["test"]),
        train_clips=clips["train"],
        test_clips=clips["test"],
        cache_bytes=cached_frames * tap_bytes_per_frame(data_cfg, clip_spec),
        bytes_per_clip=per_clip,
        flow_pairs=flow_pairs,
        flow_cpu_hours=None if flow_pairs is None else flow_cpu_hours(flow_pairs, clip_spec),
        flow_when=when,
    )


def flow_cpu_hours(pairs: int, clip_spec: ClipSpec) -> float:
    """CPU hours of `pairs` optical flows at the clip's frame size and DIS preset."""
    rate = (FLOW_PAIRS_PER_CPU_S_224[clip_spec.flow.preset]
            * (224 / clip_spec.frame_size) ** 2)
    return pairs / rate / 3600
