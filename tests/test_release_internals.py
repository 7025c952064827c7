"""The Ray Train V2 internals tune_spaces/release.py relies on are where it expects them.

A Ray upgrade that moves them must fail here, by name, not as every sweep trial leaking
its workers' CPUs.
"""

from __future__ import annotations

import inspect
from importlib.metadata import requires

import ray
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2._internal.execution.worker_group.placement_group_handle import (
    PlacementGroupHandle,
)
from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

from tune_spaces.release import TESTED_RAY_MINOR, RegisterTrainRun


def test_the_installed_ray_is_the_minor_release_release_py_was_checked_against() -> None:
    assert ray.__version__.startswith(TESTED_RAY_MINOR + "."), (
        f"Ray {ray.__version__}: tune_spaces/release.py was checked against "
        f"{TESTED_RAY_MINOR}.x; re-check its internals, then update TESTED_RAY_MINOR"
    )
    pin = next(r for r in requires("jlstm") or [] if r.startswith("ray"))
    assert f">={TESTED_RAY_MINOR}" in pin, pin


def test_the_worker_group_hook_and_its_path_to_the_placement_group_exist() -> None:
    # RegisterTrainRun overrides the hook Ray calls after a worker group starts...
    assert "after_worker_group_start" in vars(RegisterTrainRun)
    hook = inspect.signature(RegisterTrainRun.__mro__[1].after_worker_group_start)
    assert list(hook.parameters) == ["self", "worker_group"]
    # ...and walks worker_group.get_worker_group_state().placement_group_handle.placement_group.
    assert callable(WorkerGroup.get_worker_group_state)
    assert "placement_group_handle" in WorkerGroupState.__dataclass_fields__
    assert isinstance(PlacementGroupHandle.__dict__["placement_group"], property)


def test_the_controller_can_be_aborted() -> None:
    # Ray's tracing hooks may wrap actor methods (adding `_ray_trace_ctx`) once a Train run
    # has started in this process; abort must still take no argument of its own.
    abort = inspect.signature(TrainController.abort)
    own = [
        name for name, param in abort.parameters.items()
        if not name.startswith("_ray") and param.kind not in (param.VAR_POSITIONAL,
                                                               param.VAR_KEYWORD)
    ]
    assert own == ["self"], abort
