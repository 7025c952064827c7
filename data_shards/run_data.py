"""A run's data as read once on the driver: the manifest and what is derived from it.

Before, one `jlstm train` read the manifest Parquet about 7 times, the quarantine table 3
times and the cache's key 3 times, and built a frozen VGG16 twice to hash its weights.
Now `load_run_data` reads each once (the cache check builds the backbone once) and the
datasets, the MLflow inputs and the attention examples take the `RunData` it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from data_shards.features import check_cache
from data_shards.manifest import (
    check_bad_fraction,
    check_videos_present,
    dataset_digest,
    load_manifest,
    quarantine_table,
)
from data_shards.splits import class_names


@dataclass(frozen=True)
class RunData:
    """The manifest of a run's split and what the run needs of it, all read once.

    `cache_key` is the feature cache's key, checked against the configs (None without a
    cache, or when loaded without the check: a finished run's data).
    """

    manifest_path: Path
    manifest: pa.Table  # one row per usable video (data_shards.index)
    class_names: list[str]  # ordered by label
    digest: str  # manifest.dataset_digest: what the champion rule compares
    quarantine: pa.Table  # the videos the index set aside
    cache_key: dict[str, Any] | None = None

    def subset(self, name: str) -> pa.Table:
        """The manifest rows of subset `name` ("train" or "test")."""
        return self.manifest.filter(pc.equal(self.manifest["subset"], name))

    @property
    def test_videos(self) -> int:
        return self.subset("test").num_rows


def load_run_data(
    data_cfg: DataConfig, clip_spec_for: Callable[[int], ClipSpec] | None = None
) -> RunData:
    """Read the manifest and quarantine of `data_cfg` once and check them: BadDataError
    past `max_bad_fraction`; decoding (no feature cache), MissingVideosError when videos
    are not under `data.root`. With the feature cache on and `clip_spec_for` (num_classes ->
    the model config's clip spec: the classes are known once the manifest is read, and a
    model config is only valid with them), the cache's key is checked too
    (StaleCacheError)."""
    manifest = load_manifest(data_cfg)
    path = data_cfg.quarantine_path()
    quarantine = (
        quarantine_table(data_cfg) if path.is_file() else pa.table({"video_path": []})
    )
    check_bad_fraction(data_cfg, manifest, quarantine)
    if not data_cfg.use_feature_cache:  # the cached taps are read without the videos
        check_videos_present(data_cfg, manifest)
    names = class_names(manifest)
    key = None
    if data_cfg.use_feature_cache and clip_spec_for is not None:
        key = check_cache(data_cfg, clip_spec_for(len(names)), manifest)
    return RunData(
        data_cfg.manifest_path(), manifest, names, dataset_digest(manifest), quarantine, key
    )
