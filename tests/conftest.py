"""Shared fixtures: one local Ray cluster for the session, and a multi-node one on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Never join a cluster the suite did not start: `ray.init()` (and a `jlstm` subprocess a
# test starts without its own RAY_ADDRESS) would join a developer's running `ray start`
# cluster. "local" makes both start their own; a test that wants its cluster says so.
os.environ["RAY_ADDRESS"] = "local"

# What each simulated worker node offers: 3 logical CPUs, so one 2-CPU training worker
# fits per node with 1 CPU left beside it for Ray Data; a small object store each.
WORKER_NODE_CPUS = 3
NODE_OBJECT_STORE_BYTES = 150 * 2**20


def _start_local_ray() -> None:
    """A real local Ray cluster of 2 logical CPUs (this machine's cores)."""
    import ray

    from data_shards.cluster import RAY_NODE_ENV

    # Also reaches the `ray start --head` cluster of the job-submission test and the
    # raylets of the multi-node cluster.
    for key, value in RAY_NODE_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """The local Ray cluster, started once and shared by every test that needs one."""
    import ray

    _start_local_ray()
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def loopback_cluster(worker_nodes: int) -> Iterator[object]:
    """`ray.cluster_utils.Cluster` on loopback: a head with no CPUs and `worker_nodes` nodes
    of `WORKER_NODE_CPUS`, the driver (this process) connected to it; the session's local
    cluster, if it was running, is started again afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    from data_shards.cluster import RAY_NODE_ENV

    was_running = ray.is_initialized()
    ray.shutdown()
    for key, value in RAY_NODE_ENV.items():
        os.environ.setdefault(key, value)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "include_dashboard": False,
            "object_store_memory": NODE_OBJECT_STORE_BYTES,
        },
    )
    try:
        for _ in range(worker_nodes):
            add_worker_node(cluster)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_running:
            _start_local_ray()


def add_worker_node(cluster: object) -> object:
    """One more worker node of `WORKER_NODE_CPUS` logical CPUs."""
    return cluster.add_node(  # type: ignore[attr-defined]
        num_cpus=WORKER_NODE_CPUS, object_store_memory=NODE_OBJECT_STORE_BYTES
    )


@pytest.fixture(scope="module")
def multinode_cluster() -> Iterator[object]:
    """A loopback cluster of 3 worker nodes (`loopback_cluster`), for the module."""
    with loopback_cluster(3) as cluster:
        yield cluster
