"""The manifest `index_videos` writes, read back: its rows, its quarantine, its identity.

Every reader of a split's videos starts here (datasets, the feature cache, sizing, the
tracking of a run), so this module imports nothing else of data_shards but its config.

Paths: the manifest's and the quarantine's `video_path` is relative to `data.root` (posix),
so a dataset copied or moved with its manifest is used at its new root as it is; whoever
opens a video joins it with the run's `data.root` (`video_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import PurePath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_shards.config import DataConfig
from data_shards.errors import BadDataError, MissingVideosError


def video_file(root: str | os.PathLike, path: str) -> str:
    """The file to open for a manifest's `video_path`: joined with the run's `data.root`
    (absolute, so a Ray worker in a folder of its own opens the same file). An absolute path
    (one a hand-written split file listed outside the root) stays as it is."""
    return os.path.join(os.path.abspath(root), path)


def relative_to_root(table: pa.Table, root: str | os.PathLike) -> pa.Table:
    """`table` (a manifest or quarantine) with its absolute `video_path`s under `root` made
    relative to it. Manifests written before paths were relative held absolute ones; read
    this way they act as new ones (the feature cache's key, the target boxes)."""
    paths = table["video_path"].to_pylist() if "video_path" in table.column_names else []
    if not any(os.path.isabs(path) for path in paths):
        return table
    # The old index resolved symlinks: the root is compared both as given and resolved.
    bases = {os.path.abspath(root), os.path.realpath(root)}

    def relative(path: str) -> str:
        for base in bases:
            if os.path.isabs(path) and os.path.commonpath([base, path]) == base:
                return PurePath(os.path.relpath(path, base)).as_posix()
        return path

    column = pa.array([relative(path) for path in paths], pa.string())
    return table.set_column(table.schema.get_field_index("video_path"), "video_path", column)


def load_manifest(data_cfg: DataConfig) -> pa.Table:
    """The manifest written by `index_videos` (run `jlstm data index` first)."""
    path = data_cfg.manifest_path()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist: run `jlstm data index` first")
    return relative_to_root(pq.read_table(path), data_cfg.root)


def quarantine_table(data_cfg: DataConfig) -> pa.Table:
    """The videos the index set aside (video_path, reason, ...), for the run's artifact."""
    return relative_to_root(pq.read_table(data_cfg.quarantine_path()), data_cfg.root)


def check_videos_present(data_cfg: DataConfig, manifest: pa.Table) -> None:
    """MissingVideosError naming how many of the manifest's videos are not under
    `data.root`, and the first, before any work starts (a moved dataset given the wrong
    root would otherwise fail every clip, one by one). One listing per folder, not one stat
    per video: UCF101 is 101 folders and 13,320 files, on a network mount."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in manifest["video_path"].to_pylist():
        folder, name = os.path.split(video_file(data_cfg.root, path))
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(path)
    if missing:
        raise MissingVideosError(
            f"{len(missing)} of {manifest.num_rows} videos of {data_cfg.manifest_path()} are "
            f"missing under data.root = {data_cfg.root}; first: {missing[0]} (looked for "
            f"{video_file(data_cfg.root, missing[0])}). Set data.root (--root) to the folder "
            "the dataset was moved to, or re-index it (jlstm data index)"
        )


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
