"""Give back the CPUs of a Train run whose Tune trial was stopped (ASHA) or failed.

When Tune stops a trial, it ends the trial's actor; the Train controller that the trial
started dies with it, but the placement group holding the training workers' CPUs is
owned by the job, not the controller. Ray Train's own cleaner removes such groups only
through the state API, which needs the dashboard; on a cluster without one (the tests'),
every early-stopped trial would keep its workers' CPUs until the sweep ends, and the
next trials would then starve Ray Data of the CPU it needs.

So each Train run registers its controller and placement group with a small registry
actor owned by the sweep driver, and a Tune callback on the driver, when a trial ends,
aborts that controller (which removes the group) or, if it is already gone, removes the
group itself. A Train run that finished normally already removed its group: no-op.

Upstream: ray-project/ray#54305 (Train V2 + Tune: a stopped trial's placement group
outlives it); Ray's fix, #58515 (PlacementGroupCleaner), reaches dead controllers
through the state API, so it needs the dashboard. The hooks used here are Ray Train V2
internals (`WorkerGroupCallback`, the worker group's state, the controller's `abort`):
pyproject.toml pins Ray to the minor release they were checked against
(`TESTED_RAY_MINOR`), and tests/test_release_internals.py fails loudly when they move.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

ABORT_TIMEOUT_S = 60.0
TESTED_RAY_MINOR = "2.60"  # keep equal to pyproject.toml's pin


@ray.remote(num_cpus=0)
class TrainRunRegistry:
    """trial id -> [(Train controller, its workers' placement group)]."""

    def __init__(self) -> None:
        self._runs: dict[str, list[tuple[Any, PlacementGroup]]] = {}

    def add(self, trial_id: str, controller: Any, group: PlacementGroup) -> None:
        self._runs.setdefault(trial_id, []).append((controller, group))

    def pop(self, trial_id: str) -> list[tuple[Any, PlacementGroup]]:
        return self._runs.pop(trial_id, [])


def registry(name: str) -> Any:
    """The sweep's registry actor, created on first use.

    Looked up by name rather than passed as a handle, because the Tune callback is pickled
    into the experiment state and must find a live registry again after `--resume`. The
    driver calls this first, so the registry lives as long as the sweep's driver.
    """
    return TrainRunRegistry.options(name=name, get_if_exists=True).remote()


class RegisterTrainRun(WorkerGroupCallback):
    """Train controller callback: register each started worker group of a trial."""

    def __init__(self, registry_name: str, trial_id: str) -> None:
        self.registry_name = registry_name
        self.trial_id = trial_id

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        registry(self.registry_name).add.remote(self.trial_id, controller, group)


class ReleaseEndedTrainRuns(tune.Callback):
    """Tune callback: when a trial ends, abort its Train run and free its workers' CPUs."""

    def __init__(self, registry_name: str) -> None:
        self.registry_name = registry_name

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial.trial_id)

    def _release(self, trial_id: str) -> None:
        for controller, group in ray.get(registry(self.registry_name).pop.remote(trial_id)):
            # abort() shuts the worker group down (removing its group) and exits; a
            # controller already gone with its trial leaves the group to be removed here.
            with contextlib.suppress(RayActorError, GetTimeoutError):
                ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
            if placement_group_table(group).get("state") != "REMOVED":
                remove_placement_group(group)
