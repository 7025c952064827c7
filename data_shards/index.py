"""Index: list a split's videos, probe each in parallel on Ray, write manifest + quarantine.

Probing runs in a pool of Ray actors. decord can hang on a bad file (or block forever on
a FIFO), so every probe has a hard deadline: an actor past it is killed (`ray.kill`) and
replaced, and the video is quarantined with reason "timeout".
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from data_shards.config import DataConfig
from data_shards.manifest import relative_to_root, video_file
from data_shards.splits import (
    CLASS_NAMES_KEY,
    VideoEntry,
    parse_class_folders,
    parse_folder_csv,
    parse_hmdb51_splits,
    parse_list_files,
    parse_ucf101_splits,
    ucf101_class_names,
)

PUBLISHER_FOLDERS = {"ucf101": "UCF-101", "hmdb51": "hmdb51", "folder": "videos"}
SPLITS_FOLDERS = {"ucf101": "ucfTrainTestlist", "hmdb51": "testTrainMulti_7030_splits"}
# A file whose readable frames fall short of its header's count by more than this is cut.
TRUNCATION_TOLERANCE = 0.02

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.int64()),
        # Relative to data.root (posix): decode workers join it with the run's data.root,
        # so the dataset can move (manifest.video_file).
        ("video_path", pa.string()),
        ("relative_path", pa.string()),  # as the split files list it (under the video root)
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("subset", pa.string()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("size", pa.int64()),
        ("mtime", pa.int64()),  # ns; only for re-indexing (a copy changes it: not in keys)
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("video_id", pa.int64()),
        ("video_path", pa.string()),  # relative to data.root, as the manifest's
        ("label", pa.int64()),
        ("subset", pa.string()),
        ("reason", pa.string()),
    ]
)
PROBE_COLUMNS = ("num_frames", "fps", "width", "height")


@dataclass(frozen=True)
class IndexResult:
    """What `index_videos` wrote and counted."""

    manifest_path: Path
    quarantine_path: Path
    num_listed: int
    num_ok: int
    num_quarantined: int
    num_probed: int  # probed this run
    num_reused: int  # unchanged since the last run (same path, size, mtime): not probed

    def summary(self) -> str:
        """A few lines for the CLI."""
        return (
            f"listed {self.num_listed} videos: {self.num_ok} ok, "
            f"{self.num_quarantined} quarantined; probed {self.num_probed}, "
            f"reused {self.num_reused} from the last index\n"
            f"manifest:   {self.manifest_path}\nquarantine: {self.quarantine_path}"
        )


def resolve_layout(data_cfg: DataConfig) -> tuple[Path, Path]:
    """(video root, splits dir) for a root as published or holding the videos under videos/.

    The video root is `<root>/videos`, else `<root>/<UCF-101|hmdb51>`, else `<root>`. The
    splits dir, unless given, is `ucfTrainTestlist`/`testTrainMulti_7030_splits` inside
    the root or beside the video root; for "folder" it is the root (split<N>.csv).
    """
    root = Path(data_cfg.root)
    candidates = [root / "videos", root / PUBLISHER_FOLDERS[data_cfg.dataset]]
    video_root = next((c for c in candidates if c.is_dir()), root)
    if data_cfg.splits_dir:
        return video_root, Path(data_cfg.splits_dir)
    if data_cfg.dataset == "folder":
        return video_root, root
    name = SPLITS_FOLDERS[data_cfg.dataset]
    found = [d for d in (root / name, video_root.parent / name) if d.is_dir()]
    if not found:
        raise FileNotFoundError(f"no {name}/ in {root} or {video_root.parent}: set splits_dir")
    return video_root, found[0]


def list_entries(data_cfg: DataConfig) -> tuple[list[VideoEntry], list[str]]:
    """The split's entries sorted by path (their order gives video_id), and class names.

    A folder dataset reads, in this order: the list files (`train_list`, `test_list`,
    relative to the splits dir), `split<N>.csv` in the splits dir, else (no splits dir
    given) its class folders, split by a hash of each path (`test_fraction`, `split_seed`).
    """
    video_root, splits_dir = resolve_layout(data_cfg)
    names: list[str] | None = None
    if data_cfg.dataset == "ucf101":
        entries = parse_ucf101_splits(splits_dir, data_cfg.split)
        names = ucf101_class_names(splits_dir)
    elif data_cfg.dataset == "hmdb51":
        entries = parse_hmdb51_splits(splits_dir, data_cfg.split)
    elif data_cfg.train_list and data_cfg.test_list:
        class_file = data_cfg.class_names_file
        entries, names = parse_list_files(
            splits_dir / data_cfg.train_list,
            splits_dir / data_cfg.test_list,
            splits_dir / class_file if class_file else None,
        )
    elif (splits_dir / f"split{data_cfg.split}.csv").is_file() or data_cfg.splits_dir:
        entries = parse_folder_csv(splits_dir / f"split{data_cfg.split}.csv")
    else:
        entries = parse_class_folders(video_root, data_cfg.test_fraction, data_cfg.split_seed)
    if names is None:
        names = [n for _, n in sorted({(e.label, e.label_name) for e in entries})]
    return sorted(entries, key=lambda e: e.path), names


class ProbeError(Exception):
    """A video that cannot be used; the message starts with the kind of failure."""


def _decord_message(error: Exception) -> str:
    """decord's message without its "[hh:mm:ss] src/file.cc:123: " prefix, shortened."""
    return re.sub(r"^\[[\d:]+\] [^ ]+:\d+: ", "", str(error).strip())[:300]


def probe_video(path: str) -> dict[str, float | int]:
    """num_frames, fps, width, height of a video decord can read to its last frame.

    Raises ProbeError("<kind>: <detail>") with kind unreadable, zero_frames, truncated or
    decode_error. The container header's frame count (PyAV) catches files cut short that
    decord would read as shorter videos.
    """
    import av
    import decord

    try:
        with av.open(path) as container:
            streams = container.streams.video
            header_frames = streams[0].frames if streams else 0
            no_frames = bool(streams) and header_frames == 0 and streams[0].duration == 0
    except av.FFmpegError as e:
        raise ProbeError(f"unreadable: {e}") from e
    if not streams:
        raise ProbeError("unreadable: no video stream")
    if no_frames:
        raise ProbeError("zero_frames: the container holds no frames")
    try:
        reader = decord.VideoReader(path, num_threads=1)
    except Exception as e:  # decord raises RuntimeError and its own DECORDError
        raise ProbeError(f"unreadable: {_decord_message(e)}") from e
    num_frames = len(reader)
    if num_frames == 0:
        raise ProbeError("zero_frames: the video has no frames")
    if header_frames and num_frames < (1 - TRUNCATION_TOLERANCE) * header_frames - 1:
        raise ProbeError(
            f"truncated: the header lists {header_frames} frames, {num_frames} are readable"
        )
    try:
        last = reader[num_frames - 1].asnumpy()
    except Exception as e:
        raise ProbeError(f"decode_error: frame {num_frames - 1}: {_decord_message(e)}") from e
    return {
        "num_frames": num_frames,
        "fps": float(reader.get_avg_fps()),
        "width": int(last.shape[1]),
        "height": int(last.shape[0]),
    }


@ray.remote(num_cpus=1)
class _Prober:
    """Probes one video per call; killed from outside when a call overruns its deadline."""

    def ready(self) -> bool:
        return True

    def probe(self, path: str) -> dict | str:
        """The probe dict, or the failure reason as a string (never raises)."""
        try:
            return probe_video(path)
        except ProbeError as e:
            return str(e)
        except Exception as e:
            return f"unreadable: {type(e).__name__}: {e}"


def probe_all(
    paths: list[str], timeout_s: float, show_progress: bool = True
) -> dict[str, dict | str]:
    """path -> probe dict or failure reason, from a pool of actors (one per cluster CPU).

    A call that overruns `timeout_s` (counted from when its actor was free) is killed.
    """
    if not paths:
        return {}
    size = max(1, min(len(paths), int(ray.cluster_resources().get("CPU", 1))))
    starting = {}
    for _ in range(size):
        actor = _Prober.remote()
        starting[actor.ready.remote()] = actor
    idle: list = []
    running: dict = {}  # ref -> (actor, path, deadline)
    queue = deque(paths)
    results: dict[str, dict | str] = {}
    bar = tqdm(total=len(paths), desc="probe videos", unit="video", disable=not show_progress)
    try:
        while queue or running:
            while idle and queue:
                actor, path = idle.pop(), queue.popleft()
                running[actor.probe.remote(path)] = (actor, path, time.monotonic() + timeout_s)
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=0.5)
            for ref in done:
                if ref in starting:  # an actor has started; its deadlines count from now
                    idle.append(starting.pop(ref))
                    continue
                actor, path, _ = running.pop(ref)
                results[path] = ray.get(ref)
                idle.append(actor)
                bar.update()
            now = time.monotonic()
            for ref, (actor, path, deadline) in list(running.items()):
                if now > deadline:
                    ray.kill(actor)  # the only way to stop a hung decoder
                    del running[ref]
                    results[path] = f"timeout: no answer within {timeout_s:g} s"
                    bar.update()
                    fresh = _Prober.remote()
                    starting[fresh.ready.remote()] = fresh
    finally:
        bar.close()
        for actor in [*idle, *starting.values()] + [a for a, _, _ in running.values()]:
            ray.kill(actor)
    return results


def _previous_probes(manifest: Path, root: str) -> dict[tuple[str, int, int], dict]:
    """(path, size, mtime) -> probe columns from an earlier manifest, if there is one."""
    if not manifest.is_file():
        return {}
    rows = relative_to_root(pq.read_table(manifest), root).to_pylist()
    return {(r["video_path"], r["size"], r["mtime"]): r for r in rows}


def root_relative(data_cfg: DataConfig, video_root: Path, listed: str) -> str:
    """The manifest's `video_path` of a video the split lists as `listed` (relative to the
    video root): relative to `data.root`, posix. Not resolved: a symlinked class folder
    stays inside the root, and moves with it."""
    prefix = os.path.relpath(video_root, data_cfg.root)
    return posixpath.normpath(Path(prefix, listed).as_posix())


def index_videos(
    data_cfg: DataConfig, out: str | os.PathLike | None = None, show_progress: bool = True
) -> IndexResult:
    """Probe every video of the configured split and write the manifest and quarantine.

    `out` overrides `data_cfg.manifest_path()`; the quarantine goes beside it. Videos in
    an earlier manifest at the same path with the same size and mtime are not probed again.
    Paths are written relative to `data.root` (`root_relative`).
    """
    if out:
        data_cfg = data_cfg.model_copy(update={"manifest": str(out)})
    manifest_path, quarantine_path = data_cfg.manifest_path(), data_cfg.quarantine_path()
    video_root, _ = resolve_layout(data_cfg)
    entries, names = list_entries(data_cfg)
    previous = _previous_probes(manifest_path, data_cfg.root)

    rows, bad, to_probe = [], [], []
    for video_id, entry in enumerate(entries):
        relative = root_relative(data_cfg, video_root, entry.path)
        path = video_file(data_cfg.root, relative)
        row = {
            "video_id": video_id,
            "video_path": relative,
            "relative_path": entry.path,
            "label": entry.label,
            "label_name": entry.label_name,
            "subset": entry.subset,
        }
        try:
            stat = os.stat(path)
        except OSError as e:
            bad.append({**row, "reason": f"missing: {e.strerror}"})
            continue
        row.update(size=stat.st_size, mtime=stat.st_mtime_ns)
        if stat.st_size == 0 and S_ISREG(stat.st_mode):  # a FIFO or device goes to the probe
            bad.append({**row, "reason": "empty: the file has 0 bytes"})
        elif (relative, stat.st_size, stat.st_mtime_ns) in previous:
            old = previous[(relative, stat.st_size, stat.st_mtime_ns)]
            rows.append({**row, **{k: old[k] for k in PROBE_COLUMNS}})
        else:
            to_probe.append(row)

    files = [video_file(data_cfg.root, r["video_path"]) for r in to_probe]
    probes = probe_all(files, data_cfg.probe_timeout_s, show_progress)
    num_reused = len(rows)
    for row, file in zip(to_probe, files, strict=True):
        result = probes[file]
        if isinstance(result, str):
            bad.append({**row, "reason": result})
        else:
            rows.append({**row, **result})

    metadata = {CLASS_NAMES_KEY: json.dumps(names).encode()}
    manifest = pa.Table.from_pylist(
        sorted(rows, key=lambda r: r["video_id"]), schema=MANIFEST_SCHEMA.with_metadata(metadata)
    )
    quarantine = pa.Table.from_pylist(
        [{k: r[k] for k in QUARANTINE_SCHEMA.names} for r in bad], schema=QUARANTINE_SCHEMA
    )
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a reader (another run, another node)
    # sees the old table or the new one, never half of one.
    for table, path in ((quarantine, quarantine_path), (manifest, manifest_path)):
        partial = path.with_name(path.name + ".partial")
        pq.write_table(table, partial)
        partial.rename(path)
    return IndexResult(
        manifest_path,
        quarantine_path,
        len(entries),
        manifest.num_rows,
        quarantine.num_rows,
        len(to_probe),
        num_reused,
    )


def ensure_index(data_cfg: DataConfig) -> Path:
    """The manifest path, indexing the split first if the manifest does not exist yet."""
    path = data_cfg.manifest_path()
    if path.is_file() and data_cfg.quarantine_path().is_file():
        return path
    return index_videos(data_cfg).manifest_path
