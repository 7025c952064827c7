"""End-to-end training: 2 DDP workers on the session's local Ray cluster, tracked in MLflow.

One tiny synthetic dataset (real AVI files) and one trained run are shared by the module;
the other tests resume it, predict with it, kill a worker of another run, and refuse an
unreachable tracking server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_server import free_port, running_mlflow_server
from model_server import curl_invocations, serving_model, video_b64
from ray_processes import stop_ray_processes
from tiny_run import EPOCHS, tiny_config

from data_shards.features import build_feature_cache
from data_shards.index import ensure_index
from data_shards.synth import synthesize_dataset
from jlstm.cli import main as jlstm_main
from orchestration import registry
from orchestration.checkpoint import TrainState
from orchestration.config import JlstmConfig, validate_config
from orchestration.run import SplitResult, train_split
from orchestration.tracking import FINISHED_TAG

REPO = Path(__file__).resolve().parent.parent

# End-to-end: each test trains (or shares a trained) tiny model on local Ray, 1-3 min.
pytestmark = pytest.mark.slow
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    return synthesize_dataset(
        root, layout="ucf101", classes=2, videos_per_class=6, seed=3, frame_size=64, num_frames=16
    )


@pytest.fixture(scope="module")
def sqlite_tracking(tmp_path_factory: pytest.TempPathFactory) -> Any:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    patch.undo()


@pytest.fixture(scope="module")
def trained(
    ray_cluster: None, dataset: Path, sqlite_tracking: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[JlstmConfig, SplitResult]:
    storage = tmp_path_factory.mktemp("ray_storage")
    cfg = validate_config(tiny_config(dataset, storage, "tiny-late"))
    return cfg, train_split(cfg)


def test_training_run_is_tracked(trained: tuple[JlstmConfig, SplitResult]) -> None:
    cfg, result = trained
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.params["model.taps"] == '["conv4_3"]'
    assert run.data.tags["dataset"] == "ucf101" and run.data.tags["split"] == "1"
    # Synthetic data: the attention on the moving square, per branch and overall.
    for metric in ("loss_total", "loss_lstm", "loss_supervision", "loss_attention_reg",
                   "val_video_top1_vote", "val_attention_on_target",
                   "val_attention_on_target_conv4_3"):
        steps = [m.step for m in client.get_metric_history(result.run_id, metric)]
        assert steps == list(range(1, EPOCHS + 1)), metric
    assert run.data.metrics["val_attention_on_target"] == pytest.approx(
        run.data.metrics["val_attention_on_target_conv4_3"]
    )
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts
    assert "evaluation/per_class_accuracy.csv" in artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert "plots/loss_curves.png" in plots
    assert any(p.startswith("plots/attention_") for p in plots)
    # The training node's system metrics (one node here: the local cluster).
    assert run.data.metrics["system/node0/cpu_utilization_percentage"] >= 0
    assert "system/node0/system_memory_usage_megabytes" in run.data.metrics
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "quarantine.csv"} <= top
    name = registry.registered_model_name("ucf101")
    version = client.get_model_version(name, result.model_version)
    assert version.run_id == result.run_id
    assert str(client.get_model_version_by_alias(name, "champion").version) == result.model_version
    # What a user browsing the registry reads: what the version is, its figures, how to use it.
    predict = f"jlstm predict VIDEO --model models:/{name}@champion"
    top1 = f"test video top-1 {result.metrics['val_video_top1_vote']:.1%}"
    assert cfg.variant in version.description and top1 in version.description
    assert predict in version.description
    assert predict in client.get_registered_model(name).description


def test_rerunning_a_finished_run_resumes(trained: tuple[JlstmConfig, SplitResult]) -> None:
    cfg, first = trained
    again = train_split(cfg)
    assert again.run_id == first.run_id
    assert again.checkpoint_dir == first.checkpoint_dir
    client = MlflowClient()
    assert len(client.get_metric_history(first.run_id, "loss_total")) == EPOCHS
    assert client.get_run(first.run_id).data.tags[FINISHED_TAG] == str(EPOCHS)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"run_id = '{first.run_id}'")
    assert [str(v.version) for v in versions] == [first.model_version]


def test_predict_agrees_with_the_registered_model(
    trained: tuple[JlstmConfig, SplitResult], dataset: Path, sqlite_tracking: str
) -> None:
    """`jlstm predict` ranks classes as the registered pyfunc model ranks the video's bytes:
    one pipeline (`model.video`), with the clip grid the model carries (not told here).

    The tiny run is too short to learn anything (it stays at 50% on 2 classes); whether
    predict names the right class is the next test's, after a run that learns.
    """
    video = next((dataset / "UCF-101").glob("*/*.avi"))
    out = subprocess.run(
        [sys.executable, "-m", "jlstm", "predict", str(video),
         "--model", "models:/jlstm-ucf101@champion", "--top-k", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": sqlite_tracking},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ranked = [line.split() for line in out.stdout.strip().splitlines()]
    probs = [float(p.rstrip("%")) / 100 for p, _ in ranked]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)

    pyfunc = mlflow.pyfunc.load_model("models:/jlstm-ucf101@champion")
    row = pyfunc.predict(
        pd.DataFrame({"video_b64": [video_b64(video)]}), params={"top_k": 2}
    ).iloc[0]
    assert row.error == "", row.error
    assert [name for _, name in ranked] == [t["label"] for t in row.top_k]
    assert probs == pytest.approx([t["score"] for t in row.top_k], abs=1e-3)


def test_predict_over_the_folder_agrees_with_the_evaluation(
    trained: tuple[JlstmConfig, SplitResult], dataset: Path, sqlite_tracking: str,
    tmp_path: Path,
) -> None:
    """`jlstm predict` over the dataset's folder (Ray Data, the Parquet output) names every
    test video as the run's evaluation did (its `evaluation/video_predictions.parquet`):
    one pipeline, so the same label, clip count and score."""
    _, result = trained
    logged = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="evaluation/video_predictions.parquet",
        dst_path=str(tmp_path), tracking_uri=sqlite_tracking,
    )
    evaluated = {row["video"]: row for row in pq.read_table(logged).to_pylist()}
    assert evaluated and all(row["error"] == "" for row in evaluated.values())
    out = tmp_path / "predicted"
    uri = f"models:/{registry.registered_model_name('ucf101')}/{result.model_version}"
    assert jlstm_main(["predict", str(dataset), "--model", uri, "--out", str(out)]) == 0
    predicted = {row["video"]: row for row in pq.read_table(out).to_pylist()}
    for video, row in evaluated.items():
        assert predicted[video]["label"] == row["label"], video
        assert predicted[video]["num_clips"] == row["num_clips"], video
        assert predicted[video]["score"] == pytest.approx(row["score"], abs=1e-5), video


def test_predict_names_the_right_class_after_a_short_training(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short run that learns, then `jlstm predict` on one of its videos names the class.

    Predict is not told the frame interval (2): it comes with the registered model.

    The model reads optical flow beside VGG16's pool4 (inputs [pool4, flow]): the flow is
    computed by the cache build, then again inside the registered model's own pipeline by
    `jlstm predict` (one video, and the folder on Ray Data) and by `mlflow models serve`,
    whose environment gets OpenCV from the model's requirements.

    The tiny run above learns nothing in 3 epochs (16-frame 64 px videos are too little
    motion), so this one takes the demo's model and data sizes on 2 classes x 12 videos,
    over cached taps (plain-loop trials of this setup, 4 seeds: 100% of the training
    clips, 75-100% of the 8 held-out videos). Predict runs on a training video, which the
    run has learned; the held-out videos only have to beat chance.
    """
    root = synthesize_dataset(
        tmp_path / "videos", layout="ucf101", classes=2, videos_per_class=12, seed=3,
        frame_size=96, num_frames=32,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = tiny_config(
        root, tmp_path / "ray_storage", "learns",
        model={
            "frame_size": 96, "clip_len": 8, "last_steps": 4, "map_size": 6,
            "inputs": ["pool4", "flow"], "channels": 32, "hidden_size": 64,
            "supervision_hidden": 32, "attention_reg_weight": 1.0,
        },
        data={
            "train_stride": 4, "frame_interval": 2, "feature_cache": str(tmp_path / "cache"),
            "use_feature_cache": True,
        },
        train={"epochs": 8, "batch_size": 4, "lr": 0.003},
        cluster={"num_workers": 1},
    )
    del raw["model"]["taps"]  # tiny_config's RGB tap: this run names its inputs
    cfg = validate_config(raw)
    ensure_index(cfg.data)
    build_feature_cache(cfg.data, cfg.clip_spec(2))
    result = train_split(cfg)
    assert result.metrics["val_video_top1_vote"] > 0.5, result.metrics

    first_train_line = (root / "ucfTrainTestlist" / "trainlist01.txt").read_text().split()[0]
    video = root / "UCF-101" / first_train_line
    out = subprocess.run(
        [sys.executable, "-m", "jlstm", "predict", str(video),
         "--model", "models:/jlstm-ucf101@champion"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    top_probability, top_class = out.stdout.split()[:2]
    assert top_class == video.parent.name, out.stdout
    assert float(top_probability.rstrip("%")) > 50
    requirements = Path(mlflow.artifacts.download_artifacts(
        "models:/jlstm-ucf101@champion/requirements.txt", dst_path=str(tmp_path / "req"),
        tracking_uri=uri)).read_text()
    assert "opencv-python-headless==" in requirements, requirements

    # The folder on Ray Data (decode tasks computing the flow, scoring actors): every video
    # scored, the training video named as `jlstm predict` named it.
    predictions = tmp_path / "predictions.parquet"
    assert jlstm_main(["predict", str(root / "UCF-101"), "--model",
                       "models:/jlstm-ucf101@champion", "--out", str(predictions)]) == 0
    rows = {Path(r["video"]).name: r for r in pq.read_table(predictions).to_pylist()}
    assert len(rows) == 24 and all(r["error"] == "" for r in rows.values())
    assert rows[video.name]["label"] == video.parent.name

    # The same model served by `mlflow models serve` names the class of the video's bytes.
    with serving_model("models:/jlstm-ucf101@champion", uri, tmp_path) as url:
        [row] = curl_invocations(url, [{"video_b64": video_b64(video)}], tmp_path)
    assert row["error"] == "" and row["label"] == video.parent.name, row


def test_unreachable_tracking_server_fails_before_training(
    dataset: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "ray"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(dataset, storage, "never")))
    out = subprocess.run(
        [sys.executable, "-m", "jlstm", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
    )
    assert out.returncode == 3
    assert "not reachable" in out.stderr and "MLFLOW_TRACKING_URI" in out.stderr
    assert not storage.exists()


def _train_worker_pids() -> set[int]:
    """Processes titled `ray::RayTrainWorker` (Ray sets the title of each Train worker)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith(b"ray::RayTrainWorker"):
            pids.add(int(proc.name))
    return pids


def test_killed_worker_resumes_from_checkpoint_on_mlflow_server(
    ray_cluster: None, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = tmp_path / "ray"
    cfg = validate_config(tiny_config(dataset, storage, "tiny-killed"))
    with running_mlflow_server(tmp_path / "server") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = train_split(cfg)
            except BaseException as err:  # re-raised in the test thread below
                outcome["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 600
        while not list(storage.glob("tiny-killed/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        victims = _train_worker_pids()
        assert victims, "no training worker process found to kill"
        os.kill(max(victims), signal.SIGKILL)
        # The kill hit this run: Ray Train replaces its worker group with new processes.
        while not _train_worker_pids() - victims and time.monotonic() < deadline:
            assert thread.is_alive() or "error" in outcome, "the run ended without a restart"
            time.sleep(0.2)
        assert _train_worker_pids() - victims, "no new worker group after the kill"
        thread.join(timeout=900)
        assert "error" not in outcome, outcome.get("error")
        result: SplitResult = outcome["result"]

        state = TrainState.load(Path(result.checkpoint_dir))
        assert state.epoch == EPOCHS
        assert [int(h["epoch"]) for h in state.history] == list(range(1, EPOCHS + 1))
        client = MlflowClient(uri)
        steps = [m.step for m in client.get_metric_history(result.run_id, "epoch")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))  # each epoch logged exactly once
        assert client.get_registered_model(registry.registered_model_name("ucf101"))


def _dashboard_request(
    url: str, token: str | None = None, body: dict[str, Any] | None = None
) -> tuple[int, str]:
    """(status, body) of one request to the Ray dashboard; OSError when nothing answers."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_for_dashboard(
    address: str, token: str, head: subprocess.Popen, log: Path, timeout_s: float
) -> None:
    """Until an authenticated GET succeeds: a refusal or an error page is not "ready"."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()}")
        try:
            status, body = _dashboard_request(f"{address}/api/version", token)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:300]}"
        except OSError as err:  # refused or timed out: not listening yet
            last = repr(err)
        time.sleep(1)
    raise TimeoutError(f"{address} not ready within {timeout_s:.0f} s ({last})")


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_training(dataset: Path, tmp_path: Path) -> None:
    """`ray job submit` against a `ray start --head` cluster on loopback with token auth on:
    the Jobs API refuses a request without the token or with a wrong one, and the CLI, which
    sends the token, submits a training job that finishes."""
    from data_shards.cluster import RAY_NODE_ENV

    bin_dir = Path(sys.executable).parent
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_config(
        dataset, tmp_path / "ray", "tiny-job", train={"epochs": 1}, cluster={"num_workers": 1},
    )))
    # A HOME of its own: the token this test generates is the only one any process here can
    # find (not one a local `ray.init()` of another test left in the real ~/.ray).
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    } | RAY_NODE_ENV | {"RAY_AUTH_MODE": "token", "HOME": str(home)}
    # As from an activated venv: the job's `python` is the one `ray start` finds on PATH.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    # deploy/README.md step 4: `ray start` makes no token, this command does (~/.ray/auth_token).
    generated = subprocess.run(
        [bin_dir / "ray", "get-auth-token", "--generate"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    token = generated.stdout.strip()
    assert token and (home / ".ray" / "auth_token").read_text().strip() == token

    # Own ports and temp dir (short: it holds unix sockets) on 127.0.0.1: the session's
    # cluster, and other Ray instances on this machine, hold Ray's default ones.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    dashboard_port = free_port()
    log = tmp_path / "ray-start.log"
    with log.open("w") as log_file:
        # --block keeps every process of this head in the process group started here, so the
        # test stops exactly this cluster: `ray stop` kills every Ray process on the machine,
        # the session's cluster and other users' included.
        head = subprocess.Popen(
            [bin_dir / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={free_port()}", f"--dashboard-port={dashboard_port}",
             "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
             f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_dashboard(address, token, head, log, timeout_s=240)

        # Without the token, or with a wrong one, the Jobs API runs nothing and lists nothing.
        intruder = {"entrypoint": "echo intruder"}
        assert _dashboard_request(f"{address}/api/jobs/", body=intruder)[0] == 401
        assert _dashboard_request(f"{address}/api/jobs/")[0] == 401
        wrong = "0" * len(token)
        assert _dashboard_request(f"{address}/api/jobs/", wrong, body=intruder)[0] == 403

        runtime_env = json.dumps(
            {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
        )
        submit = [
            bin_dir / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
            "--runtime-env-json", runtime_env, "--",
            "python", "-m", "jlstm", "train", "--config", str(config),
        ]
        deadline = time.monotonic() + 180
        while True:
            out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            # The dashboard answers before its job agent is up; that refusal is retried.
            if "No available agent" not in out.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert "succeeded" in out.stdout.lower()
        assert list((tmp_path / "ray" / "tiny-job").glob("checkpoint_*"))
        assert (tmp_path / "mlflow.db").exists()

        # The only job ever submitted is the one sent with the token.
        status, body = _dashboard_request(f"{address}/api/jobs/", token)
        assert status == 200, body
        jobs = [job for job in json.loads(body) if job["type"] == "SUBMISSION"]
        assert [job["status"] for job in jobs] == ["SUCCEEDED"], jobs
        assert "jlstm train" in jobs[0]["entrypoint"]
    finally:
        stop_ray_processes(head, home)
        shutil.rmtree(temp_dir, ignore_errors=True)

