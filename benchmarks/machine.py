"""Machine facts that every benchmark's JSON records, and the JSON written atomically; needs no
Ray (GPU boxes may lack it)."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


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
    or the new one, never half of one."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, target)
