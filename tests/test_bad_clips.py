"""Clips that fail during training and evaluation are accounted for, never silently dropped.

Videos are broken after indexing (their bytes overwritten), so the index has them and the
decode path meets the failure in the middle of a run: a few failures are reported as an
MLflow artifact and the run finishes; most clips failing stops the run with one line.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from tiny_run import tiny_config

from data_shards.index import ensure_index
from data_shards.synth import synthesize_dataset
from jlstm import cli
from orchestration import tracking
from orchestration.config import validate_config
from orchestration.trainer import train_split

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
    return raw, pq.read_table(manifest).to_pylist()


def _break(video: dict) -> None:
    Path(video["video_path"]).write_bytes(b"this is no longer a video" * 64)


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
        tracking.registered_model_name("ucf101"), result.model_version
    )
    assert version.tags[tracking.TEST_VIDEOS_TAG] == str(test_videos - 1)


def test_a_run_whose_clips_mostly_fail_stops_with_one_line(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw, videos = _indexed(tmp_path / "videos", tmp_path / "ray", "mostly-broken")
    for video in videos:
        if video["subset"] == "train":
            _break(video)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert cli.main(["train", "--config", str(config)]) == 4

    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert "Traceback" not in err and message.startswith("jlstm: data error: epoch 1:")
    assert "100.0%" in message and "data.max_bad_fraction = 0.05" in message
    assert "bad_clips/epoch_001.csv" in message
    runs = MlflowClient().search_runs(
        [tracking.get_or_create_experiment(raw["tracking"]["experiment"])]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["train_bad_clip_fraction"] == 1.0


def test_a_run_that_can_score_no_test_clip_stops_with_one_line(
    ray_cluster: None, sqlite_tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every test video broken after indexing: evaluation scores nothing, and the user gets
    the one line and exit 4 naming the first failed clip (once a traceback from inside
    the evaluation), with the MLflow run FAILED."""
    raw, videos = _indexed(tmp_path / "videos", tmp_path / "ray", "no-test-clip")
    for video in videos:
        if video["subset"] == "test":
            _break(video)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))

    assert cli.main(["train", "--config", str(config)]) == 4

    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert "Traceback" not in err and message.startswith("jlstm: data error: epoch 1:")
    assert "none of the test clips could be scored" in message
    assert "bad_clips/epoch_001.csv" in message
    runs = MlflowClient().search_runs(
        [tracking.get_or_create_experiment(raw["tracking"]["experiment"])]
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["val_videos_scored"] == 0
