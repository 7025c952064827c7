"""The registered model as a service: videos in, one labelled row per video out, through
`mlflow.pyfunc.load_model` and a real `mlflow models serve` of a registry alias.

The model is a tiny net with random weights (no training): what is tested is the pipeline,
not the label; `tests/test_train.py` serves a trained model and checks its label.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from model_server import curl_invocations, serving_model, video_b64
from test_tracking import CLASS_NAMES, small_net

from data_shards.synth import write_index_video
from orchestration import inference, registry, tracking
from orchestration.mlflow_model import MODEL_FORMAT, OUTPUT_COLUMNS, VIDEO_ROOT_ENV

NAME = "jlstm-serve"
URI = f"models:/{NAME}@{registry.CHAMPION_ALIAS}"
# The logged grid: clips of 6 frames (small_net's clip_len) every 2nd frame, every 3 frames;
# a 24-frame video then has clips at 0, 3, 6, 9, 12 (the last one ends at frame 22).
FRAME_INTERVAL, CLIP_STRIDE, FRAMES, CLIPS = 2, 3, 24, 5


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite store holding the random-weight net as `jlstm-serve@champion`; its URI."""
    root = tmp_path_factory.mktemp("serve_store")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        mlflow.set_tracking_uri(tracking.tracking_uri())
        try:
            net = small_net()
            mlflow.set_experiment(experiment_id=tracking.get_or_create_experiment("serve"))
            with mlflow.start_run():
                info = registry.log_model(
                    net, net.cfg, CLASS_NAMES, registered_model_name=NAME,
                    frame_interval=FRAME_INTERVAL, clip_stride=CLIP_STRIDE,
                )
            assert registry.promote_if_better(
                NAME, info.registered_model_version, split=1, video_top1=0.5, test_videos=4,
                dataset_digest="d1",
            )
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a real 24-frame AVI (`good.avi`) and a file that is no video."""
    root = tmp_path_factory.mktemp("videos")
    write_index_video(root / "good.avi", FRAMES, size=64)
    (root / "noise.avi").write_bytes(bytes(range(256)) * 20)
    return root


def test_the_logged_model_says_what_it_takes(store: str) -> None:
    pyfunc = mlflow.pyfunc.load_model(URI)
    inputs = {c.name: c for c in pyfunc.metadata.get_input_schema().inputs}
    assert set(inputs) == {"video_b64", "video"}
    assert all(not c.required and c.type.name == "string" for c in inputs.values())
    assert pyfunc.metadata.get_output_schema().input_names() == list(OUTPUT_COLUMNS)
    assert pyfunc.metadata.metadata == {
        "frame_interval": FRAME_INTERVAL, "clip_stride": CLIP_STRIDE,
        "format_version": MODEL_FORMAT,
    }
    requirements = (
        Path(mlflow.artifacts.download_artifacts(f"{URI}/requirements.txt")).read_text().split()
    )
    assert any(r.startswith("decord") and "==" in r for r in requirements), requirements
    # The input example is a small real video, and the model answers it.
    local = Path(mlflow.artifacts.download_artifacts(URI))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert list(example.columns) == ["video_b64"]
    assert len(base64.b64decode(example.video_b64[0])) < 10_000
    answer = pyfunc.predict(example)
    assert answer.error[0] == "" and answer.label[0] in CLASS_NAMES
    champion = mlflow.MlflowClient(store).get_model_version_by_alias(
        NAME, registry.CHAMPION_ALIAS
    )
    assert champion.tags[registry.FORMAT_TAG] == str(MODEL_FORMAT)


def test_pyfunc_answers_every_row_and_reads_paths_only_under_the_root(
    store: str, videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside.avi"
    write_index_video(outside, 8, size=32)
    (videos / "link.avi").symlink_to(outside)
    pyfunc = mlflow.pyfunc.load_model(URI)
    good = video_b64(videos / "good.avi")
    requests = [
        ("b64", {"video_b64": good}),
        ("relative path", {"video": "good.avi"}),
        ("absolute path", {"video": str(videos / "good.avi")}),
        ("noise", {"video_b64": video_b64(videos / "noise.avi")}),
        ("not base64", {"video_b64": "%%% not base64"}),
        ("parent", {"video": "../outside.avi"}),
        ("absolute outside", {"video": str(outside)}),
        ("symlink out", {"video": "link.avi"}),
        ("missing", {"video": "missing.avi"}),
        ("both", {"video_b64": good, "video": "good.avi"}),
        ("neither", {"video_b64": ""}),
    ]
    rows = pd.DataFrame([row for _, row in requests])

    refused = pyfunc.predict(rows[["video"]].iloc[1:2])  # no root configured: no path read
    assert refused.error[0].startswith("video paths are refused") and refused.label[0] == ""

    monkeypatch.setenv(VIDEO_ROOT_ENV, str(videos))
    out = pyfunc.predict(rows, params={"top_k": 2})
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == len(requests)
    answers = dict(zip([name for name, _ in requests], out.to_dict(orient="records"), strict=True))
    first = answers["b64"]
    assert first["error"] == "" and first["label"] in CLASS_NAMES
    assert first["num_clips"] == CLIPS and 0 < first["score"] <= 1
    assert first["top_k"][0]["label"] == first["label"] and len(first["top_k"]) == 2
    for name in ("relative path", "absolute path"):
        assert answers[name] == first, name
    expected_errors = {
        "noise": "cannot decode the video", "not base64": "not base64",
        "parent": "outside", "absolute outside": "outside", "symlink out": "outside",
        "missing": "no such file", "both": "not both", "neither": "no video",
    }
    for name, error in expected_errors.items():
        row = answers[name]
        assert error in row["error"], (name, row)
        assert (row["label"], row["score"], row["top_k"], row["num_clips"]) == ("", 0.0, [], 0)

    # `jlstm predict` is the same pipeline: the same ranking, the same scores.
    ranked = inference.predict_video(videos / "good.avi", URI, top_k=2)
    assert [name for name, _ in ranked] == [t["label"] for t in first["top_k"]]
    assert [score for _, score in ranked] == pytest.approx([t["score"] for t in first["top_k"]])


def test_mlflow_models_serve_of_an_alias_answers_a_video_with_a_class_name(
    store: str, videos: Path, tmp_path: Path
) -> None:
    """`mlflow models serve` of `models:/...@champion`, outside the repository and with the
    venv's bin on PATH only, answers a curl request of a base64 video, a broken one and a
    path under its `JLSTM_VIDEO_ROOT`, row by row."""
    with serving_model(URI, store, tmp_path, env={VIDEO_ROOT_ENV: str(videos)}) as url:
        rows = curl_invocations(url, [
            {"video_b64": video_b64(videos / "good.avi")},
            {"video_b64": video_b64(videos / "noise.avi")},
            {"video": "good.avi"},
        ], tmp_path)
    good, noise, by_path = rows
    assert good["error"] == "" and good["label"] in CLASS_NAMES, good
    assert good["num_clips"] == CLIPS and len(good["top_k"]) == len(CLASS_NAMES)
    assert noise["error"].startswith("cannot decode the video") and noise["label"] == ""
    assert by_path == good
