"""Split files parsed into `VideoEntry` lists: the official ones (UCF101, HMDB51), a plain
CSV, MMAction2-style list files, or none at all: a folder of class folders split per class
by a hash of each video's path (`split_by_hash`)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from data_shards.errors import SplitFileError

log = logging.getLogger(__name__)

Subset = Literal["train", "test"]
CLASS_NAMES_KEY = b"jlstm.class_names"  # Parquet schema metadata: every class, by label
# What a class-folder scan takes for a video (lower-cased suffix): what FFmpeg, and so
# decord, reads and what cameras, phones and downloads produce.
VIDEO_EXTENSIONS = frozenset({
    ".avi", ".mp4", ".m4v", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
    ".3gp", ".ogv", ".ts", ".mts", ".m2ts",
})


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
                raise SplitFileError(
                    f"{listing}: {path!r} is in folder {folder!r}, not in classInd"
                )
            label = label_of[folder]
            if given and int(given[0]) - 1 != label:
                raise SplitFileError(
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
                raise SplitFileError(f"{listing}: tag {tag!r} of {file!r} is not one of 0, 1, 2")
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
        raise SplitFileError(f"{csv_path}: the header must be exactly path,label,subset")
    bad = [r for r in rows if r["subset"] not in ("train", "test")]
    if bad:
        raise SplitFileError(
            f"{csv_path}: subset {bad[0]['subset']!r} is not 'train' or 'test'"
        )
    label_of = {name: k for k, name in enumerate(sorted({r["label"] for r in rows}))}
    return [VideoEntry(r["path"], label_of[r["label"]], r["label"], r["subset"]) for r in rows]


def split_hash(seed: int, path: str) -> bytes:
    """The stable rank of a video in its class: sha256 of (seed, path). Never Python's
    `hash()`, which differs between processes: the same files must give the same split on
    every machine and every day."""
    return hashlib.sha256(f"{seed}\0{path}".encode()).digest()


def split_by_hash(paths: list[str], test_fraction: float, seed: int) -> set[str]:
    """The test videos of one class: the `round(test_fraction * n)` of its `n` paths with
    the smallest `split_hash`. A video's subset depends only on its own hash and the class's
    count, so the same files always give the same split, and adding one file moves at most
    one other (the count of test videos grows by at most one)."""
    ranked = sorted(paths, key=lambda path: (split_hash(seed, path), path))
    return set(ranked[: round(test_fraction * len(paths))])


def find_class_videos(video_root: str | os.PathLike) -> dict[str, list[str]]:
    """{class folder name: its videos' paths relative to `video_root` (posix, sorted)} for
    every folder directly under `video_root` that holds videos (`VIDEO_EXTENSIONS`, at any
    depth inside it); hidden files and folders are skipped."""
    root = Path(video_root)
    found: dict[str, list[str]] = {}
    loose = 0
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if not child.is_dir():
            loose += child.suffix.lower() in VIDEO_EXTENSIONS
            continue
        videos = []
        for folder, dirs, files in os.walk(child):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            videos += [
                Path(folder, f).relative_to(root).as_posix() for f in files
                if not f.startswith(".") and Path(f).suffix.lower() in VIDEO_EXTENSIONS
            ]
        if videos:
            found[child.name] = sorted(videos)
    if loose:  # said, not refused: a stray file beside the class folders has no class
        log.warning("%d videos directly in %s are in no class folder: left out", loose, root)
    return found


def parse_class_folders(
    video_root: str | os.PathLike, test_fraction: float, seed: int
) -> list[VideoEntry]:
    """Entries of a folder of class folders without a split file: every video found, its
    class the folder's name (labels: the names sorted), test or train by `split_by_hash`
    within its class (a stratified split)."""
    classes = find_class_videos(video_root)
    if not classes:
        raise SplitFileError(
            f"{video_root}: no split file and no class folders holding videos (one folder "
            f"per class, files ending {', '.join(sorted(VIDEO_EXTENSIONS))}): add them or "
            "a split file (split<N>.csv, or --train-list/--test-list)"
        )
    entries = []
    for label, (name, paths) in enumerate(sorted(classes.items())):
        test = split_by_hash(paths, test_fraction, seed)
        entries += [
            VideoEntry(path, label, name, "test" if path in test else "train") for path in paths
        ]
    return entries


def read_class_names_file(path: str | os.PathLike) -> dict[str, str]:
    """{number as the lists write it: class name} from a classInd-style file ("1 ApplyEyeMakeup"
    lines: the number as written) or a file of one name per line (numbered from 0, as
    MMAction2's label maps)."""
    lines = _lines(Path(path))
    pairs = [line.split(maxsplit=1) for line in lines]
    numbered = [len(p) == 2 and p[0].isdigit() for p in pairs]
    if all(numbered):
        names = {str(int(number)): name.strip() for number, name in pairs}
    elif not any(numbered):
        names = {str(k): line for k, line in enumerate(lines)}
    else:
        first = lines[numbered.index(not numbered[0])]
        raise SplitFileError(
            f"{path}: mixes 'N name' lines and plain names (first odd line {first!r}): "
            "use one form"
        )
    if len(set(names.values())) != len(names) or len(names) != len(lines):
        raise SplitFileError(f"{path}: a class number or name is listed twice")
    return names


def parse_list_files(
    train_list: str | os.PathLike,
    test_list: str | os.PathLike,
    class_names_file: str | os.PathLike | None = None,
) -> tuple[list[VideoEntry], list[str]]:
    """Entries and class names (by label) of MMAction2-style lists: "path label" per line,
    the path relative to the video root, the label a class name or a number of
    `class_names_file` (required then: a model carries its classes' names).

    Labels follow the names file's order when there is one, else the names sorted.
    """
    names_by_number = read_class_names_file(class_names_file) if class_names_file else None
    listed: list[tuple[str, str, Subset, Path, int]] = []
    for subset, listing in (("train", Path(train_list)), ("test", Path(test_list))):
        for number, line in enumerate(_lines(listing), 1):
            path, _, label = line.rpartition(" ")
            path, label = path.strip(), label.strip()
            if not path:
                raise SplitFileError(
                    f"{listing}, line {number}: {line!r} is not 'path label'"
                )
            listed.append((path, label, subset, listing, number))
    if names_by_number is None:
        index = next((item for item in listed if item[1].lstrip("-").isdigit()), None)
        if index is not None:
            raise SplitFileError(
                f"{index[3]}, line {index[4]}: label {index[1]!r} is a class index, and a model "
                "needs class names: give the names with --class-names FILE (data."
                "class_names_file: classInd-style 'N name' lines, or one name per line)"
            )
        names = sorted({label for _, label, *_ in listed})
    else:
        names = list(names_by_number.values())
    label_of = {name: k for k, name in enumerate(names)}
    entries, seen = [], {}
    for path, label, subset, listing, number in listed:
        name = names_by_number.get(label, label) if names_by_number else label
        if name not in label_of:
            raise SplitFileError(
                f"{listing}, line {number}: label {label!r} is not a class of "
                f"{class_names_file} (numbers {', '.join(list(names_by_number)[:3])}...; "
                "lists numbered from 0 need a names file of one name per line)"
            )
        if path in seen:
            raise SplitFileError(
                f"{listing}, line {number}: {path!r} is listed twice (also {seen[path]})"
            )
        seen[path] = f"{listing.name}, line {number}"
        entries.append(VideoEntry(path, label_of[name], name, subset))
    return entries, names


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
