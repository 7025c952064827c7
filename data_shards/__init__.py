"""data_shards: split parsing, index, clips, decoding, Ray Data datasets, feature cache, synth.

Everything between video files on disk and batches of clips on each Ray Train worker.
decord and torch are imported only inside the functions that decode or run the backbone.
"""

from data_shards.clips import clip_starts, clip_table, frame_indices, needed_frames
from data_shards.config import DataConfig
from data_shards.datasets import (
    BadDataError,
    build_datasets,
    load_manifest,
    quarantine_table,
)
from data_shards.decode import decode_batch, decode_clip
from data_shards.features import (
    CacheInfo,
    StaleCacheError,
    build_feature_cache,
    check_cache,
    read_cached_batch,
)
from data_shards.index import IndexResult, ensure_index, index_videos, probe_video
from data_shards.sizing import DataSize, data_size
from data_shards.splits import (
    VideoEntry,
    class_names,
    parse_folder_csv,
    parse_hmdb51_splits,
    parse_ucf101_splits,
)
from data_shards.synth import synthesize_dataset

__all__ = [
    "BadDataError",
    "CacheInfo",
    "DataConfig",
    "DataSize",
    "IndexResult",
    "StaleCacheError",
    "VideoEntry",
    "build_datasets",
    "build_feature_cache",
    "check_cache",
    "class_names",
    "clip_starts",
    "clip_table",
    "data_size",
    "decode_batch",
    "decode_clip",
    "ensure_index",
    "frame_indices",
    "index_videos",
    "load_manifest",
    "needed_frames",
    "parse_folder_csv",
    "parse_hmdb51_splits",
    "parse_ucf101_splits",
    "probe_video",
    "quarantine_table",
    "read_cached_batch",
    "synthesize_dataset",
]
