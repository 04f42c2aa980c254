"""Shared fixtures. ``ray_session`` starts one local Ray for the whole test session (loopback only,
usage statistics off) and shuts it down at the end; every Ray test uses it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """The ``ray`` module, initialised once per session; RayCluster reuses it and never shuts it down."""
    import ray

    from sazd.runtime.ray_backend import start_local_ray

    started = start_local_ray(num_cpus=8, object_store_gb=1.0)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a loaded 2-core machine run much faster without intra-op threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits in float64 (the trainer tests' oracle runs in float64)."""
    import torch

    from sazd.data import load_dataset

    return load_dataset("digits", dtype=torch.float64)
