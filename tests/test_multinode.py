"""Multi-node Ray on loopback: workers spread over nodes, a lost node, distributed evaluation.

`ray.cluster_utils.Cluster` (conftest): a head that runs no work and three worker nodes of
3 logical CPUs. Training workers ask for 2 CPUs each, so no two share a node and each
node keeps 1 CPU for Ray Data. The training controller and Ray Data's split coordinator
live on the driver's node (the head), as on a real cluster. Logical GPUs (`num_gpus` on
added nodes) test placement without starting CUDA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from mlflow.tracking import MlflowClient
from mlflow_server import free_port
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray_processes import stop_ray_processes
from tiny_run import EPOCHS, tiny_config

from data_shards.errors import BadDataError
from data_shards.synth import synthesize_dataset
from model import ModelConfig
from orchestration import registry
from orchestration.checkpoint import TrainState
from orchestration.config import ClusterConfig, JlstmConfig, validate_config
from orchestration.errors import ConfigError
from orchestration.inference import evaluate_distributed, evaluate_model
from orchestration.resources import NodeShape, live_nodes, plan_live, plan_resources
from orchestration.run import SplitResult, train_split
from orchestration.session import check_nodes_see_run

pytestmark = pytest.mark.slow
WORKER_CPUS = 2.0
SPREAD_EPOCHS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_dataset(
        tmp_path_factory.mktemp("videos"), layout="ucf101", classes=2, videos_per_class=6,
        seed=3, frame_size=64, num_frames=16,
    )


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Checkpoint storage (every simulated node sees this machine's disk) and MLflow."""
    root = tmp_path_factory.mktemp("multinode")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    yield root / "ray"
    patch.undo()


def _config(dataset: Path, storage: Path, run_name: str, epochs: int) -> JlstmConfig:
    return validate_config(tiny_config(
        dataset, storage, run_name, train={"epochs": epochs},
        cluster={"cpus_per_worker": WORKER_CPUS, "max_failures": 2},
        tracking={"experiment": "test-multinode", "attention_examples": 0,
                  "system_metrics_interval_s": 2},
    ))


def _worker_group_placements() -> dict[str, list[str]]:
    """Placement group id -> node id of each bundle, for every training worker group seen.

    Ray Train places its workers with one placement group of `num_workers` bundles.
    """
    return {
        pg_id: list(pg["bundles_to_node_id"].values())
        for pg_id, pg in placement_group_table().items()
        if pg["bundles"] and all(b.get("CPU") == WORKER_CPUS for b in pg["bundles"].values())
        and pg["bundles_to_node_id"]
    }


def _wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


class Background:
    """`fn()` in a thread; `result()` re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._box["value"] = fn()
        except BaseException as err:
            self._box["error"] = err

    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"still running after {timeout_s:g} s"
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def _epoch_steps(run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, metric))


@pytest.fixture(scope="module")
def spread_run(
    multinode_cluster: Any, dataset: Path, storage: Path
) -> tuple[JlstmConfig, SplitResult, list[str]]:
    """A 2-worker DDP run on the cluster, and the nodes its workers were placed on."""
    cfg = _config(dataset, storage, "spread", SPREAD_EPOCHS)
    run = Background(lambda: train_split(cfg))
    placements = _wait_for(_worker_group_placements, 300, "the training workers' placement")
    return cfg, run.result(600), next(iter(placements.values()))


def test_two_workers_spread_over_two_nodes_and_are_tracked(
    spread_run: tuple[JlstmConfig, SplitResult, list[str]],
) -> None:
    _, result, worker_nodes = spread_run
    head = ray.get_runtime_context().get_node_id()
    assert len(set(worker_nodes)) == 2 and head not in worker_nodes
    for metric in ("loss_total", "val_video_top1_vote", "epoch"):
        assert _epoch_steps(result.run_id, metric) == list(range(1, SPREAD_EPOCHS + 1)), metric
    name = registry.registered_model_name("ucf101")
    assert MlflowClient().get_model_version(name, result.model_version).run_id == result.run_id


def test_evaluation_on_one_and_two_workers_agrees(
    spread_run: tuple[JlstmConfig, SplitResult, list[str]], tmp_path: Path
) -> None:
    cfg, result, _ = spread_run
    state = TrainState.load(Path(result.checkpoint_dir))
    one = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"num_workers": 1})})
    on_one = evaluate_distributed(
        one, ModelConfig.model_validate(state.model_config), state.model,
        state.class_names, tmp_path / "one",
    )
    # The registered model (same weights) through `jlstm eval`'s path, on 2 workers.
    name = registry.registered_model_name("ucf101")
    on_two = evaluate_model(f"models:/{name}/{result.model_version}", cfg, tmp_path / "two")
    assert on_one.pop("seconds") > 0 and on_two.pop("seconds") > 0
    # One worker scores every test clip; each of two scores a share (none idles).
    clips_one, clips_two = on_one.pop("worker_clips_min"), on_two.pop("worker_clips_min")
    assert 0 < clips_two <= clips_one / 2
    assert on_one == on_two
    # And the training run's own last evaluation (2 workers, distributed) agrees.
    last = state.history[-1]
    assert {k: on_one[k] for k in ("video_top1_vote", "clip_top1_prob", "video_top5_prob")} == {
        k: last[f"val_{k}"] for k in ("video_top1_vote", "clip_top1_prob", "video_top5_prob")
    }
    assert (tmp_path / "two" / "confusion_matrix.png").is_file()


def test_planner_waits_for_gpu_nodes_and_places_one_worker_per_gpu_node(
    multinode_cluster: Any,
) -> None:
    cluster = ClusterConfig(num_workers=2, use_gpu=True, cpus_per_worker=1)
    messages: list[str] = []
    planning = Background(lambda: plan_live(
        lambda nodes: plan_resources(cluster, 0.5, nodes), wait_s=120, poll_s=0.5,
        say=messages.append,
    ))
    _wait_for(lambda: messages, 30, "the planner's waiting message")
    assert "waiting" in messages[0] and "need 2 GPUs" in messages[0]
    assert planning.alive()
    gpu_nodes = [
        multinode_cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * 2**20)
        for _ in range(2)
    ]
    try:
        plan = planning.result(60)
        nodes = live_nodes()
        assert plan.fits
        assert {nodes[w.node].node_id for w in plan.workers} == {n.node_id for n in gpu_nodes}
        # Ray places the plan's bundles the same way: one per GPU node.
        pg = placement_group([plan.worker_resources()] * plan.num_workers, strategy="PACK")
        ray.get(pg.ready(), timeout=60)
        placed = placement_group_table(pg)["bundles_to_node_id"].values()
        assert sorted(placed) == sorted(n.node_id for n in gpu_nodes)
        remove_placement_group(pg)
    finally:
        for node in gpu_nodes:
            multinode_cluster.remove_node(node)


def test_run_survives_losing_a_worker_node(
    multinode_cluster: Any, dataset: Path, storage: Path
) -> None:
    # Long enough that the run is still going when the first checkpoint appears.
    cfg = _config(dataset, storage, "node-loss", EPOCHS)
    seen_before = set(_worker_group_placements())
    run = Background(lambda: train_split(cfg))
    first_checkpoint = storage / "node-loss"
    _wait_for(lambda: list(first_checkpoint.glob("checkpoint_*/state.pt")), 400,
              "the first epoch's checkpoint")
    assert run.alive(), "the run finished before a node could be removed: make it longer"
    groups = {k: v for k, v in _worker_group_placements().items() if k not in seen_before}
    (worker_nodes,) = groups.values()
    victim = next(n for n in multinode_cluster.worker_nodes if n.node_id in worker_nodes)
    multinode_cluster.remove_node(victim)

    result = run.result(600)
    # The worker group was placed again, without the lost node.
    seen = seen_before | set(groups)
    regrouped = [v for k, v in _worker_group_placements().items() if k not in seen]
    assert regrouped and all(victim.node_id not in nodes for nodes in regrouped)
    # Every epoch in MLflow exactly once (a re-run epoch would show up twice here).
    for metric in ("epoch", "loss_total", "val_video_top1_vote"):
        assert _epoch_steps(result.run_id, metric) == list(range(1, EPOCHS + 1)), metric
    assert TrainState.load(Path(result.checkpoint_dir)).epoch == EPOCHS
    name = registry.registered_model_name("ucf101")
    assert MlflowClient().get_model_version(name, result.model_version).run_id == result.run_id


PRIVATE_DISK = "private_disk"  # the custom resource that finds the node with its own disk


def _private_node(cluster: Any, private: Path, home: Path, log: Path) -> subprocess.Popen:
    """A node that joins `cluster` from a mount namespace of its own, with an empty tmpfs
    over `private`: what the driver writes there, that node does not see (a node whose
    local disk is not the driver's). 0 CPUs: the other tests never place work on it."""
    ray_bin = Path(sys.executable).parent / "ray"
    ports = " ".join(
        f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port",
        )
    )
    ip = cluster.address.rsplit(":", 1)[0]
    script = (
        f"mount -t tmpfs tmpfs {private} && exec {ray_bin} start --block "
        f"--address={cluster.address} --node-ip-address={ip} --num-cpus=0 "
        f"--resources='{{\"{PRIVATE_DISK}\": 1}}' {ports}"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HOME": str(home)}
    # A HOME of its own (its processes are found by it), holding the cluster's token: once
    # ~/.ray/auth_token exists, Ray turns token auth on for the clusters this process starts
    # (RAY_AUTH_MODE=token in its environment), and a node without the token cannot join.
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        (home / ".ray").mkdir(exist_ok=True)
        shutil.copy(token, home / ".ray" / "auth_token")
    with log.open("w") as out:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )



def test_a_node_that_does_not_see_the_data_or_the_storage_is_refused(
    multinode_cluster: Any, dataset: Path, storage: Path, tmp_path: Path
) -> None:
    """The planner's nodes are probed before training: the loopback cluster's nodes share
    this disk and pass; a node with its own disk over the storage folder, or over the
    feature cache, is refused in one line naming the key, the path and the node."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is not permitted here (needs CAP_SYS_ADMIN)")
    shared = _config(dataset, storage, "probe", 1)
    check_nodes_see_run(shared, live_nodes())  # every node of the loopback cluster

    private, home = tmp_path / "private", tmp_path / "home"
    (private / "ray").mkdir(parents=True)
    (private / "features").mkdir()
    home.mkdir()
    node = _private_node(multinode_cluster, private, home, tmp_path / "node.log")
    try:
        (shape,) = _wait_for(
            lambda: [n for n in ray.nodes() if n["Alive"] and PRIVATE_DISK in n["Resources"]],
            300, "the node with its own disk",
        )
        nodes = [NodeShape(0, 0, shape["NodeManagerAddress"] + " private", shape["NodeID"])]
        check_nodes_see_run(shared, nodes)  # data and storage outside `private`: seen there

        own_storage = shared.model_copy(update={"cluster": shared.cluster.model_copy(
            update={"storage_path": str(private / "ray")}
        )})
        with pytest.raises(ConfigError, match=r"cluster\.storage_path") as refused:
            check_nodes_see_run(own_storage, nodes)
        assert str(private / "ray") in str(refused.value)
        assert "private" in str(refused.value).split("training node")[1]
        assert not list((private / "ray").iterdir())  # the probe file is removed

        own_cache = shared.model_copy(update={"data": shared.data.model_copy(update={
            "feature_cache": str(private / "features"), "use_feature_cache": True,
        })})
        with pytest.raises(BadDataError, match=r"data\.feature_cache") as missing:
            check_nodes_see_run(own_cache, nodes)
        assert str(private / "features") in str(missing.value)
    finally:
        stop_ray_processes(node, home)
