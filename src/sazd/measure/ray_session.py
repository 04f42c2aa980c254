"""The one way the measuring commands start or join Ray: bounded, and shut down by whoever started it.

Several configurations share one Ray: the first cluster would otherwise start it and its close would
stop it, so each configuration would pay Ray's start-up again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import ray

from sazd.runtime.ray_backend import join_ray, start_local_ray

SHUTDOWN_S = 30.0


@contextlib.contextmanager
def ray_session(address: str | None = None, timeout_s: float = 30.0) -> Iterator[None]:
    """Inside: Ray is up. A Ray already initialised is used as it is; otherwise a local loopback Ray
    is started (``address`` None) or the cluster at ``address`` joined (``ClusterError`` if it does
    not answer within ``timeout_s``). What this call started it shuts down, within ``SHUTDOWN_S``."""
    if ray.is_initialized():
        yield
        return
    if address is None:
        start_local_ray()
    else:
        join_ray(address, timeout_s)
    try:
        yield
    finally:
        stopper = threading.Thread(target=ray.shutdown, name="sazd-ray-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_S)
