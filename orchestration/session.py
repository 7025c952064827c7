"""The Ray session of a run: join or start Ray, plan the run's resources, where it stores.

Every command that runs on Ray goes through `init_ray` (so the nodes it starts keep idle
workers, below) and `plan_run` (the one planner, `orchestration.resources`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from orchestration.config import JlstmConfig, absolute_path
from orchestration.resources import ResourcePlan, cluster_may_grow, plan_live, plan_resources


def plan_run(cfg: JlstmConfig, *, max_runs: int = 1, trial_cpus: float = 0.0) -> ResourcePlan:
    """The resource plan of `cfg` (or of a sweep's concurrent runs) on the live cluster.

    On a cluster jlstm joined it waits up to `cluster.wait_for_resources_s` for the cluster
    to grow; a plan that does not fit is refused with a ConfigError naming the numbers.
    """
    wait = cfg.cluster.wait_for_resources_s if cluster_may_grow() else 0.0
    return plan_live(
        lambda nodes: plan_resources(
            cfg.cluster, cfg.data.decode_cpus, nodes, max_runs=max_runs, trial_cpus=trial_cpus
        ),
        wait,
    )


def run_storage(cfg: JlstmConfig) -> str:
    """`cluster.storage_path` as Ray Train takes it (made absolute when the config loaded)."""
    return absolute_path(cfg.cluster.storage_path)


class RunInUse(RuntimeError):
    """Another process is training this run name right now."""


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
