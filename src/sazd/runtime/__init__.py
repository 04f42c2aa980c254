"""The cluster of workers the master talks to: in-process (simulated latency) or Ray actors."""

from __future__ import annotations

from typing import Any

from sazd.runtime.cluster import Cluster, ClusterError, Counters, Round, tensor_bytes
from sazd.runtime.inproc import InProcessCluster
from sazd.runtime.latency import (
    Combined,
    DeadWorkers,
    FixedStragglers,
    LatencyModel,
    NoDelay,
    ShiftedExponential,
    parse_latency,
    straggler_latency,
)
from sazd.runtime.ray import RayCluster
from sazd.runtime.worker import SGDStep, Worker, sgd_apply

BACKENDS = ("inproc", "ray")


def make_cluster(backend: str, n: int, **opts: Any) -> Cluster:
    """``InProcessCluster(n, **opts)`` for ``"inproc"``, ``RayCluster(n, **opts)`` for ``"ray"``
    (which starts or joins Ray)."""
    if backend == "inproc":
        if opts.pop("tls", None) not in (None, False):
            raise ValueError("tls: the in-process backend has no connections to encrypt; use tls only "
                             "with backend 'ray'")
        return InProcessCluster(n, **opts)
    if backend == "ray":
        return RayCluster(n, **opts)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


__all__ = [
    "BACKENDS",
    "Cluster",
    "ClusterError",
    "Combined",
    "Counters",
    "DeadWorkers",
    "FixedStragglers",
    "InProcessCluster",
    "LatencyModel",
    "NoDelay",
    "RayCluster",
    "Round",
    "SGDStep",
    "ShiftedExponential",
    "Worker",
    "make_cluster",
    "parse_latency",
    "sgd_apply",
    "straggler_latency",
    "tensor_bytes",
]
