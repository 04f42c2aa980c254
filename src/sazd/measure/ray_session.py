"""The one way the measuring commands start or join Ray: bounded, and cleaned up by whoever started it.

Several configurations share one Ray: the first cluster would otherwise start it and its close would
stop it, so each configuration would pay Ray's start-up again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import ray

from sazd.runtime.ray_backend import join_ray, process_tree, start_local_ray

SHUTDOWN_S = 30.0


@contextlib.contextmanager
def ray_session(address: str | None = None, timeout_s: float = 30.0) -> Iterator[None]:
    """Inside: Ray is up. A Ray already initialised is used as it is; otherwise a local loopback Ray
    is started (``address`` None) or the cluster at ``address`` joined (``ClusterError`` if it does
    not answer within ``timeout_s``). What this call started is shut down within ``SHUTDOWN_S``, and
    the local Ray's processes (and everything below them) that outlive the shutdown are killed, also
    after an interrupt during start-up."""
    if ray.is_initialized():
        yield
        return
    before = {pid for pid, _ in process_tree([os.getpid()])}
    try:
        if address is None:
            start_local_ray()
        else:
            join_ray(address, timeout_s)
        yield
    finally:
        started = [pid for pid, _ in process_tree([os.getpid()]) if pid not in before]
        ours = process_tree(started)  # the Ray we started and what it started (raylet, workers, agents)
        stopper = threading.Thread(target=ray.shutdown, name="sazd-ray-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_S)
        alive = dict(process_tree([pid for pid, _ in ours]))
        for pid, start in ours:
            if alive.get(pid) == start:  # the same process still, not a new one under a reused PID
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
