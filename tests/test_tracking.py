"""MLflow tracking and registry: local SQLite store and a real `mlflow server` on loopback."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow_server import free_port, running_mlflow_server

from model import JointAttentionNet, build_model
from orchestration import registry, tracking

CLASS_NAMES = ["walk", "run", "jump", "wave"]
REGISTERED = "jlstm-test"


def small_net() -> JointAttentionNet:
    """A tiny late-fusion net (random VGG16: its warning is expected here)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(
            "late_fusion",
            num_classes=len(CLASS_NAMES),
            frame_size=64,
            clip_len=6,
            last_steps=4,
            map_size=4,
            hidden_size=32,
            channels=16,
            num_layers=1,
            supervision_hidden=16,
        ).eval()


def uint8_clips(batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random uint8 clips [B, T=6, S=64, S, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (batch, 6, 64, 64, 3), dtype=np.uint8)


def assert_same_outputs(a: JointAttentionNet, b: JointAttentionNet) -> None:
    """Both nets give identical step logits and attention on the same clips."""
    from model import normalize_frames

    frames = normalize_frames(torch.from_numpy(uint8_clips()))
    with torch.inference_mode():
        out_a, out_b = a(frames), b(frames)
    torch.testing.assert_close(out_a.step_logits, out_b.step_logits, rtol=0, atol=0)
    torch.testing.assert_close(out_a.attention, out_b.attention, rtol=0, atol=0)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite tracking store in a temp dir (also the cwd), selected by MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("local_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)
        mlflow.set_tracking_uri(tracking.tracking_uri())
        try:
            yield root
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def logged(local_store: Path) -> tuple[JointAttentionNet, ModelInfo]:
    """The small net logged once to the local store and registered as version 1."""
    net = small_net()
    mlflow.set_experiment(experiment_id=tracking.get_or_create_experiment("tracking-test"))
    with mlflow.start_run():
        info = registry.log_model(
            net, net.cfg, CLASS_NAMES, registered_model_name=REGISTERED, frame_interval=3
        )
    return net, info


def test_log_model_registers_and_loads_back_identically(
    local_store: Path, logged: tuple[JointAttentionNet, ModelInfo]
) -> None:
    net, info = logged
    assert info.registered_model_version == 1
    loaded = registry.load_model(f"models:/{REGISTERED}/1")
    assert not loaded.net.training
    assert loaded.model_cfg == net.cfg
    assert loaded.class_names == CLASS_NAMES
    assert loaded.frame_interval == 3
    assert_same_outputs(net, loaded.net)
    assert_same_outputs(net, registry.load_model(info.model_uri).net)

    # Artifacts sit beside the database, never in the cwd's ./mlruns.
    experiment = mlflow.get_experiment_by_name("tracking-test")
    assert experiment.artifact_location == (local_store / "mlartifacts/tracking-test").as_uri()
    assert not (local_store / "mlruns").exists()


def registered_versions(
    name: str, info: ModelInfo, count: int
) -> tuple[MlflowClient, list[str], Callable[[], str]]:
    """A new registered model `name` with `count` versions of the logged model: the client,
    the versions, and a function that reads which version holds the champion alias."""
    client = MlflowClient()
    client.create_registered_model(name)
    versions = [client.create_model_version(name, info.model_uri).version for _ in range(count)]
    return client, versions, lambda: client.get_model_version_by_alias(
        name, registry.CHAMPION_ALIAS
    ).version


def test_champion_moves_only_on_improvement(
    local_store: Path, logged: tuple[JointAttentionNet, ModelInfo]
) -> None:
    name = "jlstm-promotion"
    client, versions, champion = registered_versions(name, logged[1], 7)

    def promote(version: str, split: int, top1: float, videos: int = 100) -> bool:
        return registry.promote_if_better(
            name, version, split=split, video_top1=top1, test_videos=videos,
            dataset_digest="d1",
        )

    assert promote(versions[0], 1, 0.5)  # first
    assert promote(versions[1], 1, 0.6)  # better
    assert champion() == versions[1]
    assert not promote(versions[2], 1, 0.55)  # worse
    assert not promote(versions[3], 1, 0.6)  # equal
    assert not promote(versions[4], 2, 0.9)  # another split
    assert not promote(versions[1], 1, 0.6)  # itself
    assert not promote(versions[5], 1, 0.9, videos=99)  # better, but a video went unscored
    assert champion() == versions[1]
    assert promote(versions[6], 1, 0.7, videos=101)  # better on more videos
    assert champion() == versions[6]
    tags = client.get_model_version(name, versions[2]).tags
    assert tags == {
        "split": "1", "video_top1": "0.55", "test_videos": "100", "dataset_digest": "d1",
        "format_version": str(registry.MODEL_FORMAT),
    }


def test_a_newer_model_format_takes_the_champion_at_an_equal_score(
    local_store: Path, logged: tuple[JointAttentionNet, ModelInfo]
) -> None:
    """An old champion (format 1: clips in, no format tag) goes to the next run of the
    current format that scores as well; nothing else changes the rule."""
    name = "jlstm-format"
    client, versions, champion = registered_versions(name, logged[1], 6)
    # Registered before formats were tagged: the tags of its time, no format tag.
    for key, value in (("split", "1"), ("video_top1", "0.8"), ("test_videos", "100"),
                       ("dataset_digest", "d1")):
        client.set_model_version_tag(name, versions[0], key, value)
    client.set_registered_model_alias(name, registry.CHAMPION_ALIAS, versions[0])
    assert registry.format_of(client.get_model_version(name, versions[0])) == 1

    def promote(version: str, top1: float, model_format: int = registry.MODEL_FORMAT,
                videos: int = 100) -> bool:
        return registry.promote_if_better(
            name, version, split=1, video_top1=top1, test_videos=videos,
            dataset_digest="d1", model_format=model_format,
        )

    assert not promote(versions[1], 0.7)  # newer, but worse
    assert not promote(versions[2], 0.8, videos=99)  # newer and equal, on fewer videos
    assert promote(versions[3], 0.8)  # newer and equal: takes it
    assert champion() == versions[3]
    assert not promote(versions[4], 0.8)  # the same format and equal: stays
    assert not promote(versions[5], 0.8, model_format=1)  # an older one, equal: stays
    assert champion() == versions[3]
    assert client.get_model_version(name, versions[3]).tags["format_version"] == str(
        registry.MODEL_FORMAT
    )


def test_default_store_is_sqlite_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (tmp_path / "runs").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri() == "http://tracking.example:5000"


def test_closed_port_fails_fast_with_a_clear_message() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match="not reachable") as err:
        tracking.check_tracking_reachable(uri)
    assert time.monotonic() - start < 5.0
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    tracking.check_tracking_reachable("sqlite:///anything.db")  # not a server: nothing to check


def test_flatten_params() -> None:
    config = {
        "variant": "late_fusion",
        "model": {"hidden_size": 1024, "taps": ["pool4", "conv5_3"], "pyramid": True},
        "train": {"lr": 0.001, "grad_clip": None, "nested": {"deep": 1}},
    }
    assert tracking.flatten_params(config) == {
        "variant": "late_fusion",
        "model.hidden_size": "1024",
        "model.taps": '["pool4", "conv5_3"]',
        "model.pyramid": "True",
        "train.lr": "0.001",
        "train.grad_clip": "None",
        "train.nested.deep": "1",
    }
    assert tracking.flatten_params({"a": 1}, prefix="cfg.") == {"cfg.a": "1"}
    assert registry.registered_model_name("ucf101") == "jlstm-ucf101"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback for this module's server tests."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


def test_log_register_and_load_through_a_real_server(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        tracking.check_tracking_reachable(mlflow_server)
        experiment_id = tracking.get_or_create_experiment("server-test")
        assert tracking.get_or_create_experiment("server-test") == experiment_id
        net = small_net()
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params(tracking.flatten_params({"model": net.cfg.model_dump(mode="json")}))
            mlflow.log_metric("val_video_top1_vote", 0.75, step=1)
            info = registry.log_model(net, net.cfg, CLASS_NAMES, registered_model_name=REGISTERED)
        version = info.registered_model_version
        assert registry.promote_if_better(
            REGISTERED, version, split=1, video_top1=0.75, test_videos=10,
            dataset_digest="d1",
        )
        loaded = registry.load_model(f"models:/{REGISTERED}@{registry.CHAMPION_ALIAS}")
        assert_same_outputs(net, loaded.net)
        logged_run = MlflowClient().get_run(run.info.run_id)
        assert logged_run.data.params["model.hidden_size"] == "32"
        assert logged_run.data.metrics["val_video_top1_vote"] == 0.75
    finally:
        mlflow.set_tracking_uri(None)
