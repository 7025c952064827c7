"""The manifest `index_videos` writes, read back: its rows, its quarantine, its identity.

Every reader of a split's videos starts here (datasets, the feature cache, sizing, the
tracking of a run), so this module imports nothing else of data_shards but its config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_shards.config import DataConfig
from data_shards.errors import BadDataError


def load_manifest(data_cfg: DataConfig) -> pa.Table:
    """The manifest written by `index_videos` (run `jlstm data index` first)."""
    path = data_cfg.manifest_path()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist: run `jlstm data index` first")
    return pq.read_table(path)


def quarantine_table(data_cfg: DataConfig) -> pa.Table:
    """The videos the index set aside (video_path, reason, ...), for the run's artifact."""
    return pq.read_table(data_cfg.quarantine_path())


def check_bad_fraction(
    data_cfg: DataConfig, manifest: pa.Table, quarantine: pa.Table | None = None
) -> None:
    """Refuse a run where the quarantined share of listed videos exceeds max_bad_fraction
    (the `quarantine` table as read, else read here)."""
    if quarantine is None and data_cfg.quarantine_path().is_file():
        quarantine = quarantine_table(data_cfg)
    bad = quarantine.num_rows if quarantine is not None else 0
    listed = bad + manifest.num_rows
    if listed and bad / listed > data_cfg.max_bad_fraction:
        raise BadDataError(
            f"{bad} of {listed} videos are quarantined ({bad / listed:.1%}), more than "
            f"max_bad_fraction = {data_cfg.max_bad_fraction}; see {data_cfg.quarantine_path()}"
        )


def dataset_digest(manifest: pa.Table) -> str:
    """16 hex digits of sha256 over what makes the dataset this one, wherever it lies: each
    video's class, file name, size, frame count and subset. Runs on the same digest and
    split were trained and tested on the same videos (the champion rule relies on it)."""
    rows = zip(
        manifest["label_name"].to_pylist(),
        [PurePath(path).name for path in manifest["video_path"].to_pylist()],
        manifest["size"].to_pylist(),
        manifest["num_frames"].to_pylist(),
        manifest["subset"].to_pylist(),
        strict=True,
    )
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()[:16]


def subset_videos(manifest: pa.Table, subset: str) -> int:
    """How many of the manifest's videos are in `subset` ("train" or "test")."""
    return int(pc.sum(pc.equal(manifest["subset"], subset)).as_py() or 0)
