"""The Ray session of a run: join or start Ray, plan the run's resources, where it stores.

Every command that runs on Ray goes through `init_ray` (so the nodes it starts keep idle
workers, below) and `plan_run` (the one planner, `orchestration.resources`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_shards.errors import BadDataError
from orchestration.config import JlstmConfig, absolute_path, is_uri
from orchestration.errors import ConfigError, RunInUse
from orchestration.resources import (
    NodeShape,
    ResourcePlan,
    cluster_may_grow,
    plan_live,
    plan_resources,
)


def plan_run(cfg: JlstmConfig, *, max_runs: int = 1, trial_cpus: float = 0.0) -> ResourcePlan:
    """The resource plan of `cfg` (or of a sweep's concurrent runs) on the live cluster.

    On a cluster jlstm joined it waits up to `cluster.wait_for_resources_s` for the cluster
    to grow; a plan that does not fit is refused with a ConfigError naming the numbers.
    The nodes the plan puts workers on must see the run's data and share its checkpoint
    storage (`check_nodes_see_run`).
    """
    wait = cfg.cluster.wait_for_resources_s if cluster_may_grow() else 0.0
    plan = plan_live(
        lambda nodes: plan_resources(
            cfg.cluster, cfg.data.decode_cpus, nodes, max_runs=max_runs, trial_cpus=trial_cpus
        ),
        wait,
    )
    check_nodes_see_run(cfg, [plan.nodes[w.node] for w in plan.workers])
    return plan


def run_paths(cfg: JlstmConfig) -> dict[str, str]:
    """The data paths a training node reads, by config key: the feature cache (its workers
    read the taps), else the videos (decode tasks run there too), and the manifest."""
    paths = {"data.manifest": str(cfg.data.manifest_path())}
    if cfg.data.use_feature_cache:
        paths["data.feature_cache"] = str(cfg.data.feature_cache)
    else:
        paths["data.root"] = cfg.data.root
    return paths


@ray.remote(num_cpus=0)
def _node_view(paths: dict[str, str], probe: str | None, token: str) -> tuple[list[str], bool]:
    """On one node: the keys of `paths` missing there, and whether the driver's `probe`
    file reads `token` there (True when there is no probe)."""
    missing = [key for key, path in paths.items() if not os.path.exists(path)]
    if probe is None:
        return missing, True
    try:
        return missing, Path(probe).read_text() == token
    except OSError:
        return missing, False


def check_nodes_see_run(cfg: JlstmConfig, nodes: list[NodeShape]) -> None:
    """Refuse, before anything trains, a run whose training `nodes` (live ones) do not see
    what the driver sees.

    Checked by a task pinned to each node: every path of `run_paths` that exists here must
    exist there (BadDataError naming the key, path and node), and a local
    `cluster.storage_path` must be the same folder there (ConfigError): the driver writes
    a token file into it and each node reads it back. Ray Train restores a run from that
    folder on whatever node a worker lands, so a per-node disk would lose checkpoints on a
    multi-node cluster. Sharing is probed, never inferred from the node count: a loopback
    cluster shares one disk and passes.
    """
    ids = {n.node_id: n for n in nodes if n.node_id}
    if not ids:
        return
    paths = {key: path for key, path in run_paths(cfg).items() if os.path.exists(path)}
    storage = absolute_path(cfg.cluster.storage_path)
    probe, token = None, uuid.uuid4().hex
    if not is_uri(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
        probe = str(Path(storage) / f".jlstm-shared-probe-{token}")
        Path(probe).write_text(token)
    try:
        pending = {
            node_id: _node_view.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            ).remote(paths, probe, token)
            for node_id in ids
        }
        views = {}
        for node_id, ref in pending.items():
            # A node that left since it was planned on trains nothing: no verdict on it.
            with contextlib.suppress(ray.exceptions.TaskUnschedulableError):
                views[node_id] = ray.get(ref)
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
    for node_id, (missing, shared) in views.items():
        node = ids[node_id]
        if missing:
            key = missing[0]
            raise BadDataError(
                f"{key} = {paths[key]} is not there on training node {node.name}: every "
                "training node reads it; put it on a mount all nodes share, at the same path"
            )
        if not shared:
            raise ConfigError(
                f"cluster.storage_path = {storage} is not shared with training node "
                f"{node.name} (a file written there here is not seen there): checkpoints "
                "would not restore the run on another node; set it to a mount every node "
                "shares, at the same path, or to a URI (s3://..., gs://...)"
            )


def run_storage(cfg: JlstmConfig) -> str:
    """`cluster.storage_path` as Ray Train takes it (made absolute when the config loaded)."""
    return absolute_path(cfg.cluster.storage_path)


# Named actors of other jobs are visible only inside a namespace they share.
LOCK_NAMESPACE = "jlstm-locks"


@ray.remote(num_cpus=0)
class _RunLock:
    """Held while a run trains: its name is the lock, its state says who holds it."""

    def __init__(self, holder: str) -> None:
        self.holder = holder

    def who(self) -> str:
        return self.holder


@contextmanager
def run_lock(run_name: str) -> Iterator[None]:
    """One writer per run name on the cluster: a named actor that only one process can
    create. It belongs to this driver, so Ray removes it when the driver exits, however
    it exits: a crashed run never leaves the name locked.

    Raises:
        RunInUse: another driver holds the name (the message says which host and pid).
    """
    name = f"run:{run_name}"
    me = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}"
    try:
        lock = _RunLock.options(name=name, namespace=LOCK_NAMESPACE).remote(me)
    except ValueError:  # the name is taken
        try:
            holder = ray.get(ray.get_actor(name, namespace=LOCK_NAMESPACE).who.remote())
        except (ValueError, ray.exceptions.RayActorError):
            holder = "a process that is just ending"
        raise RunInUse(
            f"run {run_name!r} is being trained by {holder}: wait for it to finish, or "
            "start another run (--new-run, or --set run_name=...)"
        ) from None
    try:
        ray.get(lock.who.remote())  # created, not only asked for
        yield
    finally:
        ray.kill(lock)
