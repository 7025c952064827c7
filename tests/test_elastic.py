"""Elastic training on a loopback cluster: a run that loses a node goes on with fewer
workers, and grows back when a node comes (`cluster.min_workers`).

A head with no CPUs and 2 worker nodes of 3 logical CPUs; the run asks for 2 workers of
2 CPUs (one a node, 1 CPU beside each for Ray Data) and accepts 1. No spare node: today's
fixed-size run would wait for one. Ray Train's timers are lowered as its own elastic test
does (the worker-group start timeout; `cluster.resize_interval_s` is the run's own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import add_worker_node, loopback_cluster
from mlflow.tracking import MlflowClient
from ray.util.placement_group import placement_group_table
from test_multinode import Background, _wait_for, _worker_group_placements
from tiny_run import tiny_config

from data_shards.datasets import train_clip_table
from data_shards.synth import synthesize_dataset
from orchestration import registry, tracking
from orchestration.batching import steps_per_epoch
from orchestration.checkpoint import TrainState
from orchestration.config import JlstmConfig, validate_config
from orchestration.metrics import (
    TRAIN_GLOBAL_BATCH,
    TRAIN_STEPS,
    VAL_VIDEOS_SCORED,
    VAL_VIDEOS_UNSCORED,
    WORLD_SIZE,
)
from orchestration.run import train_split

pytestmark = pytest.mark.slow
EPOCHS = 14  # long enough to shrink and grow back within the run (it took 7 epochs here)
GLOBAL_BATCH = 8
# Ray Train's wait for a worker group to start (default 60 s): after a node is lost, its
# view of free resources can lag (refreshed every 20 s inside its actors), so a start
# may wait that long before it is retried with what is there.
START_TIMEOUT_S = "20"


@pytest.fixture(scope="module")
def elastic_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    patch = pytest.MonkeyPatch()
    # Before the cluster starts: the training controller inherits its node's environment.
    patch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", START_TIMEOUT_S)
    patch.setenv("MLFLOW_TRACKING_URI",
                 f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    try:
        with loopback_cluster(2) as cluster:
            yield cluster
    finally:
        patch.undo()


def _live_worker_group_nodes() -> list[str]:
    """The nodes of the training worker group placed now (Ray Train places its workers with
    one placement group; the groups of earlier starts are removed)."""
    created = {pg_id for pg_id, pg in placement_group_table().items()
               if pg["state"] == "CREATED"}
    (nodes,) = [v for k, v in _worker_group_placements().items() if k in created]
    return nodes


def _history(run_id: str, metric: str) -> list[tuple[int, float, int]]:
    """(epoch, value, timestamp ms) of every logged value of `metric`, in epoch order."""
    values = MlflowClient().get_metric_history(run_id, metric)
    return sorted((m.step, m.value, m.timestamp) for m in values)


def _run_id(cfg: JlstmConfig) -> str | None:
    """The MLflow run of `cfg` once the driver has started it."""
    experiment = MlflowClient().get_experiment_by_name(cfg.tracking.experiment)
    return tracking.find_run(cfg, experiment.experiment_id) if experiment else None


def _elastic_config(tmp_path: Path, run_name: str, epochs: int, **cluster: Any) -> JlstmConfig:
    """The tiny run with 2 workers of 2 CPUs that accepts 1 (`cluster.min_workers`)."""
    videos = synthesize_dataset(
        tmp_path / "videos", layout="ucf101", classes=2, videos_per_class=6, seed=3,
        frame_size=64, num_frames=16,
    )
    return validate_config(tiny_config(
        videos, tmp_path / "ray", run_name,
        train={"epochs": epochs, "batch_size": GLOBAL_BATCH},
        cluster={"cpus_per_worker": 2.0, "num_workers": 2, "min_workers": 1,
                 "resize_interval_s": 5, **cluster},
        tracking={"experiment": "test-elastic", "attention_examples": 0,
                  "system_metrics_interval_s": None},
    ))


def test_a_run_shrinks_when_a_node_is_lost_and_grows_back_when_one_comes(
    elastic_cluster: Any, tmp_path: Path
) -> None:
    cfg = _elastic_config(tmp_path, "elastic", EPOCHS, max_failures=3)
    started = time.monotonic()
    run = Background(lambda: train_split(cfg))
    run_id = _wait_for(lambda: _run_id(cfg), 300, "the MLflow run")

    # Shrink: once an epoch trained on 2 workers is logged, remove one of their nodes.
    _wait_for(lambda: _history(run_id, WORLD_SIZE), 400, "the first epoch")
    nodes = _live_worker_group_nodes()
    victim = next(n for n in elastic_cluster.worker_nodes if n.node_id in nodes)
    elastic_cluster.remove_node(victim)
    removed_at = time.time() * 1000
    _wait_for(lambda: any(v == 1 for _, v, _ in _history(run_id, WORLD_SIZE)), 400,
              "an epoch trained on 1 worker")
    assert run.alive(), "the run ended before it could grow back: give it more epochs"

    # Grow: a node comes; the run goes back to 2 workers within the run.
    add_worker_node(elastic_cluster)
    added_at = time.time() * 1000
    result = run.result(900)
    wall_s = time.monotonic() - started

    # Every epoch logged exactly once, whatever the resizes.
    for metric in ("epoch", "loss_total", "val_video_top1_vote", WORLD_SIZE, TRAIN_STEPS):
        assert [e for e, _, _ in _history(result.run_id, metric)] == list(
            range(1, EPOCHS + 1)
        ), metric
    sizes = [int(v) for _, v, _ in _history(result.run_id, WORLD_SIZE)]
    first_one, last_one = sizes.index(1), len(sizes) - 1 - sizes[::-1].index(1)
    assert sizes[0] == 2 and set(sizes[first_one:last_one + 1]) == {1}
    assert sizes[last_one + 1:] and set(sizes[last_one + 1:]) == {2}, sizes
    # The same training at every size: the optimizer steps and the global batch of each
    # epoch, before and after each resize.
    state = TrainState.load(Path(result.checkpoint_dir))
    assert state.epoch == EPOCHS
    steps = {e: int(v) for e, v, _ in _history(result.run_id, TRAIN_STEPS)}
    batches = {e: int(v) for e, v, _ in _history(result.run_id, TRAIN_GLOBAL_BATCH)}
    clips = train_clip_table(cfg.data, cfg.clip_spec(2), pq.read_table(
        cfg.data.manifest_path())).num_rows
    assert set(steps.values()) == {steps_per_epoch(clips, GLOBAL_BATCH)}, steps
    assert set(batches.values()) == {GLOBAL_BATCH}
    # Every test clip scored once at each size: every test video has a score.
    unscored = _history(result.run_id, VAL_VIDEOS_UNSCORED)
    assert all(v == 0 for _, v, _ in unscored)
    assert len({v for _, v, _ in _history(result.run_id, VAL_VIDEOS_SCORED)}) == 1
    name = registry.registered_model_name("ucf101")
    assert MlflowClient().get_model_version(name, result.model_version).run_id == result.run_id

    # How long the run stood still: from the removal (the addition) to the next epoch
    # logged at the new size, against an ordinary epoch's length. Written for the record.
    stamps = {e: t for e, _, t in _history(result.run_id, "epoch")}
    epoch_ms = sorted(stamps[e + 1] - stamps[e] for e in range(1, EPOCHS)
                      if sizes[e - 1] == sizes[e])
    record = {
        "epochs": EPOCHS, "world_sizes": sizes, "steps_per_epoch": steps[1],
        "ordinary_epoch_s": epoch_ms[len(epoch_ms) // 2] / 1000,
        "removal_to_first_1_worker_epoch_s": (stamps[first_one + 1] - removed_at) / 1000,
        "addition_to_first_2_worker_epoch_s": (stamps[last_one + 2] - added_at) / 1000,
        "run_wall_s": wall_s,
    }
    out = os.environ.get("JLSTM_ELASTIC_RECORD")
    if out:
        Path(out).write_text(json.dumps(record, indent=2))
    print("elastic run:", json.dumps(record))


def test_a_preempted_node_counts_apart_from_failures(
    elastic_cluster: Any, tmp_path: Path
) -> None:
    """A node drained for preemption (what a spot node's interruption notice does through
    Ray's drain API) and then gone: with `max_failures: 0` the run would end at a worker
    error, but a preemption counts against `max_preemption_failures` and the run goes on
    with the worker left."""
    epochs = 4
    cfg = _elastic_config(tmp_path, "preempted", epochs, max_failures=0,
                          max_preemption_failures=1)
    run = Background(lambda: train_split(cfg))
    run_id = _wait_for(lambda: _run_id(cfg), 300, "the MLflow run")
    _wait_for(lambda: _history(run_id, WORLD_SIZE), 400, "the first epoch")
    nodes = _live_worker_group_nodes()
    victim = next(n for n in elastic_cluster.worker_nodes if n.node_id in nodes)
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "drain-node",
         f"--address={elastic_cluster.address}", f"--node-id={victim.node_id}",
         "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot interruption",
         "--deadline-remaining-seconds=5"],
        check=True, capture_output=True, timeout=60,
    )
    time.sleep(5)
    elastic_cluster.remove_node(victim)
    try:
        result = run.result(900)
    finally:
        add_worker_node(elastic_cluster)
    sizes = [int(v) for _, v, _ in _history(result.run_id, WORLD_SIZE)]
    assert [e for e, _, _ in _history(result.run_id, "epoch")] == list(range(1, epochs + 1))
    assert sizes[0] == 2 and 1 in sizes, sizes
