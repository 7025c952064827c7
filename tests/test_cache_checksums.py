"""Feature-cache checksums: a corrupt file (same size, flipped bytes) gives bad clips naming
it, never wrong taps; a good one reads clean and is hashed once per process."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_data_features
from test_data_features import _rows

from data_shards.clip_spec import ClipSpec
from data_shards.config import DataConfig
from data_shards.datasets import build_datasets
from data_shards.errors import StaleCacheError
from data_shards.features import (
    INDEX_FILE,
    KEY_FILE,
    _save,
    build_feature_cache,
    cache_file,
    checksum_stats,
    forget_verified,
    scale_file,
)

# The tiny cache of tests/test_data_features.py (2 classes x 3 videos, module-scoped, so
# built once for this module too); pytest finds a fixture by its name here.
cached = test_data_features.cached
Cached = tuple[DataConfig, ClipSpec]
MISMATCH = "checksum mismatch"


def _copy(data_cfg: DataConfig, to: Path) -> DataConfig:
    """A copy of the cache at `to` (the module's cache stays good), and the config reading it."""
    shutil.copytree(data_cfg.feature_cache, to)
    return data_cfg.model_copy(update={"feature_cache": str(to)})


def _flip(path: Path, at: int = -100, count: int = 4) -> None:
    """Invert `count` bytes of the file from byte `at` on (negative: from its end): the size,
    the header and the shape stay what they were, so only the checksum can tell."""
    data = bytearray(path.read_bytes())
    start = at % len(data)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def _train_video(data_cfg: DataConfig, clip_spec: ClipSpec) -> int:
    return int(_rows(data_cfg, clip_spec, "train")[0]["video_id"])


def _all_rows(data_cfg: DataConfig, clip_spec: ClipSpec) -> list[dict]:
    return _rows(data_cfg, clip_spec, "train") + _rows(data_cfg, clip_spec, "val")


def _mismatch_warnings(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and MISMATCH in r.getMessage()
            and name in r.getMessage()]


def test_a_good_cache_reads_clean_and_each_file_is_hashed_once(cached: Cached) -> None:
    """Every file is hashed the first time this process opens it, and never again: the
    train clips of a video span several batches (and a second epoch) but one hash."""
    data_cfg, clip_spec = cached
    forget_verified()  # as a fresh process
    before = checksum_stats()
    rows = _rows(data_cfg, clip_spec, "train")
    first = checksum_stats()
    videos = {int(r["video_id"]) for r in rows}
    assert rows and all(r["ok"] and r["error"] == "" for r in rows)
    assert len(rows) > len(videos)  # some file is read for more than one clip
    assert first["files_hashed"] - before["files_hashed"] == len(videos)
    assert first["bytes_hashed"] - before["bytes_hashed"] == sum(
        cache_file(data_cfg.feature_cache, v).stat().st_size for v in videos
    )
    assert first["mismatches"] == before["mismatches"]
    again = _rows(data_cfg, clip_spec, "train")
    assert len(again) == len(rows) and all(r["ok"] for r in again)
    assert checksum_stats()["files_hashed"] == first["files_hashed"]


@pytest.mark.parametrize("cache_read", ["worker", "stage"])
def test_a_cache_file_with_flipped_bytes_gives_bad_clips(
    cached: Cached, tmp_path: Path, caplog: pytest.LogCaptureFixture, cache_read: str
) -> None:
    """The same size, a valid header, 4 bytes inverted: that video's clips are bad clips
    naming the file and the fix, with zeros for taps; every other video's clips are good.
    The warning comes once for the file, however many batches read it."""
    data_cfg, clip_spec = cached
    victim_id = _train_video(data_cfg, clip_spec)
    flipped = _copy(data_cfg, tmp_path / "flipped").model_copy(update={"cache_read": cache_read})
    victim = cache_file(flipped.feature_cache, victim_id)
    size = victim.stat().st_size
    _flip(victim)
    assert victim.stat().st_size == size
    caplog.set_level(logging.WARNING, logger="data_shards.features")
    for _ in range(2):  # a second epoch: still bad clips (the mismatch is remembered too)
        rows = _all_rows(flipped, clip_spec)
        bad = [r for r in rows if not r["ok"]]
        assert bad and {int(r["video_id"]) for r in bad} == {victim_id}
        assert len(bad) == sum(int(r["video_id"]) == victim_id for r in rows)
        for r in bad:
            assert MISMATCH in r["error"] and victim.name in r["error"]
            assert "jlstm data features --rebuild" in r["error"]
            assert not r["taps_pool4"].any() and not r["taps_conv5_3"].any()
        assert all(r["error"] == "" for r in rows if r["ok"])
    if cache_read == "worker":  # read in this process: its log and its memo
        assert len(_mismatch_warnings(caplog, victim.name)) == 1


def test_a_flipped_scale_file_of_a_uint8_cache_gives_bad_clips(
    cached: Cached, tmp_path: Path
) -> None:
    """uint8 caches: the scale file has its own checksum (wrong scales are wrong taps)."""
    data_cfg, clip_spec = cached
    quantized = data_cfg.model_copy(
        update={"cache_dtype": "uint8", "feature_cache": str(tmp_path / "features8")}
    )
    build_feature_cache(quantized, clip_spec)
    index = pq.read_table(Path(quantized.feature_cache) / INDEX_FILE)
    assert index.schema.field("scale_checksum").type == pa.uint64()
    assert all(index["scale_checksum"].to_pylist())  # a checksum for every scale file
    victim_id = _train_video(quantized, clip_spec)
    victim = scale_file(quantized.feature_cache, victim_id)
    _flip(victim, at=-8)  # a float32 scale of the last tap
    rows = _rows(quantized, clip_spec, "train")
    bad = [r for r in rows if not r["ok"]]
    assert bad and {int(r["video_id"]) for r in bad} == {victim_id}
    assert all(MISMATCH in r["error"] and victim.name in r["error"] for r in bad)


def test_a_rebuilt_file_and_index_are_verified_anew(cached: Cached, tmp_path: Path) -> None:
    """The memo holds as long as the file and the index are the same ones: a file a rebuild
    renamed in, with its new checksum in a new index, reads clean (not checked against the
    old checksum), and is hashed again."""
    data_cfg, clip_spec = cached
    copy = _copy(data_cfg, tmp_path / "rebuilt")
    assert all(r["ok"] for r in _rows(copy, clip_spec, "train"))  # verified, remembered
    victim_id = _train_video(copy, clip_spec)
    victim = cache_file(copy.feature_cache, victim_id)
    # What a rebuild with other weights does: new bytes under the same name, then the index.
    _, checksum = _save(victim, np.load(victim) + np.float16(1))
    index_path = Path(copy.feature_cache) / INDEX_FILE
    index = pq.read_table(index_path)
    checksums = index["checksum"].to_pylist()
    checksums[index["video_id"].to_pylist().index(victim_id)] = checksum
    index = index.set_column(
        index.schema.get_field_index("checksum"), "checksum", pa.array(checksums, pa.uint64())
    )
    pq.write_table(index, tmp_path / "index.partial")
    (tmp_path / "index.partial").rename(index_path)
    hashed = checksum_stats()["files_hashed"]
    rows = _rows(copy, clip_spec, "train")
    assert rows and all(r["ok"] for r in rows)
    assert checksum_stats()["files_hashed"] == hashed + 1  # only the replaced file


def test_a_cache_of_the_format_before_checksums_is_refused(cached: Cached, tmp_path: Path) -> None:
    """A format-3 cache has no checksums to verify: stale, so `jlstm data features` rebuilds
    it once."""
    data_cfg, clip_spec = cached
    old = _copy(data_cfg, tmp_path / "format3")
    key_path = Path(old.feature_cache) / KEY_FILE
    key_path.write_text(json.dumps({**json.loads(key_path.read_text()), "format": 3}))
    with pytest.raises(StaleCacheError, match="format: cache has 3, config wants 4"):
        build_datasets(old, clip_spec)
