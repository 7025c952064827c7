"""`orchestration.run.Run`: the order of a run's life, with fake parts (no Ray, no trainer)
and a real SQLite MLflow store, in seconds. The real parts run in the slow tests
(test_train, test_tune, test_reproduce)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray.train
from mlflow.tracking import MlflowClient
from tiny_run import tiny_config

from data_shards.errors import BadDataError
from data_shards.run_data import RunData
from orchestration import tracking
from orchestration.checkpoint import TrainState
from orchestration.config import JlstmConfig, validate_config
from orchestration.driver import PreparedData
from orchestration.metrics import (
    TRAIN_BAD_CLIPS,
    TRAIN_BAD_FRACTION,
    VAL_BAD_CLIPS,
    VAL_VIDEOS_SCORED,
)
from orchestration.run import Run, RunParts, SplitResult, Trained

GOOD = {"epoch": 1, TRAIN_BAD_FRACTION: 0.0, TRAIN_BAD_CLIPS: 0, VAL_VIDEOS_SCORED: 2,
        "train_loss": 0.5}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


@pytest.fixture
def cfg(tmp_path: Path) -> JlstmConfig:
    (tmp_path / "videos").mkdir()
    return validate_config(
        tiny_config(tmp_path / "videos", tmp_path / "ray", "ordered", train={"epochs": 1})
    )


def run_data() -> RunData:
    manifest = pa.table({"video_id": [0, 1], "subset": ["train", "test"], "label": [0, 1]})
    return RunData(Path("manifest.parquet"), manifest, ["a", "b"], "digest-1",
                   pa.table({"video_path": pa.array([], pa.string())}))


@dataclass
class FakeResult:
    checkpoint: ray.train.Checkpoint | None
    metrics: dict[str, Any]


class Recorder:
    """Fake parts that write down, in order, which part the run called."""

    def __init__(self, tmp_path: Path, metrics: dict[str, Any], checkpoint: bool = True) -> None:
        self.calls: list[str] = []
        self.metrics = metrics
        self.checkpoint_dir = tmp_path / "checkpoint" if checkpoint else None
        if self.checkpoint_dir:
            self.checkpoint_dir.mkdir()

    def parts(self) -> RunParts:
        def preflight(cfg: JlstmConfig) -> RunData:
            self.calls.append("preflight")
            return run_data()

        @contextmanager
        def lock(name: str) -> Iterator[None]:
            self.calls.append(f"lock {name}")
            try:
                yield
            finally:
                self.calls.append("unlock")

        def prepare(cfg: JlstmConfig, data: RunData | None) -> PreparedData:
            self.calls.append("prepare" + (" (preflight's data)" if data else ""))
            return PreparedData(data or run_data(), cfg.resolve_model(2), {}, {})

        recorder = self

        class FakeTrainer:
            def fit(self) -> FakeResult:
                recorder.calls.append("fit")
                where = recorder.checkpoint_dir
                return FakeResult(where and ray.train.Checkpoint(str(where)), recorder.metrics)

        def trainer(cfg: JlstmConfig, data: PreparedData, plan: Any, callbacks: list,
                    run_id: str) -> FakeTrainer:
            self.calls.append(f"trainer ({len(callbacks)} callbacks)")
            return FakeTrainer()

        def finish(cfg: JlstmConfig, run_id: str, checkpoint: ray.train.Checkpoint,
                   data: RunData) -> SplitResult:
            self.calls.append(f"finish {Path(checkpoint.path).name}")
            return SplitResult(run_id, {}, checkpoint.path, None, False)

        def finished_data(cfg: JlstmConfig) -> RunData:
            self.calls.append("finished_data")
            return run_data()

        return RunParts(
            preflight=preflight, start_cluster=lambda: self.calls.append("start_cluster"),
            lock=lock, plan=lambda cfg: self.calls.append("plan"), prepare=prepare,
            trainer=trainer, finished_data=finished_data, finish=finish,
        )


def test_a_run_goes_through_its_life_in_order(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    recorder = Recorder(tmp_path, GOOD)
    result = Run(cfg, parts=recorder.parts()).execute()
    assert recorder.calls == [
        "preflight", "start_cluster", "lock ordered", "plan", "prepare (preflight's data)",
        "trainer (1 callbacks)", "fit", "finish checkpoint", "unlock",
    ]
    assert isinstance(result, SplitResult)
    run = store.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.RUN_NAME_TAG] == "ordered"
    assert run.data.params["train.epochs"] == "1"  # the inputs were logged


def test_a_fit_without_a_checkpoint_ends_failed_and_finishes_nothing(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    recorder = Recorder(tmp_path, GOOD, checkpoint=False)
    with pytest.raises(RuntimeError, match="'ordered' ended without a checkpoint"):
        Run(cfg, parts=recorder.parts()).execute()
    assert recorder.calls[-2:] == ["fit", "unlock"]
    run_id = tracking.find_run(cfg, tracking.get_or_create_experiment(cfg.tracking.experiment))
    assert store.get_run(run_id).info.status == "FAILED"


def test_too_many_bad_training_clips_stop_the_run_before_it_finishes(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    bad = {**GOOD, TRAIN_BAD_FRACTION: 0.9, TRAIN_BAD_CLIPS: 9}
    recorder = Recorder(tmp_path, bad)
    with pytest.raises(BadDataError, match="9 training clips"):
        Run(cfg, parts=recorder.parts()).execute()
    assert not any(call.startswith("finish ") for call in recorder.calls)


def finished_on_disk(cfg: JlstmConfig, tmp_path: Path, last_epoch: dict[str, Any]) -> None:
    """A Train run of `cfg`'s name whose checkpoint holds its one epoch (`last_epoch`)."""
    done = tmp_path / "ray" / "ordered" / "checkpoint_000000"
    done.mkdir(parents=True)
    model_config = cfg.resolve_model(2).model_dump(mode="json")
    TrainState({}, {}, {}, 1, 1.0, [last_epoch], model_config, ["a", "b"]).save(done)


def test_a_run_found_finished_on_disk_is_finished_without_a_fit(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    finished_on_disk(cfg, tmp_path, {**GOOD, "train_loss": 0.25})
    recorder = Recorder(tmp_path, GOOD)
    result = Run(cfg, preflighted=True, parts=recorder.parts()).execute()
    # No plan, data sets or trainer; the classes come from the data read for finishing.
    assert recorder.calls == [
        "start_cluster", "lock ordered", "finished_data", "finish checkpoint_000000", "unlock",
    ]
    losses = store.get_metric_history(result.run_id, "train_loss")
    assert [(m.step, m.value) for m in losses] == [(1, 0.25)]  # the epoch MLflow missed
    assert store.get_run(result.run_id).data.params["train.epochs"] == "1"  # and its inputs


def test_a_run_found_finished_is_still_checked(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    """Its last epoch scored no test clip (none is listed: the test set has none): it is not
    registered on a later call either."""
    finished_on_disk(cfg, tmp_path, {**GOOD, VAL_VIDEOS_SCORED: 0, VAL_BAD_CLIPS: 2})
    recorder = Recorder(tmp_path, GOOD)
    with pytest.raises(BadDataError, match="epoch 1: the test set has no clips"):
        Run(cfg, preflighted=True, parts=recorder.parts()).execute()
    assert not any(call.startswith("finish ") for call in recorder.calls)


def test_a_trial_found_finished_reports_without_reading_data(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    finished_on_disk(cfg, tmp_path, GOOD)
    recorder = Recorder(tmp_path, GOOD)
    trained = Run(cfg, preflighted=True, lock_held=True, stop_after_fit=True,
                  parts=recorder.parts()).execute()
    assert recorder.calls == ["start_cluster"]
    assert isinstance(trained, Trained) and not trained.fitted and trained.data is None
    assert trained.metrics == GOOD and trained.checkpoint.path.endswith("checkpoint_000000")


def test_a_state_file_cut_short_is_not_taken_for_a_finished_run(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    finished_on_disk(cfg, tmp_path, GOOD)
    state = tmp_path / "ray" / "ordered" / "checkpoint_000000" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    recorder = Recorder(tmp_path, GOOD)
    Run(cfg, preflighted=True, parts=recorder.parts()).execute()
    assert "fit" in recorder.calls  # Ray Train resumes from what it registered


def test_a_trial_takes_what_its_driver_holds_and_stops_after_the_fit(
    cfg: JlstmConfig, store: MlflowClient, tmp_path: Path
) -> None:
    recorder = Recorder(tmp_path, GOOD)
    uri = tracking.connect()
    experiment_id = tracking.get_or_create_experiment("trials")
    trained = Run(
        cfg, tracking_uri=uri, experiment_id=experiment_id, preflighted=True,
        plan=object(),  # type: ignore[arg-type]  # the sweep's plan, passed through
        lock_held=True, tags={"jlstm.tune_trial_id": "t1"}, callbacks=[object()],  # type: ignore[list-item]
        stop_after_fit=True, parts=recorder.parts(),
    ).execute()
    assert recorder.calls == ["start_cluster", "prepare", "trainer (2 callbacks)", "fit"]
    assert isinstance(trained, Trained) and trained.fitted
    assert trained.metrics == GOOD
    run_id = tracking.find_run(cfg, experiment_id)
    assert store.get_run(run_id).data.tags["jlstm.tune_trial_id"] == "t1"
