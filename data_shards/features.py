"""Feature cache: frozen VGG16 taps of every frame that training and evaluation read.

Layout of `<feature_cache>/`:
  cache_key.json           everything that changes the content (see `cache_key`)
  videos.parquet           one row per video: video_id, bytes, ok, error, checksum,
                           scale_checksum (the xxh3_64 of its array file and, uint8 caches
                           only, of its scale file: 0 where there is none)
  video_<id>.npy           [taps, F, 512, K, K] of `data.cache_dtype`: the key's taps, in
                           its order, x the video's needed frames (`needed_frames` of its
                           subset's clip grid, ascending: only frames some clip uses); a
                           plain NumPy array file (`np.load` opens it).
  video_<id>.scale.npy     uint8 caches only: float32 [taps, 512], the per-channel scale
                           (tap value = stored byte x scale).

Building it is a Ray Data actor pool (one VGG16 per actor, a GPU each on a GPU
cluster). Reading it is `read_cached_batch`, applied by the consumer to batches of clip
rows (`data_shards.datasets.iter_clip_batches`): a clip of one tap is one contiguous byte
range of the file (its frames are consecutive rows), read with one `preadv` straight into
the batch, so a read costs one copy out of the page cache. The Parquet layout this
replaces (row groups of 8 frames, filtered per batch) delivered about 3% of a plain read;
benchmarks/cache_read.py measures this one.

Checksums: the writer hashes each file's bytes as it writes them (xxh3_64, ~13 GB/s on one
core here, 4x zlib's crc32 and 16x blake2b) into the index. A process verifies each file the
first time it opens it (`_verify`: the whole file hashed, 1 MiB `preadv` at a time, in a
verifier thread beside the batch's reads; the batch waits for it), and remembers the outcome
per file for as long as the file and the index stay the same ones (inode, size, mtime: a
rebuilt cache is verified again), so later reads cost a dict lookup. A mismatch makes that
video's clips bad clips naming the file and the fix, with one warning per file per process:
never wrong taps delivered as good ones. The cost falls on a process's first epoch (the
whole cache hashed once); benchmarks/cache_read.py measures it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import xxhash

from data_shards.clip_spec import ClipSpec
from data_shards.clips import flow_frames, frame_indices, needed_frames
from data_shards.config import TAP_PREFIX, TAP_SCALE_PREFIX, DataConfig
from data_shards.errors import BadDataError, StaleCacheError
from data_shards.manifest import check_videos_present, load_manifest, video_file
from model.decode_process import BoundedDecoder, VideoError, one_line, open_video
from model.inputs import RANDOM_INIT_SEED, encoder_groups, input_kind, reads
from model.video import step_flows

if TYPE_CHECKING:  # torch loads only where a backbone runs
    from torch import nn

    from model import VGG16Taps

log = logging.getLogger(__name__)

KEY_FILE = "cache_key.json"
INDEX_FILE = "videos.parquet"
# 3: the key hashes root-relative paths and no mtimes (a moved dataset keeps its cache);
# every cache of format 2 is rebuilt once.
# 4: the index holds each file's xxh3_64, which reads verify; a cache of format 3 has none,
# and is rebuilt once.
CACHE_FORMAT = 4
TAP_CHANNELS = 512  # every VGG16 tap (conv4_3, pool4, conv5_3, pool5) has 512 channels
FORWARD_CHUNK = 32  # frames per backbone forward pass
VIDEOS_PER_CALL = 8  # videos an actor caches per call (each one's failure is its own row)
# Bytes read and hashed at a time while verifying a file: a buffer that stays in L2 hashes
# at ~8.7 GB/s here, one read of the whole file then one hash at ~2.2 GB/s (every byte
# leaves the cache between the two). A memory map would hash at ~13.9 GB/s, but a disk
# error under it is a SIGBUS that kills the worker, where a read raises, a bad clip.
CHECKSUM_CHUNK = 1 << 20
REBUILD_HINT = "rebuild the cache with `jlstm data features --rebuild`"


@dataclass(frozen=True)
class CacheInfo:
    """What `build_feature_cache` wrote."""

    cache_dir: Path
    num_videos: int
    num_failed: int
    total_bytes: int
    bytes_per_video: float
    key: dict
    first_error: str = ""  # of the first video that failed ("" when none did)


def cache_encoders(clip_spec: ClipSpec) -> dict[str, nn.Module]:
    """The frozen encoders the cache runs, {network attribute: module} (`model.inputs`:
    `backbone`, the RGB VGG16; `flow_backbone`, the flow VGG16), in eval mode, each seeded
    with `RANDOM_INIT_SEED` when randomly initialized."""
    import torch

    cfg = clip_spec.encoder_config()
    encoders = {}
    with torch.random.fork_rng():
        for attr, names in encoder_groups(clip_spec.taps).items():
            torch.manual_seed(RANDOM_INIT_SEED)
            encoder = input_kind(names[0]).build_encoder(names, cfg)
            encoders[attr] = encoder.eval().requires_grad_(False)
    return encoders


def cache_backbone(clip_spec: ClipSpec) -> VGG16Taps:
    """The frozen RGB VGG16 the cache runs for `clip_spec`'s VGG16 taps (`cache_encoders`)."""
    return cache_encoders(clip_spec)["backbone"]


def manifest_digest(manifest: pa.Table) -> str:
    """sha256 of the manifest columns that decide which frames the cache holds: each
    video's id (its file's name), path relative to `data.root`, size, frames and subset.
    Not its mtime nor an absolute path, which a copy or a move changes and the taps do not."""
    columns = ["video_id", "video_path", "size", "num_frames", "subset"]
    content = json.dumps(manifest.select(columns).to_pydict(), sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def _weights_digest(clip_spec: ClipSpec) -> str:
    """The cache's encoders' identity: the RGB VGG16's digest alone (as every key written
    before flow), else a sha256 over each encoder's."""
    digests = [f"{attr}:{encoder.weights_digest()}"
               for attr, encoder in cache_encoders(clip_spec).items()]
    if len(digests) == 1:
        return digests[0].partition(":")[2]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def cache_key(data_cfg: DataConfig, clip_spec: ClipSpec, manifest: pa.Table) -> dict:
    """Everything that changes the cache's content; a cache is used only if this matches."""
    key = {
        "format": CACHE_FORMAT,
        "dtype": data_cfg.cache_dtype,
        "backbone_weights_digest": _weights_digest(clip_spec),
        "frame_size": clip_spec.frame_size,
        "taps": list(clip_spec.taps),  # a JSON list, as every key written so far
        "map_size": clip_spec.map_size,
        "clip_len": clip_spec.clip_len,
        "train_stride": data_cfg.train_stride,
        "eval_stride": data_cfg.eval_stride_for(clip_spec.clip_len),
        "frame_interval": data_cfg.frame_interval,
        "manifest_digest": manifest_digest(manifest),
    }
    if reads(clip_spec.taps, "optical_flow"):  # only then: an RGB cache's key is as before
        key["flow"] = clip_spec.flow.model_dump(mode="json")
    return key


def check_cache(
    data_cfg: DataConfig, clip_spec: ClipSpec, manifest: pa.Table | None = None
) -> dict:
    """The cache's key, if it matches the configs; else StaleCacheError naming what differs."""
    key_path = Path(str(data_cfg.feature_cache)) / KEY_FILE
    if not key_path.is_file():
        raise StaleCacheError(
            f"no feature cache at {data_cfg.feature_cache} (missing {KEY_FILE}): "
            "run `jlstm data features` first"
        )
    found = json.loads(key_path.read_text())
    cached_taps = list(found.get("taps", []))
    if set(clip_spec.taps) < set(cached_taps):
        # A cache of more taps serves any subset (a sweep over branches builds one cache):
        # a tap depends only on the VGG16 layers before it, which the deeper backbone of the
        # cache shares, so the key is compared as if the config asked for the cache's taps.
        clip_spec = clip_spec.with_taps(cached_taps)
    wanted = cache_key(data_cfg, clip_spec, manifest or load_manifest(data_cfg))
    differ = [k for k in sorted(set(found) | set(wanted)) if found.get(k) != wanted.get(k)]
    if differ:
        details = "; ".join(
            f"{k}: cache has {found.get(k)!r}, config wants {wanted.get(k)!r}" for k in differ
        )
        raise StaleCacheError(
            f"feature cache {data_cfg.feature_cache} is stale ({details}); rebuild it with "
            "`jlstm data features`"
        )
    return found


def cached_taps(data_cfg: DataConfig, key: dict | None = None) -> list[str]:
    """The taps the cache at `data.feature_cache` holds, in its files' order: from its
    `key` (as `check_cache` returned it), else read from the key file."""
    if key is None:
        key = json.loads((Path(str(data_cfg.feature_cache)) / KEY_FILE).read_text())
    return list(key["taps"])


def cache_file(cache_dir: str | Path, video_id: int) -> Path:
    """The array file of one video."""
    return Path(cache_dir) / f"video_{video_id:07d}.npy"


def scale_file(cache_dir: str | Path, video_id: int) -> Path:
    """The per-channel scales of one video's uint8 taps."""
    return Path(cache_dir) / f"video_{video_id:07d}.scale.npy"


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [taps, F, 512, K, K] >= 0 -> uint8 of the same shape and float32 [taps, 512]
    scales, one per tap and channel over the video's frames: value ~ byte x scale, off by
    at most scale / 2 (half a step of the channel's largest value / 255)."""
    values = values.astype(np.float32)
    peak = values.max(axis=(1, 3, 4))
    scale = np.where(peak > 0, peak / 255, 1.0).astype(np.float32)
    stored = np.rint(values / scale[:, None, :, None, None]).clip(0, 255).astype(np.uint8)
    return stored, scale


def _work_table(data_cfg: DataConfig, clip_spec: ClipSpec, manifest: pa.Table) -> pa.Table:
    """One row per video: its file (joined with `data.root` here, so the actors open what the
    driver sees) and the sorted frames its clips need (train or eval grid)."""
    clip_len, interval = clip_spec.clip_len, data_cfg.frame_interval
    strides = {"train": data_cfg.train_stride, "test": data_cfg.eval_stride_for(clip_len)}
    frames = [
        needed_frames(n, clip_len, strides[subset], interval)
        for n, subset in zip(
            manifest["num_frames"].to_pylist(), manifest["subset"].to_pylist(), strict=True
        )
    ]
    files = [video_file(data_cfg.root, path) for path in manifest["video_path"].to_pylist()]
    return pa.table({
        "video_id": manifest["video_id"],
        "video_path": pa.array(files, pa.string()),
        "num_frames": manifest["num_frames"],
        "frames": pa.array(frames, pa.list_(pa.int64())),
    })


class _TapWriter:
    """Actor: decodes one video's needed frames, runs the frozen encoders, writes the video's
    shard. For flow inputs it decodes the frames their flows reach too, and computes the flow
    (`model.video.flow_frames`, `model.flow`) as the decode tasks and the served model do.

    Decoding runs in the actor's `BoundedDecoder` (`data.decode_timeout_s` a video, as
    `data_shards.decode`): a video that hangs the decoder is a failed row with reason
    "timeout", and the actor goes on with the next.
    """

    def __init__(
        self,
        clip_spec: ClipSpec,
        cache_dir: str,
        device: str,
        dtype: str,
        decode_timeout_s: float | None,
        frame_interval: int = 1,
    ) -> None:
        self.clip_spec = clip_spec
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.decode_timeout_s = decode_timeout_s
        self.frame_interval = frame_interval
        self.decoder = BoundedDecoder(decode_timeout_s) if decode_timeout_s else None
        self.encoders = {attr: encoder.to(device)
                         for attr, encoder in cache_encoders(clip_spec).items()}
        self.groups = encoder_groups(clip_spec.taps)

    def _sources(self, path: str, wanted: list[int], num_frames: int) -> dict[str, np.ndarray]:
        """The video's `wanted` frames, uint8 [F, S, S, 3], and for flow inputs their
        optical flow, uint8 [F, S, S, 2L] (`model.video.flow_frames`, `model.flow`)."""
        size = self.clip_spec.frame_size
        decode, pairs = wanted, []
        flow = self.clip_spec.decode_flow()
        if flow is not None:
            decode, pairs = flow_frames(wanted, num_frames, self.frame_interval, flow.stack)
        if self.decoder is None:  # data.decode_timeout_s: null
            frames = open_video(path, size).get_batch(decode).asnumpy()
        else:
            frames = self.decoder.read(path, size, [decode])[0]
        sources = {"frames": frames[: len(wanted)]}
        if flow is not None:
            sources["optical_flow"] = step_flows(frames, pairs, len(wanted), flow)
        return sources

    def _taps(self, sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{source: uint8 [F, S, S, C]} -> {tap: float16 [F, 512, K, K]}, FORWARD_CHUNK
        frames a pass of each encoder."""
        import torch

        from model.inputs.sources import normalize_sources

        chunks: dict[str, list[np.ndarray]] = {tap: [] for tap in self.clip_spec.taps}
        with torch.inference_mode():
            for attr, names in self.groups.items():
                source = input_kind(names[0]).source
                values = sources[source]
                for lo in range(0, len(values), FORWARD_CHUNK):
                    x = torch.from_numpy(values[lo : lo + FORWARD_CHUNK])[None].to(self.device)
                    out = self.encoders[attr](normalize_sources({source: x})[source][0])
                    for tap in names:
                        chunks[tap].append(out[tap].half().cpu().numpy())
        return {tap: np.concatenate(parts) for tap, parts in chunks.items()}

    def _write(
        self, video_id: int, path: str, wanted: list[int], num_frames: int
    ) -> tuple[int, int, int]:
        """Write one video's array file (and scale file); returns their size in bytes, the
        array file's checksum and the scale file's (0 when there is none)."""
        taps = self._taps(self._sources(path, wanted, num_frames))
        # Uncompressed: fp16 activations barely compress, and reads then cost a copy only.
        values = np.stack([taps[tap] for tap in self.clip_spec.taps])
        size = scale_checksum = 0
        if self.dtype == "uint8":
            values, scale = quantize(values)
            size, scale_checksum = _save(scale_file(self.cache_dir, video_id), scale)
        # The array goes last: a video whose array file exists is complete.
        array_size, checksum = _save(cache_file(self.cache_dir, video_id), values)
        return size + array_size, checksum, scale_checksum

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Video rows in, one result row per video out (failures flagged, never raised)."""
        ids = batch["video_id"].astype(np.int64)
        sizes = np.zeros(len(ids), dtype=np.int64)
        checksums = np.zeros(len(ids), dtype=np.uint64)
        scale_checksums = np.zeros(len(ids), dtype=np.uint64)
        ok = np.ones(len(ids), dtype=bool)
        errors = np.full(len(ids), "", dtype=object)
        for i, video_id in enumerate(ids):
            path = str(batch["video_path"][i])
            try:
                wanted = [int(f) for f in batch["frames"][i]]
                sizes[i], checksums[i], scale_checksums[i] = self._write(
                    int(video_id), path, wanted, int(batch["num_frames"][i])
                )
            except Exception as e:  # a bad video is reported in videos.parquet, not raised
                ok[i] = False
                # One line, naming the file: the build's summary prints the first one.
                errors[i] = f"{path}: {e if isinstance(e, VideoError) else one_line(e)}"
        return {
            "video_id": ids, "bytes": sizes, "ok": ok, "error": errors,
            "checksum": checksums, "scale_checksum": scale_checksums,
        }


def _save(target: Path, values: np.ndarray) -> tuple[int, int]:
    """Write an array file (as `np.save`) under a temporary name, then rename it; returns
    its size and checksum, the xxh3_64 of its bytes hashed from memory as they are written
    (reading the file back would hash what the page cache holds, not what reaches the disk
    either, and cost a second pass)."""
    values = np.ascontiguousarray(values)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, np.lib.format.header_data_from_array_1_0(values)
    )
    body = values.reshape(-1).view(np.uint8)
    checksum = xxhash.xxh3_64(header.getbuffer())
    checksum.update(body)
    partial = target.with_name(target.name.removesuffix(".npy") + ".partial.npy")
    with open(partial, "wb") as f:
        f.write(header.getbuffer())
        f.write(body)
    partial.rename(target)
    return target.stat().st_size, checksum.intdigest()


def _clear(cache_dir: Path) -> None:
    """Remove an earlier cache's files (only the ones this module writes)."""
    old = [*cache_dir.glob("video_*.npy"), *cache_dir.glob("video_*.parquet")]
    for path in [cache_dir / KEY_FILE, cache_dir / INDEX_FILE, *old]:
        path.unlink(missing_ok=True)


def _info(cache_dir: Path, index: pa.Table, key: dict) -> CacheInfo:
    ok = index.filter(index["ok"])
    total = int(np.sum(ok["bytes"].to_numpy())) if ok.num_rows else 0
    failed = index.filter(pc.invert(index["ok"]))
    first = (f"video {failed['video_id'][0].as_py()}: {failed['error'][0].as_py()}"
             if failed.num_rows else "")
    return CacheInfo(
        cache_dir,
        index.num_rows,
        index.num_rows - ok.num_rows,
        total,
        total / max(ok.num_rows, 1),
        key,
        first,
    )


def build_feature_cache(
    data_cfg: DataConfig,
    clip_spec: ClipSpec,
    *,
    actors: int = 1,
    use_gpu: bool = False,
    rebuild: bool = False,
) -> CacheInfo:
    """Run the frozen taps over every needed frame of the manifest's videos, fp16 on disk.

    A cache whose key matches is reused as it is unless `rebuild`. Up to `actors` VGG16
    actors run at once, each with a GPU when `use_gpu` (the resource planner's
    `feature_pool` sizes them for a cluster). The key file is written last, so an
    interrupted build is never mistaken for a complete one.

    Refused before any work: videos missing under `data.root` (MissingVideosError). A build
    in which every video failed writes no key and raises BadDataError with the first reason
    (a key would pass every run's check, then fail every clip); some failures are counted,
    with the first reason, in the CacheInfo.
    """
    if not data_cfg.feature_cache:
        raise ValueError("feature_cache = None: set data.feature_cache to a directory")
    cache_dir = Path(data_cfg.feature_cache)
    manifest = load_manifest(data_cfg)
    key = cache_key(data_cfg, clip_spec, manifest)
    if not rebuild and (cache_dir / KEY_FILE).is_file():
        try:
            found = check_cache(data_cfg, clip_spec, manifest)
            return _info(cache_dir, pq.read_table(cache_dir / INDEX_FILE), found)
        except StaleCacheError:
            pass
    check_videos_present(data_cfg, manifest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _clear(cache_dir)
    written = (
        ray.data.from_arrow(_work_table(data_cfg, clip_spec, manifest))
        .repartition(target_num_rows_per_block=VIDEOS_PER_CALL)
        .map_batches(
            _TapWriter,
            fn_constructor_kwargs={
                "clip_spec": clip_spec,
                "cache_dir": str(cache_dir),
                "device": "cuda" if use_gpu else "cpu",
                "dtype": data_cfg.cache_dtype,
                "decode_timeout_s": data_cfg.decode_timeout_s,
                "frame_interval": data_cfg.frame_interval,
            },
            batch_size=VIDEOS_PER_CALL,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
            num_gpus=1 if use_gpu else 0,
            num_cpus=1,
        )
    )
    # Streamed: the driver keeps only the index rows, not a reference per block (one block
    # per video made the driver grow ~16 KB a video: 1.22x its peak RSS at 13,320 videos,
    # benchmarks/results/scale.json).
    parts = list(written.iter_batches(batch_size=None, batch_format="pyarrow"))
    index = pa.concat_tables(parts).sort_by("video_id")
    # Each file appears whole or not at all (a reader on another node never sees half of
    # one); the key goes last, so a cache without it was never finished.
    partial = cache_dir / f"{INDEX_FILE}.partial"
    pq.write_table(index, partial)
    partial.rename(cache_dir / INDEX_FILE)
    info = _info(cache_dir, index, key)
    if info.num_videos and info.num_failed == info.num_videos:
        raise BadDataError(
            f"feature cache {cache_dir}: all {info.num_videos} videos failed; first: "
            f"{info.first_error}. Fix the videos (or data.root) and run `jlstm data features`"
            " again"
        )
    partial = cache_dir / f"{KEY_FILE}.partial"
    partial.write_text(json.dumps(key, indent=2))
    partial.rename(cache_dir / KEY_FILE)
    return info


class _ArrayFile:
    """A cache file's array header and an open descriptor for positional reads."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, _, self.dtype = read_header(f)
            self.offset = f.tell()
        if self.dtype != dtype:
            raise ValueError(f"{path} holds {self.dtype}, not {dtype}: rebuild the cache")
        self.row_bytes = int(np.prod(self.shape[2:])) * dtype.itemsize
        expected = self.offset + int(np.prod(self.shape)) * dtype.itemsize
        self.stat = os.fstat(self.fd)  # of the file read (the one `_verify` checks)
        size = self.stat.st_size
        if size != expected:
            raise ValueError(f"{path} is {size} bytes, its header says {expected}: truncated")

    def read_rows(self, tap: int, first: int, out: np.ndarray) -> None:
        """Rows first.. of one tap into `out` (C-contiguous [rows, 512, K, K])."""
        start = self.offset + (tap * self.shape[1] + first) * self.row_bytes
        got = os.preadv(self.fd, [out.data.cast("B")], start)
        if got != out.nbytes:
            raise ValueError(f"short read: {got} of {out.nbytes} bytes")

    def close(self) -> None:
        os.close(self.fd)


class ChecksumError(ValueError):
    """A cache file's bytes do not hash to the checksum its index holds."""


# Per process, shared by its threads (a worker's clip-reader thread, Ray Data's task
# threads): the checksums of each cache's index, and what each file's verification found.
_memo_lock = threading.Lock()
# cache_dir -> (the index file's (inode, size, mtime), {video_id: (checksum, scale_checksum)})
_index_memo: dict[str, tuple[tuple[int, int, int], dict[int, tuple[int, int]]]] = {}
# file path -> ((inode, size, mtime), checksum expected, "" or the mismatch): a file replaced
# (a rebuild renames new files in) or an index with a new checksum is verified again.
_verified: dict[str, tuple[tuple[int, int, int], int, str]] = {}
_stats = {"files_hashed": 0, "bytes_hashed": 0, "hash_seconds": 0.0, "mismatches": 0}


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def checksum_stats() -> dict[str, float]:
    """What this process's verifications hashed so far: files_hashed, bytes_hashed,
    hash_seconds (wall time, summed over threads), mismatches. A file read again is not
    hashed again (unless it or the index changed)."""
    with _memo_lock:
        return dict(_stats)


def forget_verified() -> None:
    """Drop this process's memo, as if it had just started: each file is hashed again the
    next time it is opened (benchmarks/cache_read.py times a first epoch with this)."""
    with _memo_lock:
        _index_memo.clear()
        _verified.clear()


def _index_checksums(cache_dir: str) -> dict[int, tuple[int, int]]:
    """{video_id: (checksum, scale_checksum)} of the cache's index, read once per process
    and index file: one `stat` a call decides whether the memo still holds."""
    path = Path(cache_dir) / INDEX_FILE
    with _memo_lock:
        memo = _index_memo.get(cache_dir)
    if memo is not None and memo[0] == _identity(os.stat(path)):
        return memo[1]
    with open(path, "rb") as f:  # the identity of the very file read, whatever replaces it
        identity = _identity(os.fstat(f.fileno()))
        index = pq.read_table(f)
    if "checksum" not in index.column_names:
        raise ValueError(f"{path} holds no checksums (a cache of format < 4): {REBUILD_HINT}")
    checksums = dict(zip(
        index["video_id"].to_pylist(),
        zip(index["checksum"].to_pylist(), index["scale_checksum"].to_pylist(), strict=True),
        strict=True,
    ))
    with _memo_lock:
        _index_memo[cache_dir] = (identity, checksums)
    return checksums


def _file_checksum(fd: int, size: int) -> int:
    """xxh3_64 of the file's first `size` bytes, CHECKSUM_CHUNK at a time."""
    digest = xxhash.xxh3_64()
    chunk = memoryview(np.empty(min(CHECKSUM_CHUNK, max(size, 1)), np.uint8))
    offset = 0
    while offset < size:
        got = os.preadv(fd, [chunk[: size - offset]], offset)
        if got == 0:
            raise ValueError(f"short read: {offset} of {size} bytes")
        digest.update(chunk[:got])  # releases the GIL: the training step goes on meanwhile
        offset += got
    return digest.intdigest()


def _remembered(path: Path, st: os.stat_result, expected: int) -> str | None:
    """What this process found of this file ("" good, else the mismatch), None if new."""
    with _memo_lock:
        seen = _verified.get(str(path))
    return seen[2] if seen is not None and seen[:2] == (_identity(st), expected) else None


def _verify(path: Path, fd: int, st: os.stat_result, expected: int) -> None:
    """Raise ChecksumError unless the open file `fd` (at `path`, of stat `st`) hashes to
    `expected`; hashed the first time this process sees this file, then remembered."""
    identity = _identity(st)
    error = _remembered(path, st, expected)
    if error is None:
        started = time.perf_counter()
        got = _file_checksum(fd, st.st_size)
        error = "" if got == expected else (
            f"{path}: checksum mismatch (xxh3_64 {got:016x}, the index has {expected:016x}):"
            f" {REBUILD_HINT}"
        )
        with _memo_lock:
            # Two threads may hash the same new file at once; only one of them warns.
            first = _verified.get(str(path), (None, None, ""))[:2] != (identity, expected)
            _verified[str(path)] = (identity, expected, error)
            _stats["files_hashed"] += 1
            _stats["bytes_hashed"] += st.st_size
            _stats["hash_seconds"] += time.perf_counter() - started
            _stats["mismatches"] += bool(error)
        if error and first:
            log.warning("feature cache: %s", error)
    if error:
        raise ChecksumError(error)


_verifier: ThreadPoolExecutor | None = None


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: a fresh lock (the parent's may have
    been held by one) and a verifier of its own, started on first use."""
    global _memo_lock, _verifier
    _memo_lock = threading.Lock()
    _verifier = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _verify_soon(path: Path, fd: int, st: os.stat_result, expected: int) -> Future | None:
    """`_verify` in this process's verifier thread, or None when the memo already says the
    file is good (a mismatch it remembers raises at once). The hash of a batch's new files
    then runs beside the reads of its rows (both release the GIL): a first epoch costs
    about max(read, hash) instead of their sum where a core is free."""
    global _verifier
    error = _remembered(path, st, expected)
    if error == "":
        return None
    if error:
        raise ChecksumError(error)
    with _memo_lock:
        if _verifier is None:
            # One thread: the hashing takes at most one core besides the reader's.
            _verifier = ThreadPoolExecutor(1, thread_name_prefix="cache-verify")
        return _verifier.submit(_verify, path, fd, st, expected)


def _read_video(
    batch: dict[str, np.ndarray], rows: np.ndarray, video_id: int, out: dict[str, np.ndarray],
    files: list[_ArrayFile], checks: list[tuple[np.ndarray, int, Future]], *, cache_dir: str,
    cache_taps: list[str], taps: list[str], columns: list[int], clip_len: int, stride: int,
    frame_interval: int, dtype: str,
) -> None:
    """One video's `rows` of the batch into `out` (`read_cached_batch`); its open file joins
    `files` and its verification, if under way, `checks`. Raises what makes them bad."""
    path = cache_file(cache_dir, video_id)
    file = _ArrayFile(path, np.dtype(dtype))
    files.append(file)
    checksums = _index_checksums(cache_dir)
    if video_id not in checksums:
        raise ValueError(f"{path} is not in {INDEX_FILE}: {REBUILD_HINT}")
    checksum, scale_checksum = checksums[video_id]
    check = _verify_soon(path, file.fd, file.stat, checksum)
    if check is not None:
        checks.append((rows, video_id, check))
    if dtype == "uint8":
        scale_path = scale_file(cache_dir, video_id)
        with open(scale_path, "rb") as f:  # 2 KB a tap: verified here, at once
            _verify(scale_path, f.fileno(), os.fstat(f.fileno()), scale_checksum)
            scales = np.load(f)
        for tap, column in zip(taps, columns, strict=True):
            out[f"{TAP_SCALE_PREFIX}{tap}"][rows] = scales[column]
    num_frames = int(batch["num_frames"][rows[0]])
    # The frames the file holds, ascending: row i of the file is frame held[i].
    held = np.asarray(needed_frames(num_frames, clip_len, stride, frame_interval))
    if file.shape[:2] != (len(cache_taps), len(held)):
        raise ValueError(
            f"holds {file.shape[:2]} (taps, frames), expected "
            f"{(len(cache_taps), len(held))}: rebuild the cache"
        )
    for r in rows:
        frames = frame_indices(int(batch["clip_start"][r]), num_frames, clip_len,
                               frame_interval)
        positions = np.minimum(np.searchsorted(held, frames), len(held) - 1)
        if not np.array_equal(held[positions], frames):
            raise ValueError(f"clip at {batch['clip_start'][r]} is off the cache's grid")
        # Consecutive rows (the usual case): one read per tap; else one per frame.
        first = int(positions[0])
        runs = ([(first, 0, clip_len)]
                if np.array_equal(positions, np.arange(first, first + clip_len))
                else [(int(p), i, i + 1) for i, p in enumerate(positions)])
        for tap, column in zip(taps, columns, strict=True):
            for row, lo, hi in runs:
                file.read_rows(column, row, out[f"{TAP_PREFIX}{tap}"][r, lo:hi])


def read_cached_batch(
    batch: dict[str, np.ndarray],
    *,
    cache_dir: str,
    cache_taps: list[str],
    taps: list[str],
    map_size: int,
    clip_len: int,
    stride: int,
    frame_interval: int,
    dtype: str = "float16",
) -> dict[str, np.ndarray]:
    """Clip rows in, cached taps out; never raises (a batch function, as `decode_batch`).

    `cache_taps` are the cache's taps (its key), `taps` the ones wanted (any subset);
    `stride` is the clip grid of the rows' subset, which decides the frames a video's
    file holds; `dtype` the cache's. Out: taps_<name> [B, T, 512, K, K] of `dtype` per
    tap (a uint8 cache adds tap_scale_<name> float32 [B, 512]; the worker multiplies on
    its device), label, video_id, clip_start, ok, error (as `decode_batch`).

    Each file is verified against the index's checksum the first time this process opens
    it (`_verify`, in the background while the rows are read: no row is returned before
    its file has passed); a file that fails makes its video's rows bad clips.
    """
    size = len(batch["video_id"])
    columns = [cache_taps.index(tap) for tap in taps]
    shape = (size, clip_len, TAP_CHANNELS, map_size, map_size)
    out = {f"{TAP_PREFIX}{tap}": np.empty(shape, dtype=dtype) for tap in taps}
    if dtype == "uint8":
        out |= {f"{TAP_SCALE_PREFIX}{tap}": np.zeros((size, TAP_CHANNELS), np.float32)
                for tap in taps}
    ok = np.ones(size, dtype=bool)
    errors = np.full(size, "", dtype=object)

    def fail(rows: np.ndarray, video_id: int, e: Exception) -> None:
        ok[rows] = False
        errors[rows] = f"video {video_id}: no cached taps: {type(e).__name__}: {e}"

    files: list[_ArrayFile] = []
    checks: list[tuple[np.ndarray, int, Future]] = []  # verifications under way
    try:
        for video_id in np.unique(batch["video_id"]).tolist():
            rows = np.flatnonzero(batch["video_id"] == video_id)
            try:
                _read_video(batch, rows, video_id, out, files, checks, cache_dir=cache_dir,
                            cache_taps=cache_taps, taps=taps, columns=columns,
                            clip_len=clip_len, stride=stride, frame_interval=frame_interval,
                            dtype=dtype)
            # Missing file (the video failed at build time), unreadable, truncated or
            # corrupt file (checksum mismatch): the video's clips are bad clips, as a bad
            # video's.
            except Exception as e:
                fail(rows, video_id, e)
    finally:
        # Every verification ends before its file is closed (it reads through the same fd).
        for rows, video_id, check in checks:
            try:
                check.result()
            except Exception as e:
                if ok[rows].all():  # not failed already for another reason
                    fail(rows, video_id, e)
        for file in files:
            file.close()
    for tap in taps:
        out[f"{TAP_PREFIX}{tap}"][~ok] = 0  # failed rows carry zeros, never stale memory
    return {
        **out,
        "label": batch["label"].astype(np.int64),
        "video_id": batch["video_id"].astype(np.int64),
        "clip_start": batch["clip_start"].astype(np.int64),
        "ok": ok,
        "error": errors,
    }
