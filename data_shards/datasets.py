"""Ray Data datasets of clips for Ray Train: {"train": ..., "val": ...}.

Both start from a clip table (one small row per clip: video, start, label), cut into blocks
of `decode_batch_size` clips, then a `map_batches` stage with its own CPU budget turns each
clip row into frames (decord) or cached VGG16 taps. Only clip rows are ever shuffled; the
frames stream through and are never materialized as a whole.

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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import RandomSeedConfig

from data_shards.clips import clip_table
from data_shards.config import DataConfig
from data_shards.decode import decode_batch


class BadDataError(RuntimeError):
    """More of the dataset failed than `max_bad_fraction` allows."""


def load_manifest(data_cfg: DataConfig) -> pa.Table:
    """The manifest written by `index_videos` (run `jlstm data index` first)."""
    path = data_cfg.manifest_path()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist: run `jlstm data index` first")
    return pq.read_table(path)


def quarantine_table(data_cfg: DataConfig) -> pa.Table:
    """The videos the index set aside (video_path, reason, ...), for the run's artifact."""
    return pq.read_table(data_cfg.quarantine_path())


def check_bad_fraction(data_cfg: DataConfig, manifest: pa.Table) -> None:
    """Refuse a run where the quarantined share of listed videos exceeds max_bad_fraction."""
    bad = quarantine_table(data_cfg).num_rows if data_cfg.quarantine_path().is_file() else 0
    listed = bad + manifest.num_rows
    if listed and bad / listed > data_cfg.max_bad_fraction:
        raise BadDataError(
            f"{bad} of {listed} videos are quarantined ({bad / listed:.1%}), more than "
            f"max_bad_fraction = {data_cfg.max_bad_fraction}; see {data_cfg.quarantine_path()}"
        )


def subset_clips(
    manifest: pa.Table, subset: str, clip_len: int, stride: int, frame_interval: int
) -> pa.Table:
    """The clip table of one subset ("train" or "test") of the manifest."""
    videos = manifest.filter(pc.equal(manifest["subset"], subset))
    return clip_table(videos, clip_len, stride, frame_interval)


def _shuffle_seed(data_cfg: DataConfig, epoch_seed: int | None) -> RandomSeedConfig:
    """A new order per execution from data_cfg.seed, or one fixed order per epoch_seed."""
    if epoch_seed is None:
        return RandomSeedConfig(seed=data_cfg.seed, reseed_after_execution=True)
    return RandomSeedConfig(
        seed=data_cfg.seed * 1_000_003 + epoch_seed, reseed_after_execution=False
    )


def _clip_rows(
    data_cfg: DataConfig, model_cfg, clips: ray.data.Dataset, stride: int,
    cache_taps: list[str] | None,
) -> ray.data.Dataset:
    """clip rows (on a grid of `stride`) -> rows with frames or taps (module docstring)."""
    ds = clips.repartition(target_num_rows_per_block=data_cfg.decode_batch_size)
    common = {
        "batch_size": data_cfg.decode_batch_size,
        "batch_format": "numpy",
        "num_cpus": data_cfg.decode_cpus,
    }
    if cache_taps is not None:
        from data_shards.features import read_cached_batch

        return ds.map_batches(
            read_cached_batch,
            fn_kwargs={
                "cache_dir": data_cfg.feature_cache,
                "cache_taps": cache_taps,
                "taps": list(model_cfg.taps),
                "map_size": model_cfg.map_size,
                "clip_len": model_cfg.clip_len,
                "stride": stride,
                "frame_interval": data_cfg.frame_interval,
            },
            **common,
        )
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "clip_len": model_cfg.clip_len,
            "frame_interval": data_cfg.frame_interval,
            "frame_size": model_cfg.frame_size,
        },
        **common,
    )


def build_datasets(
    data_cfg: DataConfig, model_cfg, *, epoch_seed: int | None = None
) -> dict[str, ray.data.Dataset]:
    """{"train", "val"} datasets of clip rows for `TorchTrainer(datasets=...)`.

    Rows: label, video_id, clip_start (int64), ok (bool), error (str), and either frames
    (uint8 [T, S, S, 3]) or, with use_feature_cache, taps_<name> (float16 [T, 512, K, K])
    per tap of `model_cfg.taps`. Failed clips are rows with ok=False, never exceptions.
    Raises BadDataError past max_bad_fraction, StaleCacheError for a cache that does not
    match the configs.
    """
    manifest = load_manifest(data_cfg)
    check_bad_fraction(data_cfg, manifest)
    cache_taps = None
    if data_cfg.use_feature_cache:
        from data_shards.features import check_cache

        cache_taps = check_cache(data_cfg, model_cfg, manifest)["taps"]
    clip_len, interval = model_cfg.clip_len, data_cfg.frame_interval
    train_stride, eval_stride = data_cfg.train_stride, data_cfg.eval_stride_for(clip_len)
    train_clips = subset_clips(manifest, "train", clip_len, train_stride, interval)
    val_clips = subset_clips(manifest, "test", clip_len, eval_stride, interval)
    shuffled = ray.data.from_arrow(train_clips).random_shuffle(
        seed=_shuffle_seed(data_cfg, epoch_seed)
    )
    train = _clip_rows(data_cfg, model_cfg, shuffled, train_stride, cache_taps)
    val = _clip_rows(data_cfg, model_cfg, ray.data.from_arrow(val_clips), eval_stride, cache_taps)
    for ds in (train, val):
        ds.context.execution_options.preserve_order = True
    return {"train": train, "val": val}
