"""Index: parallel probing on Ray, quarantine with reasons, re-runs that skip probed videos."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_shards.config import DataConfig
from data_shards.datasets import build_datasets
from data_shards.errors import BadDataError
from data_shards.index import index_videos
from data_shards.splits import class_names
from data_shards.synth import write_broken_videos, write_index_video

GOOD_FRAMES = {"good0.avi": 30, "good1.avi": 41, "good2.avi": 7}
# Kind of broken file -> the reason's first word in the quarantine table.
EXPECTED_REASONS = {
    "empty": "empty",
    "truncated": "truncated",
    "random_bytes": "unreadable",
    "text": "unreadable",
    "zero_frames": "zero_frames",
    "mp4_cut": "unreadable",
    "hang": "timeout",
    "missing": "missing",
}


@pytest.fixture
def folder_dataset(tmp_path: Path) -> DataConfig:
    """A folder dataset listing good videos, every broken kind, a FIFO (hangs), a missing file."""
    videos = tmp_path / "videos"
    rows = []
    for name, frames in GOOD_FRAMES.items():
        write_index_video(videos / "good" / name, frames, size=32)
        rows.append(f"good/{name},good,train")
    for kind, path in write_broken_videos(videos / "bad").items():
        path.rename(videos / "bad" / f"{kind}{path.suffix}")
        rows.append(f"bad/{kind}{path.suffix},bad,test")
    os.mkfifo(videos / "bad" / "hang.avi")  # opening it blocks forever: a hung decoder
    rows += ["bad/hang.avi,bad,test", "bad/missing.avi,bad,test"]
    (tmp_path / "split1.csv").write_text("path,label,subset\n" + "\n".join(rows) + "\n")
    return DataConfig(dataset="folder", root=str(tmp_path), probe_timeout_s=3)


def test_index_quarantines_every_broken_kind_and_keeps_the_good(
    ray_cluster: None, folder_dataset: DataConfig
) -> None:
    result = index_videos(folder_dataset, show_progress=False)
    manifest = pq.read_table(result.manifest_path)
    quarantine = pq.read_table(result.quarantine_path)
    assert result.num_listed == len(GOOD_FRAMES) + len(EXPECTED_REASONS)
    got = dict(
        zip(manifest["relative_path"].to_pylist(), manifest["num_frames"].to_pylist(), strict=True)
    )
    assert got == {f"good/{name}": n for name, n in GOOD_FRAMES.items()}
    assert set(manifest["width"].to_pylist()) == {32}
    assert set(manifest["fps"].to_pylist()) == {25.0}
    reasons = {
        Path(p).stem: r
        for p, r in zip(
            quarantine["video_path"].to_pylist(), quarantine["reason"].to_pylist(), strict=True
        )
    }
    assert {kind: reasons[kind].split(":")[0] for kind in reasons} == EXPECTED_REASONS
    assert all(len(r) > len(r.split(":")[0]) + 2 for r in reasons.values())  # a detail follows
    assert class_names(result.manifest_path) == ["bad", "good"]  # kept though all "bad" failed

    # A second run probes only what is not in the manifest unchanged.
    again = index_videos(folder_dataset, show_progress=False)
    assert (again.num_reused, again.num_ok) == (len(GOOD_FRAMES), len(GOOD_FRAMES))
    changed = Path(folder_dataset.root) / "videos" / "good" / "good1.avi"
    write_index_video(changed, 12, size=32)
    third = index_videos(folder_dataset, show_progress=False)
    assert third.num_reused == len(GOOD_FRAMES) - 1
    frames = pq.read_table(third.manifest_path).to_pydict()
    assert (
        dict(zip(frames["relative_path"], frames["num_frames"], strict=True))["good/good1.avi"]
        == 12
    )

    # 11 of 14 listed videos are quarantined: far past max_bad_fraction, so no run starts.
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        build_datasets(folder_dataset, clip_spec=None)
