"""Starting or joining Ray, bounded; the only uses of Ray's private API, each wrapped in one function."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

import sazd.runtime.ray.processes as processes
from sazd.runtime.cluster import ClusterError

SHUTDOWN_S = 20.0  # bound on closing: killing actors, shutting Ray down
WATCH_EVERY_S = 2.0  # how often the control plane is checked while the master works or waits


def within(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` run in a daemon thread: its value or its exception, or TimeoutError after ``timeout_s``
    (the thread is then left to finish or hang on its own)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as err:  # handed to the caller's thread
            box.append((False, err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        raise TimeoutError(f"not finished within {timeout_s:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def bounded(fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread; True if it finished within ``timeout_s`` (errors are swallowed)."""
    try:
        within(fn, timeout_s)
    except TimeoutError:
        return False
    except Exception:
        pass
    return True

def start_local_ray(num_cpus: int | None = None, object_store_gb: float = 2.0) -> bool:
    """Start a local, loopback-only Ray unless one is already initialised; True if this call started it.
    Its workers run at this process's nice level (Ray's own default is 15), unless
    ``RAY_worker_niceness`` is set.

    ``num_cpus`` is Ray's logical CPU count (scheduling only); it should cover the actors plus the
    driver, or the raylet warns that it starts more worker processes than it expects."""
    if ray.is_initialized():
        return False
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray runs its workers at nice 15 by default: on a shared machine they would lose the CPU to
    # every process of ours (the master included) and of anyone else. Ours run at the master's level.
    os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
    _start_reaper()  # before Ray starts: a Ctrl-C during start-up leaves nothing behind either
    ray.init(
        address="local",
        num_cpus=num_cpus or max(os.cpu_count() or 1, 2),
        object_store_memory=int(object_store_gb * 1e9),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


_reapers: list[subprocess.Popen] = []


def _start_reaper() -> None:
    """A process that removes this driver's local Ray (processes, session directory) once the driver
    closes it, exits or is killed (see ``sazd.runtime.ray.processes``)."""
    temp_dir = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")
    _reapers.append(subprocess.Popen(
        [sys.executable, processes.__file__, str(os.getpid()), os.path.dirname(ray.__file__), temp_dir],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True))  # a Ctrl-C to the terminal's group must not stop it before its work


def stop_local_ray(timeout_s: float = SHUTDOWN_S) -> None:
    """Shut down the local Ray this process started (bounded), then let its reaper remove what is
    left and its session directory, and wait for it (bounded)."""
    bounded(ray.shutdown, timeout_s)
    while _reapers:
        reaper = _reapers.pop()
        with contextlib.suppress(OSError):
            reaper.stdin.close()
        try:
            reaper.wait(timeout_s)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait(5)


def join_ray(address: str, timeout_s: float = 30.0) -> None:
    """Connect to the Ray cluster at ``address``; ClusterError within ``timeout_s`` if it does not answer."""
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:  # a plain host:port: is anything listening?
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
        except OSError as err:
            raise ClusterError(
                f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
                f"`ray start --head --port={port}` or fix the address"
            ) from None
    try:
        within(lambda: ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING),
                timeout_s)
    except TimeoutError:
        raise ClusterError(f"the Ray cluster at {address} did not answer within {timeout_s:g} s; check the "
                           f"address (host:port of the head's GCS) and that the cluster is up") from None
    except BaseException as err:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {' '.join(str(err).split())[:300]}") \
            from err


def ray_processes() -> list[tuple[str, Any]]:
    """(name, Popen) of each process of the local Ray this driver started (Ray's private node
    object: checked against the pinned Ray by tests/test_runtime_ray.py)."""
    node = ray._private.worker._global_node
    return [(name, info.process) for name, infos in node.all_processes.items() for info in infos]


def ping_gcs(timeout_s: float) -> None:
    """Ask the head's GCS for a key (Ray's private GCS client; raises if it does not answer)."""
    ray._private.worker.global_worker.gcs_client.internal_kv_get(b"sazd-ping", None, timeout=timeout_s)
