"""`jlstm predict` over many videos (Ray Data, a Parquet dataset that resumes) and its errors,
against real generated videos, broken ones and a FIFO that hangs the decoder, on the
session's local Ray cluster, with random-weight models in a local SQLite MLflow store.

The model's weights are random: what is tested is the pipeline (one row per video, errors in
rows, resume, refusals), and that its rows equal the single-video path's (`model.video`).
A trained model's `jlstm predict` against its evaluation's per-video rows is in
tests/test_train.py (slow: it needs the trained run there).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from test_tracking import CLASS_NAMES, small_net

from data_shards.synth import write_broken_videos, write_index_video
from jlstm.cli import main
from orchestration import inference, registry, tracking
from orchestration.batch_predict import SCHEMA
from orchestration.mlflow_model import ARTIFACT_FILES, CONFIG_FILE, WEIGHTS_FILE

NAME, NO_CLASSES = "jlstm-predict", "jlstm-predict-noclasses"
URI = f"models:/{NAME}@{registry.CHAMPION_ALIAS}"
# small_net's clip_len 6, logged with frame_interval 2 and stride 3: a 24-frame video has
# clips at 0, 3, 6, 9, 12.
FRAMES, CLIPS = 24, 5
# The FIFO's decode waits this long before its row says "timeout".
TIMEOUT_S = "1"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite store with `jlstm-predict` (random weights) as version 1 (`@champion`) and 2,
    and a model logged without its class names; its URI (also in the env)."""
    root = tmp_path_factory.mktemp("predict_store")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        # Its download bar would share stderr with the one-line errors checked here.
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(root)
        mlflow.set_tracking_uri(tracking.tracking_uri())
        try:
            net = small_net()
            mlflow.set_experiment(experiment_id=tracking.get_or_create_experiment("predict"))
            with mlflow.start_run():
                info = registry.log_model(
                    net, net.cfg, CLASS_NAMES, registered_model_name=NAME,
                    frame_interval=2, clip_stride=3,
                )
            client = mlflow.MlflowClient()
            client.set_registered_model_alias(NAME, registry.CHAMPION_ALIAS, "1")
            # Version 2: another model for `--out` (its version is what is compared).
            mlflow.register_model(info.model_uri, NAME)
            _log_without_class_names(net, root)
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def _log_without_class_names(net: torch.nn.Module, tmp: Path) -> None:
    """`NO_CLASSES`: the pyfunc with weights and config but no class names."""
    import model as model_package
    from orchestration import mlflow_model

    torch.save(net.state_dict(), tmp / WEIGHTS_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(net.cfg.model_dump(mode="json")))
    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__,
            artifacts={k: str(tmp / f) for k, f in ARTIFACT_FILES.items() if k != "class_names"},
            code_paths=[str(Path(model_package.__file__).parent)],
            registered_model_name=NO_CLASSES,
        )


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good.avi, more/good2.avi (24 frames), noise.avi, empty.avi, cut.mp4 (an MP4 cut in
    half: it opens, then fails mid-video) and hang.avi, a FIFO no one writes to."""
    root = tmp_path_factory.mktemp("predict_videos")
    write_index_video(root / "good.avi", FRAMES, size=64)
    write_index_video(root / "more" / "good2.avi", FRAMES + 6, size=64)
    (root / "noise.avi").write_bytes(bytes(range(256)) * 20)
    broken = write_broken_videos(root / "broken")
    shutil.move(broken["empty"], root / "empty.avi")
    shutil.move(broken["mp4_cut"], root / "cut.mp4")
    shutil.rmtree(root / "broken")
    os.mkfifo(root / "hang.avi")
    return root


def predict(*args: str) -> int:
    return main(["predict", *map(str, args)])


def predicted(source: Path, out: Path, *flags: str) -> dict[str, dict]:
    """`jlstm predict source --out out` with `URI`, which must exit 0; the rows by video."""
    assert predict(source, "--model", URI, "--out", out, *flags) == 0
    return rows_of(out)


def rows_of(out: Path) -> dict[str, dict]:
    table = pq.read_table(out, schema=SCHEMA)
    rows = {row["video"]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows  # one row per video
    return rows


def test_a_folder_gives_one_row_per_video_and_a_rerun_resumes(
    ray_cluster: None, store: str, videos: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "predictions.parquet"
    rows = predicted(videos, out, "--decode-timeout-s", TIMEOUT_S)
    assert set(rows) == {
        "good.avi", "more/good2.avi", "noise.avi", "empty.avi", "cut.mp4", "hang.avi"
    }
    version = f"{NAME}/1"
    for row in rows.values():
        assert (row["model_uri"], row["model_version"]) == (URI, version)
        stat = (videos / row["video"]).stat()
        assert (row["size"], row["mtime"]) == (stat.st_size, stat.st_mtime_ns)
    good = rows["good.avi"]
    assert good["error"] == "" and good["num_clips"] == CLIPS
    # The same pipeline as one video's `jlstm predict` (and the served model).
    ranked = inference.predict_video(videos / "good.avi", URI, top_k=5)
    assert [t["label"] for t in good["top_k"]] == [name for name, _ in ranked]
    assert [t["score"] for t in good["top_k"]] == pytest.approx([s for _, s in ranked])
    assert good["label"] == ranked[0][0] and rows["more/good2.avi"]["error"] == ""
    for name in ("noise.avi", "empty.avi", "cut.mp4", "hang.avi"):
        row = rows[name]
        assert row["error"].startswith("cannot decode the video"), row
        assert (row["label"], row["score"], row["top_k"], row["num_clips"]) == ("", 0, [], 0)
        assert "\n" not in row["error"]
    assert "timeout" in rows["hang.avi"]["error"]
    parts = sorted(out.glob("*.parquet"))
    assert parts and all(pq.read_table(p).num_rows for p in parts)  # each part readable

    # Again: every video is there unchanged, so nothing runs and no part is added.
    capsys.readouterr()
    assert predict(videos, "--model", URI, "--out", out) == 0
    assert "0 predicted" in capsys.readouterr().out
    assert sorted(out.glob("*.parquet")) == parts
    # A video whose file changed is predicted again; the dataset keeps one row per video.
    write_index_video(videos / "more" / "good2.avi", FRAMES, size=64)
    again = predicted(videos, out, "--decode-timeout-s", TIMEOUT_S)
    assert "1 predicted" in capsys.readouterr().out
    assert again["more/good2.avi"]["num_clips"] == CLIPS
    assert again["more/good2.avi"]["mtime"] == (videos / "more/good2.avi").stat().st_mtime_ns
    assert {k: v for k, v in again.items() if k != "more/good2.avi"} == {
        k: v for k, v in rows.items() if k != "more/good2.avi"
    }


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("jlstm: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_a_list_file_and_another_model_onto_its_out(
    ray_cluster: None, store: str, videos: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    listed = videos / "list.txt"
    listed.write_text("# a video and a missing one, under this list's folder\ngood.avi\n\nno.avi\n")
    out = tmp_path / "listed"
    rows = predicted(listed, out)
    assert set(rows) == {"good.avi", "no.avi"}
    assert rows["good.avi"]["error"] == "" and "cannot decode" in rows["no.avi"]["error"]
    parts = sorted(out.iterdir())
    capsys.readouterr()
    assert predict(listed, "--model", f"models:/{NAME}/2", "--out", out) == 2
    _one_line_error(capsys, f"{NAME}/1", f"{NAME}/2", "another --out")
    assert sorted(out.iterdir()) == parts


def test_user_errors_are_one_line_and_a_nonzero_exit(
    store: str, videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One broken video without --out: its name and the decoder's reason (a cut MP4 once
    # ended in a decord traceback).
    for name in ("cut.mp4", "noise.avi", "empty.avi"):
        assert predict(videos / name, "--model", URI) == 4
        _one_line_error(capsys, "cannot decode", name)
    assert predict(videos / "hang.avi", "--model", URI, "--decode-timeout-s", "1") == 4
    _one_line_error(capsys, "hang.avi", "timeout")
    assert predict(tmp_path / "nowhere", "--model", URI) == 2
    _one_line_error(capsys, "nowhere", "does not exist")
    assert predict(videos / "good.avi", "--model", f"models:/{NAME}@nope") == 2
    _one_line_error(capsys, "--model", "nope")
    assert predict(videos / "good.avi", "--model", "models:/no-such-model/1") == 2
    _one_line_error(capsys, "--model", "no-such-model")
    assert predict(videos / "good.avi", "--model", f"models:/{NO_CLASSES}/1") == 2
    _one_line_error(capsys, "class_names", "cannot name classes")
    # A good video without --out prints the top-k, as it always did.
    capsys.readouterr()
    assert predict(videos / "good.avi", "--model", URI, "--top-k", "2") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[-1] in CLASS_NAMES


def test_evaluation_writes_each_test_videos_row_as_predict_does() -> None:
    """`video_predictions` (rank 0 of `jlstm eval` and of training's evaluation): the
    model's clip rule averaged per video (`video_score`), the served model's row, the true
    label; a video none of whose clips scored gets its first failure as an error."""
    import numpy as np

    from model.video import video_score
    from orchestration.evaluate import ClipPredictions
    from orchestration.mlflow_model import prediction_row
    from orchestration.step import BadClip
    from orchestration.worker import video_predictions

    rng = np.random.default_rng(0)
    vote, prob = rng.dirichlet(np.ones(4), 5), rng.dirichlet(np.ones(4), 5)
    preds = ClipPredictions(np.array([7, 7, 7, 3, 3]), np.array([1, 1, 1, 2, 2]), vote, prob)
    paths = {3: ("a/three.avi", 2), 7: ("b/seven.avi", 1), 9: ("b/nine.avi", 0)}
    failures = [BadClip(9, 0, "b/nine.avi: timeout"), BadClip(9, 4, "b/nine.avi: late")]
    table = video_predictions(preds, failures, CLASS_NAMES, paths, "vote").to_pylist()
    assert [row["video"] for row in table] == ["a/three.avi", "b/seven.avi", "b/nine.avi"]
    assert [row["true_label"] for row in table] == ["jump", "run", "walk"]
    for row, clips in zip(table, (vote[3:], vote[:3]), strict=False):
        expected = prediction_row(video_score(clips), len(clips), CLASS_NAMES)
        assert row["score"] == pytest.approx(expected.pop("score"))
        assert [t["label"] for t in row["top_k"]] == [t["label"] for t in expected.pop("top_k")]
        assert {k: row[k] for k in expected} == expected
    assert table[2]["label"] == "" and table[2]["num_clips"] == 0
    assert table[2]["error"].endswith("b/nine.avi: timeout")


def test_an_evaluation_is_logged_as_its_own_run_beside_the_models(
    store: str, tmp_path: Path
) -> None:
    """`jlstm eval`'s run (`tracking.log_evaluation`): in the experiment of the run that
    trained the model, tagged with both, its metrics and report files under `evaluation/`."""
    report = tmp_path / "report"
    report.mkdir()
    (report / "video_predictions.parquet").write_bytes(b"rows")
    (report / "metrics.json").write_text("{}")
    run_id = tracking.log_evaluation(URI, {"video_top1_vote": 0.75, "clip_top1": 0.5}, report)

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    trained_by = client.get_model_version_by_alias(NAME, registry.CHAMPION_ALIAS).run_id
    assert run.info.status == "FINISHED" and run.info.run_name == f"eval-{NAME}-champion"
    assert run.info.experiment_id == client.get_run(trained_by).info.experiment_id
    assert run.data.tags[tracking.EVALUATED_MODEL_TAG] == URI
    assert run.data.tags[tracking.EVALUATED_RUN_TAG] == trained_by
    assert run.data.metrics == {"video_top1_vote": 0.75, "clip_top1": 0.5}
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert logged == {"evaluation/video_predictions.parquet", "evaluation/metrics.json"}
