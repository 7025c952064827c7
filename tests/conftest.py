"""Shared fixtures: one local Ray cluster for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A real local Ray cluster (2 logical CPUs), started once and shared by every test."""
    import ray

    from orchestration.trainer import RAY_NODE_ENV

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Also reaches the `ray start --head` cluster of the job-submission test.
    for key, value in RAY_NODE_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
