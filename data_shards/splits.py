"""Official split files (UCF101, HMDB51) and a plain CSV, parsed into `VideoEntry` lists."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

Subset = Literal["train", "test"]
CLASS_NAMES_KEY = b"jlstm.class_names"  # Parquet schema metadata: every class, by label


@dataclass(frozen=True)
class VideoEntry:
    """One listed video: its path relative to the video root, 0-based label, and subset."""

    path: str
    label: int
    label_name: str
    subset: Subset


def _lines(path: Path) -> list[str]:
    """Non-empty lines of a split file; CRLF and trailing spaces are the publishers' norm."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def ucf101_class_names(splits_dir: str | os.PathLike) -> list[str]:
    """Class names from classInd.txt ("1 ApplyEyeMakeup" ...), ordered by 0-based label."""
    pairs = [line.split() for line in _lines(Path(splits_dir) / "classInd.txt")]
    return [name for _, name in sorted(pairs, key=lambda p: int(p[0]))]


def parse_ucf101_splits(splits_dir: str | os.PathLike, split: int) -> list[VideoEntry]:
    """Train and test entries of UCF101 split `split` (1..3).

    Labels come from the class folder via classInd.txt, never from the file name: in
    HandstandPushups/ the files are named v_HandStandPushups_*. A trainlist label that
    disagrees with its folder is an error.
    """
    if split not in (1, 2, 3):
        raise ValueError(f"split = {split} is not allowed: choose 1, 2 or 3")
    splits_dir = Path(splits_dir)
    names = ucf101_class_names(splits_dir)
    label_of = {name: k for k, name in enumerate(names)}
    entries = []
    for subset in ("train", "test"):
        listing = splits_dir / f"{subset}list{split:02d}.txt"
        for line in _lines(listing):
            path, *given = line.split()
            folder = path.split("/")[0]
            if folder not in label_of:
                raise ValueError(f"{listing}: {path!r} is in folder {folder!r}, not in classInd")
            label = label_of[folder]
            if given and int(given[0]) - 1 != label:
                raise ValueError(
                    f"{listing}: {path!r} has label {given[0]}, its folder {label + 1}"
                )
            entries.append(VideoEntry(path, label, folder, subset))
    return entries


HMDB_TAGS: dict[str, Subset | None] = {"1": "train", "2": "test", "0": None}


def parse_hmdb51_splits(splits_dir: str | os.PathLike, split: int) -> list[VideoEntry]:
    """Entries of HMDB51 split `split` from `<class>_test_split<N>.txt` files.

    Each line is "<file> <tag>": tag 1 = train, 2 = test, 0 = unused (left out). Classes
    are the file-name prefixes, sorted; paths are `<class>/<file>`.
    """
    if split not in (1, 2, 3):
        raise ValueError(f"split = {split} is not allowed: choose 1, 2 or 3")
    suffix = f"_test_split{split}.txt"
    files = sorted(Path(splits_dir).glob(f"*{suffix}"))
    if not files:
        raise FileNotFoundError(f"no *{suffix} files in {splits_dir}")
    entries = []
    for label, listing in enumerate(files):
        name = listing.name[: -len(suffix)]
        for line in _lines(listing):
            file, tag = line.split()
            if tag not in HMDB_TAGS:
                raise ValueError(f"{listing}: tag {tag!r} of {file!r} is not one of 0, 1, 2")
            subset = HMDB_TAGS[tag]
            if subset is not None:
                entries.append(VideoEntry(f"{name}/{file}", label, name, subset))
    return entries


def parse_folder_csv(csv_path: str | os.PathLike) -> list[VideoEntry]:
    """Entries from a CSV with header "path,label,subset" (label: a class name).

    Labels are the class names sorted, numbered from 0; subset is "train" or "test".
    """
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"path", "label", "subset"}:
        raise ValueError(f"{csv_path}: the header must be exactly path,label,subset")
    bad = [r for r in rows if r["subset"] not in ("train", "test")]
    if bad:
        raise ValueError(f"{csv_path}: subset {bad[0]['subset']!r} is not 'train' or 'test'")
    label_of = {name: k for k, name in enumerate(sorted({r["label"] for r in rows}))}
    return [VideoEntry(r["path"], label_of[r["label"]], r["label"], r["subset"]) for r in rows]


def class_names(manifest: str | os.PathLike | pa.Table) -> list[str]:
    """Class names ordered by label, for confusion-matrix axes.

    Read from the manifest's metadata (so a class whose videos were all quarantined keeps
    its place), else from its label / label_name columns.
    """
    table = manifest if isinstance(manifest, pa.Table) else pq.read_table(manifest)
    metadata = table.schema.metadata or {}
    if CLASS_NAMES_KEY in metadata:
        return json.loads(metadata[CLASS_NAMES_KEY])
    pairs = dict(zip(table["label"].to_pylist(), table["label_name"].to_pylist(), strict=True))
    return [pairs[k] for k in sorted(pairs)]
