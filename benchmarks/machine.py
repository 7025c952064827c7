"""The set-up every benchmark shares: the machine facts and common keys its JSON records, the
JSON written atomically, its work folder, and (for the scripts that train on their own
synthetic videos) their common flags, config, videos and Ray start.

Importing it needs torch alone (GPU boxes may lack Ray: `gpu_step.py --no-pipeline` and
`gpu_suite.py` import it there), so Ray, the data side and the config are imported inside
the functions that use them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from orchestration.config import JlstmConfig

WORKDIR_HELP = "default: a temp dir, removed at the end"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """`data` as indented JSON at `path`, atomically: written beside it, then renamed over
    it, so a process killed mid-write (a GPU call's stage at its cap) leaves the old file
    or the new one, never half of one. Its folder is made first: --out may name a new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, target)


def result_head(
    benchmark: str,
    args: argparse.Namespace,
    load_start: list[float],
    total_s: float,
    machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The keys every benchmark's JSON starts with: its name, the machine (`machine`: facts
    of its own added, such as the device), the load at the start and now, its seconds and
    its arguments (paths as strings, so the JSON can hold them)."""
    return {
        "benchmark": benchmark,
        "machine": machine_info() | (machine or {}),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "total_s": round(total_s, 1),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def work_folder(
    args: argparse.Namespace, prefix: str, attr: str = "workdir", create: bool = False
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The benchmark's work folder, resolved: `args.<attr>` when given, else a new temp dir,
    returned too so that the caller removes it when it is done (each removes it at a moment
    of its own). The temp dir's path is written back into `args`, so the JSON's `args` names
    the folder the run used. `create`: make a given folder that is not there yet."""
    tmp = None
    if getattr(args, attr) is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        setattr(args, attr, Path(tmp.name))
    folder = getattr(args, attr).resolve()
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder, tmp


# ---- the scripts that train on their own synthetic videos (demo sizes) -------------------


def add_out_args(parser: argparse.ArgumentParser, out: str, config: Path | None = None) -> None:
    """--out and --workdir; with a default `config`, --config and --set too."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--workdir", type=Path, help=WORKDIR_HELP)
    if config is not None:
        parser.add_argument("--config", type=Path, default=config)
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="config override, as `jlstm train --set` (repeatable)")


def add_video_args(
    parser: argparse.ArgumentParser, videos_per_class: int, help: str | None = None
) -> None:
    """The synthetic videos' flags, read by `synthesize_videos`."""
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--videos-per-class", type=int, default=videos_per_class, help=help)
    parser.add_argument("--num-frames", type=int, default=48)


def cached_config(args: argparse.Namespace, workdir: Path, *overrides: str) -> JlstmConfig:
    """--config with its data, feature cache and Ray Train storage in `workdir`, the cache
    used, then `overrides`, then --set (last, so that the command line wins)."""
    from orchestration.config import load_config

    return load_config(args.config, [
        f"data.root={workdir / 'data'}",
        f"data.feature_cache={workdir / 'features'}",
        "data.use_feature_cache=true",
        f"cluster.storage_path={workdir / 'ray'}",
        *overrides,
        *args.set,
    ])


def synthesize_videos(base: JlstmConfig, args: argparse.Namespace) -> Path:
    """`add_video_args`' videos in the UCF101 layout under base.data.root, indexed; returns
    the manifest's path. Frames at 4 / 3 of the model's S, as `jlstm demo` writes them."""
    from data_shards.index import ensure_index
    from data_shards.synth import synthesize_dataset

    synthesize_dataset(
        base.data.root, layout="ucf101", classes=args.classes,
        videos_per_class=args.videos_per_class, seed=base.data.seed,
        frame_size=base.model["frame_size"] * 4 // 3, num_frames=args.num_frames,
    )
    return ensure_index(base.data)


def start_ray() -> None:
    """This machine's Ray (`init_ray`: a running cluster, else a local one), quiet: no
    progress bars and only Ray Data's warnings, so the benchmark's own lines stay readable."""
    import ray.data

    from data_shards.cluster import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
