"""Ray Data datasets of clips for Ray Train: {"train": ..., "val": ...}.

Both start from a clip table (one small row per clip: video, start, label). Decoding: the
table is cut into blocks of `decode_batch_size` clips and a `map_batches` stage with its
own CPU budget turns each clip row into frames (decord), on whichever node has CPUs. Cached
taps: the rows stay clip rows and the consumer reads their taps (`clip_readers`, applied by
`iter_clip_batches` in a background thread), one copy from the page cache or the shared
filesystem straight into the batch. Measured (benchmarks/cache_read.py, 2-core machine, taps
in the page cache): this read in the consumer delivers less per CPU than the `map_batches`
read stage it replaced, although every batch of the stage is copied into the object store
and out again: 1,502 against 3,263 MB/s per CPU (benchmarks/results/cache_read.json), and
793 against 4,078 in a later run (issue 20), where a plain read of the files gave 3,564
MB/s. The consumer's one thread also cannot use more than one CPU, and a stage can use the
node's: `data.cache_read: stage` reads the taps in a `map_batches` stage instead (the same
`read_cached_batch`, the same rows, bad clips flagged alike). Which design keeps a graphed
GPU step fed is measured on the GPU machine (benchmarks/gpu_suite.py, stage `feed`); until
then `worker` stays the default. Only clip rows are ever shuffled; frames and taps stream
through and are never materialized as a whole.

Training order: `random_shuffle` of the clip table with a `RandomSeedConfig`. With
`epoch_seed=None` the seed is `data_cfg.seed` and Ray reseeds on every execution, so each
epoch (each pass over the dataset) visits the clips in a new order that is reproducible
run to run. With an `epoch_seed` the order is fixed to that seed. Evaluation takes every
clip of every test video in (video_id, clip_start) order. Both keep that order when iterated
directly (`preserve_order`: whichever decode task finishes first waits its turn). Under Ray
Train the ingest options replace it and each worker gets its clips as they are ready;
evaluation sorts the gathered predictions by video, so its metrics do not depend on it.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import RandomSeedConfig

from data_shards.clip_spec import ClipSpec
from data_shards.clips import clip_table
from data_shards.config import DataConfig
from data_shards.decode import decode_batch
from data_shards.features import cached_taps, read_cached_batch
from data_shards.run_data import RunData, load_run_data


def subset_clips(
    manifest: pa.Table, subset: str, clip_len: int, stride: int, frame_interval: int
) -> pa.Table:
    """The clip table of one subset ("train" or "test") of the manifest."""
    videos = manifest.filter(pc.equal(manifest["subset"], subset))
    return clip_table(videos, clip_len, stride, frame_interval)


def train_clip_table(data_cfg: DataConfig, clip_spec: ClipSpec, manifest: pa.Table) -> pa.Table:
    """The training clips of an epoch (`train.batch_size` of them a step, any world size)."""
    return subset_clips(
        manifest, "train", clip_spec.clip_len, data_cfg.train_stride, data_cfg.frame_interval
    )


def _shuffle_seed(data_cfg: DataConfig, epoch_seed: int | None) -> RandomSeedConfig:
    """A new order per execution from data_cfg.seed, or one fixed order per epoch_seed."""
    if epoch_seed is None:
        return RandomSeedConfig(seed=data_cfg.seed, reseed_after_execution=True)
    return RandomSeedConfig(
        seed=data_cfg.seed * 1_000_003 + epoch_seed, reseed_after_execution=False
    )


# What a consumer does to each batch of a dataset's rows before using it: read the cached
# taps of clip rows (`read_cached_batch` with the cache's settings), or None (decoded rows).
ClipReader = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# Test clips per worker: the test set is cut into at least this many blocks per evaluating
# worker. `streaming_split(equal=False)` hands out whole blocks, so a test set in one block
# (a clip table from one Arrow table, as cached taps are read) was scored by rank 0 alone.
EVAL_BLOCKS_PER_WORKER = 4


def eval_blocks(clips: pa.Table, rows_per_block: int, workers: int) -> list[pa.Table]:
    """`clips` cut in order into blocks of at most `rows_per_block` rows, and into at least
    `EVAL_BLOCKS_PER_WORKER` blocks per worker (as far as there are rows)."""
    n = clips.num_rows
    if n == 0:
        return [clips]
    count = max(workers * EVAL_BLOCKS_PER_WORKER, -(-n // rows_per_block))
    edges = np.linspace(0, n, min(count, n) + 1).astype(int)
    return [clips.slice(lo, hi - lo) for lo, hi in itertools.pairwise(edges)]


def _decoded(
    data_cfg: DataConfig, clip_spec: ClipSpec, clips: ray.data.Dataset, batch_size: int | None
) -> ray.data.Dataset:
    """clip rows in blocks of at most `decode_batch_size` rows -> rows with decoded frames
    (module docstring). `batch_size=None`: one decode task per block, never two blocks
    in one task (the blocks of `eval_blocks` stay blocks)."""
    return clips.map_batches(
        decode_batch,
        fn_kwargs={
            "clip_len": clip_spec.clip_len,
            "frame_interval": data_cfg.frame_interval,
            "frame_size": clip_spec.frame_size,
            # The manifest's paths are relative to data.root: each task opens them there.
            "root": os.path.abspath(data_cfg.root),
            "timeout_s": data_cfg.decode_timeout_s,
            "flow": clip_spec.decode_flow(),
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=data_cfg.decode_cpus,
    )


def build_datasets(
    data_cfg: DataConfig,
    clip_spec: ClipSpec,
    *,
    epoch_seed: int | None = None,
    eval_workers: int = 1,
    run_data: RunData | None = None,
) -> dict[str, ray.data.Dataset]:
    """{"train", "val"} datasets of clip rows for `TorchTrainer(datasets=...)`.

    Rows: label, video_id, clip_start (int64), num_frames; decoded (no feature cache): ok
    (bool), error (str) and frames (uint8 [T, S, S, 3]), and for a model with a flow input
    optical_flow (uint8 [T, S, S, 2L], `ClipSpec.decode_flow`). With use_feature_cache the taps
    are read by the consumer: iterate with `iter_clip_batches(ds, n, clip_readers(...)[name])`
    to get taps_<name> per tap of `clip_spec.taps`, ok and error. Failed clips are rows with
    ok=False, never exceptions. `val` comes in enough blocks for each of `eval_workers`
    workers to score some (`eval_blocks`). From `run_data` (read and checked once), else
    read here: BadDataError past max_bad_fraction, StaleCacheError for a cache that does
    not match the configs.
    """
    if run_data is None:
        run_data = load_run_data(data_cfg, lambda num_classes: clip_spec)
    manifest = run_data.manifest
    clip_len, interval = clip_spec.clip_len, data_cfg.frame_interval
    train_clips = train_clip_table(data_cfg, clip_spec, manifest)
    val_clips = subset_clips(
        manifest, "test", clip_len, data_cfg.eval_stride_for(clip_len), interval
    )
    train = ray.data.from_arrow(train_clips).random_shuffle(
        seed=_shuffle_seed(data_cfg, epoch_seed)
    )
    val = ray.data.from_arrow(eval_blocks(val_clips, data_cfg.decode_batch_size, eval_workers))
    if data_cfg.use_feature_cache and data_cfg.cache_read == "stage":
        reads = _cache_readers(data_cfg, clip_spec, run_data.cache_key)
        train = train.map_batches(
            reads["train"], batch_size=data_cfg.decode_batch_size, batch_format="numpy",
            num_cpus=data_cfg.decode_cpus,
        )
        # One task per eval block, as decoding (below): every worker gets some test clips.
        val = val.map_batches(
            reads["val"], batch_size=None, batch_format="numpy", num_cpus=data_cfg.decode_cpus
        )
    if not data_cfg.use_feature_cache:
        train = train.repartition(target_num_rows_per_block=data_cfg.decode_batch_size)
        train = _decoded(data_cfg, clip_spec, train, data_cfg.decode_batch_size)
        # A batch size would bundle blocks up to that many rows into one task, and so into
        # one output block: 8 one-clip test blocks became one, which one worker scored.
        val = _decoded(data_cfg, clip_spec, val, None)
    for ds in (train, val):
        ds.context.execution_options.preserve_order = True
    return {"train": train, "val": val}


def clip_readers(
    data_cfg: DataConfig, clip_spec: ClipSpec, cache_key: dict | None = None
) -> dict[str, ClipReader | None]:
    """Per dataset of `build_datasets`, what its consumer applies to each batch: reading
    the cached taps (with the cache's taps, dtype and the subset's clip grid), or None
    (decoded frames, or taps a `cache_read: stage` already read).
    `cache_key`: the cache's key as checked (`RunData.cache_key`), else read."""
    if not data_cfg.use_feature_cache or data_cfg.cache_read == "stage":
        return {"train": None, "val": None}
    return _cache_readers(data_cfg, clip_spec, cache_key)


def _cache_readers(
    data_cfg: DataConfig, clip_spec: ClipSpec, cache_key: dict | None
) -> dict[str, ClipReader]:
    """The reads of the cached taps of each dataset's clips (`read_cached_batch`)."""
    common = {
        "cache_dir": data_cfg.feature_cache,
        "cache_taps": cached_taps(data_cfg, cache_key),
        "taps": list(clip_spec.taps),
        "map_size": clip_spec.map_size,
        "clip_len": clip_spec.clip_len,
        "frame_interval": data_cfg.frame_interval,
        "dtype": data_cfg.cache_dtype,
    }
    strides = {
        "train": data_cfg.train_stride, "val": data_cfg.eval_stride_for(clip_spec.clip_len),
    }
    return {name: partial(read_cached_batch, stride=stride, **common)
            for name, stride in strides.items()}


def iter_clip_batches(
    source: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    read: ClipReader | None,
    *,
    prefetch: int = 2,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of `source` (a Dataset, or a Ray Train worker's shard of one), each
    passed through `read` when there is one.

    The reads run in one background thread up to `prefetch` batches ahead: `preadv`
    releases the GIL, so they overlap the training step that consumes the batch before.
    """
    batches = source.iter_batches(batch_size=batch_size, batch_format="numpy",
                                  drop_last=drop_last)
    if read is None:
        yield from batches
        return
    stop = threading.Event()  # set when the consumer stops early: no read is wasted then
    with ThreadPoolExecutor(1, thread_name_prefix="clip-reader") as pool:
        pending: deque[Future] = deque()
        try:
            for rows in batches:
                pending.append(pool.submit(_read_unless, stop, read, rows))
                if len(pending) > prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            stop.set()


def _read_unless(stop: threading.Event, read: ClipReader, rows: dict) -> dict | None:
    return None if stop.is_set() else read(rows)
