"""The one resource planner: which node each training worker lands on, and what Ray Data keeps.

Used by `jlstm train`, `jlstm tune`, `jlstm data features` and `jlstm plan` (the dry run).
A plan is computed from node shapes, the live cluster's (`live_nodes`) or ones a user names
(`parse_nodes("4x8:1")`), so a plan for a cluster that does not exist yet is the same code.

- GPU cluster (`cluster.use_gpu`): each training worker is one bundle of 1 GPU plus
  `cluster.cpus_per_worker` CPUs (default `GPU_WORKER_CPUS`), and it must fit on one node.
  Every other CPU is Ray Data's: it decodes clips or reads the feature cache for the GPUs.
- CPU-only cluster: the workers share what is left after Ray Data's reserve (at least one
  whole CPU on one node: its shuffle and repartition tasks each ask for one), unless
  `cluster.cpus_per_worker` fixes their size.
- Sweeps plan several runs at once (`max_runs`), each with a small driver bundle
  (`trial_cpus`), and take the largest number of runs that fits.

Bundles are placed first-fit in node order, GPU bundles first, the way Ray's PACK strategy
fills nodes; a bundle never spans nodes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from orchestration.config import ClusterConfig
from orchestration.errors import ConfigError

log = logging.getLogger(__name__)

# CPUs a GPU worker holds by default: its training process and the thread that pulls
# batches from Ray Data. The rest of the node feeds the GPU (decode or cache reads).
GPU_WORKER_CPUS = 2.0
# Ray Data's shuffle and repartition tasks ask for one whole CPU each, whatever the decode
# stage's own budget, so at least this much stays free on one node.
DATA_PIPELINE_MIN_CPUS = 1.0
# Ray's resource granularity is 1e-4; sizes are rounded down to a thousandth so the sum of
# all requests never exceeds what a node has.
_STEP = 1000
_EPS = 1e-9
_SHAPE = re.compile(r"^(\d+)x(\d+(?:\.\d+)?)(?::(\d+))?$")


@dataclass(frozen=True)
class NodeShape:
    """What one node offers Ray: logical CPUs and GPUs, and a name for messages."""

    cpus: float
    gpus: float = 0.0
    name: str = ""
    node_id: str = ""  # Ray's node id, for live nodes


@dataclass(frozen=True)
class WorkerPlacement:
    """One training worker's bundle and the node (index into the plan's nodes) it lands on."""

    node: int
    CPU: float
    GPU: float


@dataclass(frozen=True)
class ResourcePlan:
    """Where a run's workers go and what is left for Ray Data; `fits` false says why not."""

    fits: bool
    reason: str
    num_workers: int  # the workers placed: the most of [min_workers, max_workers] that fit
    cpus_per_worker: float
    gpus_per_worker: float
    concurrent_runs: int
    trial_cpus: float
    workers: list[WorkerPlacement]  # the first run's workers
    data_cpus: float  # CPUs no bundle holds, for Ray Data (0 when it does not fit)
    nodes: list[NodeShape] = field(default_factory=list)
    min_workers: int = 0  # an elastic run's range (both num_workers when the size is fixed)
    max_workers: int = 0

    @property
    def elastic(self) -> bool:
        """Whether Ray Train may resize the run between `min_workers` and `max_workers`."""
        return self.min_workers < self.max_workers

    def scaling_workers(self) -> int | tuple[int, int]:
        """`ScalingConfig.num_workers`: the fixed size, or an elastic run's (min, max)."""
        return (self.min_workers, self.max_workers) if self.elastic else self.num_workers

    def worker_resources(self) -> dict[str, float]:
        """`ScalingConfig.resources_per_worker` of this plan."""
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def to_dict(self) -> dict:
        """JSON-ready: the plan's numbers, the workers and the node shapes."""
        out = asdict(self)
        out["nodes"] = [asdict(n) for n in self.nodes]
        out["node_shapes"] = describe_nodes(self.nodes)
        return out


def parse_nodes(shapes: Sequence[str]) -> list[NodeShape]:
    """Node shapes `COUNTxCPU[:GPU]` (e.g. `1x8`, `4x8:1`) -> one NodeShape per node."""
    nodes: list[NodeShape] = []
    for shape in shapes:
        match = _SHAPE.match(shape.strip())
        if not match or int(match.group(1)) < 1:
            raise ConfigError(
                f"--nodes {shape!r}: expected COUNTxCPU[:GPU], e.g. 1x8 or 4x8:1"
            )
        count, cpus, gpus = int(match.group(1)), float(match.group(2)), match.group(3)
        for _ in range(count):
            nodes.append(NodeShape(cpus, float(gpus or 0), f"node{len(nodes)}"))
    return nodes


def live_nodes() -> list[NodeShape]:
    """The alive nodes of the connected Ray cluster, head first, as they report themselves."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    # The head carries the `node:__internal_head__` resource.
    alive.sort(key=lambda n: "node:__internal_head__" not in n["Resources"])
    return [
        NodeShape(
            float(n["Resources"].get("CPU", 0)),
            float(n["Resources"].get("GPU", 0)),
            f"{n['NodeManagerAddress']} {n['NodeID'][:8]}",
            n["NodeID"],
        )
        for n in alive
    ]


def describe_nodes(nodes: Sequence[NodeShape]) -> str:
    """`1x8, 4x8:1`: the shapes in node order, runs of equal shapes counted."""
    parts: list[tuple[int, float, float]] = []
    for n in nodes:
        if parts and parts[-1][1:] == (n.cpus, n.gpus):
            parts[-1] = (parts[-1][0] + 1, n.cpus, n.gpus)
        else:
            parts.append((1, n.cpus, n.gpus))
    return ", ".join(f"{c}x{cpu:g}" + (f":{gpu:g}" if gpu else "") for c, cpu, gpu in parts)


@dataclass
class _Placement:
    worker_nodes: list[int]  # node of each worker bundle, run by run
    free: list[float]  # CPUs left on each node


def _place(
    nodes: Sequence[NodeShape], runs: int, workers: int, cpus: float, gpus: float, driver: float
) -> _Placement | None:
    """First-fit of `runs` x (driver bundle + `workers` worker bundles); None if one fails."""
    free_cpu = [n.cpus for n in nodes]
    free_gpu = [n.gpus for n in nodes]

    def put(cpu: float, gpu: float) -> int | None:
        for i in range(len(nodes)):
            if free_cpu[i] + _EPS >= cpu and free_gpu[i] + _EPS >= gpu:
                free_cpu[i] -= cpu
                free_gpu[i] -= gpu
                return i
        return None

    # The biggest bundles first (GPU ones, then the workers' CPUs, then the drivers').
    worker_nodes = []
    for _ in range(runs * workers):
        node = put(cpus, gpus)
        if node is None:
            return None
        worker_nodes.append(node)
    for _ in range(runs if driver else 0):
        if put(driver, 0.0) is None:
            return None
    return _Placement(worker_nodes, free_cpu)


def plan_resources(
    cluster: ClusterConfig,
    decode_cpus: float,
    nodes: Sequence[NodeShape],
    *,
    max_runs: int = 1,
    trial_cpus: float = 0.0,
) -> ResourcePlan:
    """Size and place the training workers of up to `max_runs` concurrent runs on `nodes`.

    An elastic run (`cluster.min_workers` below `num_workers`) is placed with the most
    workers that fit, down to `min_workers`: Ray Train starts it at that size and grows it
    when nodes come. Never raises for a plan that does not fit: the plan says `fits=False`
    and why, naming the node shapes and the numbers (`require_fit` turns that into a
    ConfigError).
    """
    fewest, most = cluster.fewest_workers, cluster.num_workers
    for workers in range(most, fewest - 1, -1):
        plan = _plan_workers(cluster, workers, decode_cpus, nodes, max_runs, trial_cpus)
        if plan.fits:
            break
    return replace(plan, min_workers=fewest, max_workers=most)


def _plan_workers(
    cluster: ClusterConfig,
    workers: int,
    decode_cpus: float,
    nodes: Sequence[NodeShape],
    max_runs: int,
    trial_cpus: float,
) -> ResourcePlan:
    """The plan of `plan_resources` for exactly `workers` workers per run."""
    gpus = 1.0 if cluster.use_gpu else 0.0
    reserve = max(decode_cpus, DATA_PIPELINE_MIN_CPUS)
    total_cpus = sum(n.cpus for n in nodes)
    total_gpus = sum(n.gpus for n in nodes)
    shape = describe_nodes(nodes) or "no nodes"
    key = "cluster.num_workers" if workers == cluster.num_workers else "cluster.min_workers"

    def fits(runs: int, cpus: float) -> _Placement | None:
        placed = _place(nodes, runs, workers, cpus, gpus, trial_cpus)
        if placed is None or max(placed.free, default=0.0) + _EPS < reserve:
            return None
        return placed

    def refuse(reason: str, cpus: float) -> ResourcePlan:
        return ResourcePlan(False, reason, workers, cpus, gpus, 0, trial_cpus, [], 0.0,
                            list(nodes))

    if gpus and total_gpus < workers * gpus:
        return refuse(
            f"{key} = {workers} workers of 1 GPU each need {workers} GPUs; the nodes ({shape}) "
            f"have {total_gpus:g}: set {key} <= {int(total_gpus)} or add GPU nodes",
            cluster.cpus_per_worker or GPU_WORKER_CPUS,
        )
    fixed = cluster.cpus_per_worker or (GPU_WORKER_CPUS if gpus else None)
    probe = fixed or 1.0
    most = max(1, max_runs)
    if gpus:
        most = min(most, int(total_gpus // (workers * gpus)))
    runs = next((k for k in range(most, 1, -1) if fits(k, probe)), 1)
    if fixed is not None:
        cpus = fixed
    else:
        # The largest per-worker share (in thousandths) that still places and leaves Ray
        # Data its reserve; with identical bundles first-fit gets only easier as they shrink.
        cap = math.floor((total_cpus - reserve - runs * trial_cpus) / (runs * workers) * _STEP)
        lo, hi = 0, max(cap, 0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(runs, mid / _STEP) else (lo, mid - 1)
        cpus = lo / _STEP
    placed = fits(runs, cpus) if cpus > 0 else None
    if placed is None:
        return refuse(_why_not(nodes, shape, workers, key, cpus, gpus, reserve, decode_cpus,
                               trial_cpus, fixed is None), cpus)
    used = placed.worker_nodes[:workers]
    return ResourcePlan(
        fits=True, reason="", num_workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus,
        concurrent_runs=runs, trial_cpus=trial_cpus,
        workers=[WorkerPlacement(node, cpus, gpus) for node in used],
        data_cpus=round(sum(placed.free), 3), nodes=list(nodes),
    )


def _why_not(
    nodes: Sequence[NodeShape], shape: str, workers: int, key: str, cpus: float, gpus: float,
    reserve: float, decode_cpus: float, trial_cpus: float, auto: bool,
) -> str:
    """The one line that says which number does not fit which node shape."""
    bundle = f"{cpus:g} CPU" + (" + 1 GPU" if gpus else "")
    data = (f"Ray Data's {reserve:g} whole CPU on one node (data.decode_cpus = "
            f"{decode_cpus:g}, at least {DATA_PIPELINE_MIN_CPUS:g})")
    driver = f" and a {trial_cpus:g}-CPU trial driver" if trial_cpus else ""
    if auto:
        return (f"{workers} training workers{driver} plus {data} do not fit the nodes "
                f"({shape}): lower {key} or data.decode_cpus")
    if not any(n.cpus + _EPS >= cpus and n.gpus + _EPS >= gpus for n in nodes):
        return (f"a worker bundle of {bundle} (cluster.cpus_per_worker = {cpus:g}) fits no "
                f"single node ({shape}): lower cluster.cpus_per_worker")
    return (f"{workers} workers x ({bundle}){driver} plus {data} do not fit the nodes "
            f"({shape}): lower {key} or cluster.cpus_per_worker")


def require_fit(plan: ResourcePlan) -> ResourcePlan:
    """The plan, or a ConfigError with its reason."""
    if not plan.fits:
        raise ConfigError(plan.reason)
    return plan


def cluster_may_grow() -> bool:
    """Whether jlstm joined a cluster (RAY_ADDRESS, `ray job submit`) that an autoscaler or
    a person may grow; a local Ray that jlstm started never gets more nodes."""
    return bool(os.environ.get("RAY_ADDRESS"))


def plan_live(
    make_plan: Callable[[list[NodeShape]], ResourcePlan],
    wait_s: float,
    *,
    poll_s: float = 5.0,
    say: Callable[[str], None] = print,
) -> ResourcePlan:
    """Plan on the live cluster; while it does not fit, wait up to `wait_s` for it to grow.

    While waiting it asks Ray's autoscaler for the missing bundles and prints what it waits
    for, so a cluster that scales GPU workers from zero is not refused before it can scale.
    Raises ConfigError naming the shape and the numbers when the time is up.
    """
    deadline = time.monotonic() + wait_s
    plan = make_plan(live_nodes())
    asked = False
    last_said = -math.inf
    while not plan.fits:
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" (waited {wait_s:g} s for the cluster to grow)" if wait_s else ""
            raise ConfigError(plan.reason + waited)
        if not asked:
            _request_bundles(plan)
            asked = True
        if time.monotonic() - last_said >= 30:
            say(f"jlstm: waiting up to {left:.0f} s more for the cluster to grow: {plan.reason}")
            last_said = time.monotonic()
        time.sleep(min(poll_s, max(left, 0.0)))
        plan = make_plan(live_nodes())
    return plan


def _request_bundles(plan: ResourcePlan) -> None:
    """Ask the autoscaler for the run's worker bundles (a no-op where none runs)."""
    from ray.autoscaler.sdk import request_resources

    bundle = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        bundle["GPU"] = plan.gpus_per_worker
    try:
        request_resources(bundles=[bundle] * plan.num_workers * max(plan.concurrent_runs, 1))
    except Exception as err:  # an autoscaler request is a hint; planning goes on without it
        log.info("could not ask the autoscaler for resources: %s", err)


def feature_pool(nodes: Sequence[NodeShape]) -> dict[str, int | bool]:
    """`build_feature_cache` sizing: one VGG16 actor (1 CPU + 1 GPU) per GPU that has a CPU
    beside it on its node; on CPU-only nodes one actor per CPU (at least one actor).

    Each actor decodes its videos itself (its bounded decoder) and runs VGG16 on them in
    turn, on its one CPU (Ray gives it one torch thread), so nothing else needs the other
    CPUs while the cache builds. Measured on 2 cores, the demo's cache (96 videos, pool4 +
    conv5_3 at 96 px): 154 s with one actor, 92 s with two (1.7x)."""
    gpu_slots = sum(min(int(n.gpus), int(n.cpus)) for n in nodes)
    if gpu_slots:
        return {"actors": gpu_slots, "use_gpu": True}
    return {"actors": max(1, sum(int(n.cpus) for n in nodes)), "use_gpu": False}
