"""Clips that fail during training and evaluation are accounted for, never silently dropped.

A video swapped for a FIFO after indexing hangs the decoder (opening it blocks forever in
native code): the run and the cache build each report it as a "timeout" and end within
their normal time (the same run without the FIFO, measured in the same test) plus
2 x `data.decode_timeout_s`.

Videos are broken after indexing (their bytes overwritten), so the index has them and the
decode path meets the failure in the middle of a run: a few failures are reported as an
MLflow artifact and the run finishes; most clips failing stops the run with one line. The
cached-taps path the same way (its files cut after the cache's key was checked), and once
right: a run from a working directory with relative paths reads every cached clip (Ray
Train runs its workers in folders of their own; relative paths once failed every clip).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from tiny_run import tiny_config

from data_shards.features import build_feature_cache
from data_shards.index import ensure_index
from data_shards.synth import synthesize_dataset
from jlstm import cli
from orchestration import registry, tracking
from orchestration.config import load_config, validate_config
from orchestration.run import train_split

pytestmark = pytest.mark.slow  # each test trains a tiny model on local Ray (1-2 min)


@pytest.fixture
def sqlite_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _indexed(root: Path, storage: Path, run_name: str, **sections: dict) -> tuple[dict, list]:
    """A tiny synthetic dataset, indexed; its raw config and manifest rows."""
    synthesize_dataset(
        root, layout="ucf101", classes=2, videos_per_class=6, seed=5, frame_size=64, num_frames=16
    )
    raw = tiny_config(root, storage, run_name, train={"epochs": 1}, **sections)
    manifest = ensure_index(validate_config(raw).data)
    # The manifest's paths are relative to the dataset root: the rows carry their file.
    return raw, [
        {**row, "file": root / row["video_path"]} for row in pq.read_table(manifest).to_pylist()
    ]


def _break(video: dict) -> None:
    Path(video["file"]).write_bytes(b"this is no longer a video" * 64)


# Long enough that a hang's cost stands out of the run-to-run noise of a tiny run.
HANG_TIMEOUT_S = 8.0


def _swap_for_fifo(video: dict) -> None:
    """Replace the video's file by a FIFO: an open blocks until a writer comes (never)."""
    path = Path(video["file"])
    path.unlink()
    os.mkfifo(path)


def test_a_video_that_hangs_the_decoder_is_a_timeout_and_the_run_ends_in_time(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path
) -> None:
    """The normal run first: the first run of a session also starts Ray's worker processes,
    which would count against the run that meets the FIFO."""
    raw, videos = _indexed(
        tmp_path / "videos", tmp_path / "ray", "normal",
        data={"decode_timeout_s": HANG_TIMEOUT_S, "max_bad_fraction": 0.5},
    )
    client = MlflowClient(sqlite_tracking)  # not the global URI an earlier module may have left
    started = time.monotonic()
    normal_run = train_split(validate_config(raw))
    normal = time.monotonic() - started
    assert client.get_run(normal_run.run_id).data.metrics["train_bad_clips"] == 0

    hanging = next(v for v in videos if v["subset"] == "train")
    _swap_for_fifo(hanging)
    started = time.monotonic()
    result = train_split(validate_config({**raw, "run_name": "fifo"}))
    with_hang = time.monotonic() - started

    assert client.get_run(result.run_id).info.status == "FINISHED"
    local = client.download_artifacts(result.run_id, "bad_clips/epoch_001.csv", str(tmp_path))
    rows = pacsv.read_csv(local).to_pylist()
    assert rows and {r["video_id"] for r in rows} == {hanging["video_id"]}
    assert all("timeout" in r["error"] for r in rows), rows
    print(f"normal run {normal:.1f} s, with the FIFO {with_hang:.1f} s")
    assert with_hang <= normal + 2 * HANG_TIMEOUT_S, (with_hang, normal)


def test_a_cache_build_that_meets_a_hanging_video_reports_it_and_ends_in_time(
    ray_cluster: None, tmp_path: Path
) -> None:
    raw, videos = _indexed(
        tmp_path / "videos", tmp_path / "ray", "fifo-cache",
        data={"feature_cache": str(tmp_path / "features"), "decode_timeout_s": HANG_TIMEOUT_S},
    )
    cfg = validate_config(raw)
    clip_spec = cfg.clip_spec(2)
    started = time.monotonic()
    assert build_feature_cache(cfg.data, clip_spec).num_failed == 0
    normal = time.monotonic() - started

    hanging = videos[0]
    _swap_for_fifo(hanging)
    started = time.monotonic()
    info = build_feature_cache(cfg.data, clip_spec, rebuild=True)
    with_hang = time.monotonic() - started
    assert info.num_failed == 1 and "timeout" in info.first_error
    assert Path(hanging["video_path"]).name in info.first_error
    assert with_hang <= normal + 2 * HANG_TIMEOUT_S, (with_hang, normal)


def test_a_video_broken_after_indexing_is_reported_and_the_run_finishes(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path
) -> None:
    raw, videos = _indexed(
        tmp_path / "videos", tmp_path / "ray", "one-broken", data={"max_bad_fraction": 0.5}
    )
    broken = {
        subset: next(v for v in videos if v["subset"] == subset) for subset in ("train", "test")
    }
    for video in broken.values():
        _break(video)
    test_videos = sum(v["subset"] == "test" for v in videos)

    result = train_split(validate_config(raw))

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    local = client.download_artifacts(result.run_id, "bad_clips/epoch_001.csv", str(tmp_path))
    rows = pacsv.read_csv(local).to_pylist()
    for subset, video in broken.items():
        failed = [r for r in rows if r["subset"] == subset]
        assert failed and {r["video_id"] for r in failed} == {video["video_id"]}
        assert all(Path(video["video_path"]).name in r["error"] for r in failed)
    assert run.data.metrics["train_bad_clips"] == sum(r["subset"] == "train" for r in rows)
    assert run.data.metrics["val_bad_clips"] == sum(r["subset"] == "test" for r in rows)
    assert run.data.metrics["val_videos_scored"] == test_videos - 1
    assert run.data.metrics["val_videos_unscored"] == 1
    version = client.get_model_version(
        registry.registered_model_name("ucf101"), result.model_version
    )
    assert version.tags[registry.TEST_VIDEOS_TAG] == str(test_videos - 1)


def _train_with_broken(
    tmp_path: Path, run_name: str, subset: str, capsys: pytest.CaptureFixture
) -> tuple[str, Run]:
    """`jlstm train` of a tiny set whose `subset` videos break after indexing: it must exit
    4 with one data-error line naming epoch 1 and the bad-clips artifact, its one MLflow
    run FAILED. Returns that line and the run."""
    raw, videos = _indexed(tmp_path / "videos", tmp_path / "ray", run_name)
    for video in videos:
        if video["subset"] == subset:
            _break(video)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert cli.main(["train", "--config", str(config)]) == 4

    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert "Traceback" not in err and message.startswith("jlstm: data error: epoch 1:")
    assert "bad_clips/epoch_001.csv" in message
    runs = MlflowClient().search_runs(
        [tracking.get_or_create_experiment(raw["tracking"]["experiment"])]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    return message, runs[0]


def test_a_run_whose_clips_mostly_fail_stops_with_one_line(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    message, run = _train_with_broken(tmp_path, "mostly-broken", "train", capsys)
    assert "100.0%" in message and "data.max_bad_fraction = 0.05" in message
    assert run.data.metrics["train_bad_clip_fraction"] == 1.0


def test_a_run_that_can_score_no_test_clip_stops_with_one_line(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every test video broken after indexing: evaluation scores nothing, and the user gets
    the one line and exit 4 naming the first failed clip (once a traceback from inside
    the evaluation), with the MLflow run FAILED."""
    message, run = _train_with_broken(tmp_path, "no-test-clip", "test", capsys)
    assert "none of the test clips could be scored" in message
    assert run.data.metrics["val_videos_scored"] == 0


def _cached_run(folder: Path, run_name: str, cache: str) -> Path:
    """In `folder`: a tiny synthetic dataset, indexed, its taps cached, and a config that
    names everything relative to `folder` (`videos`, `<cache>`, `ray`); its path."""
    synthesize_dataset(
        folder / "videos", layout="ucf101", classes=2, videos_per_class=6, seed=5,
        frame_size=64, num_frames=16,
    )
    raw = tiny_config(
        Path("videos"), Path("ray"), run_name, train={"epochs": 1},
        data={"feature_cache": cache, "use_feature_cache": True},
    )
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    ensure_index(cfg.data)
    build_feature_cache(cfg.data, cfg.clip_spec(2))
    return config


def test_a_run_from_relative_paths_reads_every_cached_clip(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: the run reads its manifest and quarantine tables once each (`RunData`)."""
    monkeypatch.chdir(tmp_path)
    config = _cached_run(tmp_path, "relative", "features")
    reads: list[str] = []
    read_table = pq.read_table

    def counted(source: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(Path(source).name)
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counted)
    assert cli.main(["train", "--config", config.name]) == 0
    assert reads.count("manifest_split1.parquet") == 1, reads
    assert reads.count("manifest_split1.quarantine.parquet") == 1, reads

    (run,) = MlflowClient().search_runs([tracking.get_or_create_experiment("test-train")])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert metrics["train_bad_clips"] == 0 and metrics["val_bad_clips"] == 0
    assert metrics["val_videos_unscored"] == 0
    assert metrics["val_worker_clips_min"] > 0  # both workers scored test clips
    assert list((tmp_path / "ray" / "relative").glob("checkpoint_*"))


def test_cached_taps_cut_after_the_check_stop_the_run_with_one_line(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The cache's key matches (preflight passes), but every video's taps are cut short:
    each clip fails to read, and the run ends in one line and exit 4, FAILED in MLflow,
    before evaluating a model trained on nothing."""
    monkeypatch.chdir(tmp_path)
    config = _cached_run(tmp_path, "cut-cache", "features")
    taps = [p for p in (tmp_path / "features").rglob("*.npy")]
    assert taps
    for path in taps:
        path.write_bytes(path.read_bytes()[:64])

    assert cli.main(["train", "--config", config.name]) == 4

    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert "Traceback" not in err and message.startswith("jlstm: data error: epoch 1:")
    assert "100.0%" in message and "bad_clips/epoch_001.csv" in message
    (run,) = MlflowClient().search_runs([tracking.get_or_create_experiment("test-train")])
    assert run.info.status == "FAILED"
    assert "val_video_top1_vote" not in run.data.metrics  # evaluation never ran
