"""Processes of ours on this machine, named by PID and start time (a reused PID is left alone).

Run as a script, this module is the reaper of a local Ray that sazd starts (standard library only,
so it starts in milliseconds): ``python processes.py DRIVER_PID RAY_DIR TEMP_DIR``. While the driver
lives it records, every ``_REAP_EVERY_S``, the driver's descendants that are Ray's (their command
line names Ray's package or ``ray::``). When its stdin closes (the driver closed it, exited, or was
killed: the pipe's end dies with the driver) or the driver is gone, it SIGKILLs those still alive
and everything below them, and removes the driver's own Ray session directories under TEMP_DIR
(``session_*_<driver pid>`` made after the reaper started) and a ``session_latest`` link to them.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection
from typing import Any


def boot_id() -> str:
    """This machine's boot id: a PID means the same process only on the same boot of the same machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def kill_pid(info: dict[str, Any]) -> bool:
    """SIGKILL the process ``info`` describes (``pid``, ``boot_id``, ``start``) if it still runs on
    this machine (same boot, same start time: a reused PID is left alone); True if a signal was sent."""
    pid = info.get("pid")
    if pid is None or info.get("boot_id") != boot_id() or start_time(pid) != info.get("start"):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def start_time(pid: int) -> int | None:
    """The kernel's start time of process ``pid`` (None if gone): with the PID it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(roots: Collection[int]) -> list[tuple[int, int]]:
    """(pid, start time) of ``roots`` and every process below them, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return [(pid, start) for pid in found if (start := start_time(pid)) is not None]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (for tests and shutdown checks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


_REAP_EVERY_S = 0.2


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _sessions(temp_dir: str, driver: int, since: float) -> list[str]:
    """The driver's own Ray session directories (Ray names them ``session_<time>_<driver pid>``)."""
    try:
        names = os.listdir(temp_dir)
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(temp_dir, name)
        if (name.startswith("session_") and name.endswith(f"_{driver}") and not os.path.islink(path)
                and os.path.isdir(path) and os.stat(path).st_mtime >= since - 1):
            out.append(path)
    return out


def reap(driver: int, ray_dir: str, temp_dir: str) -> None:
    """The reaper's loop (see the module docstring)."""
    since, born = time.time(), start_time(driver)
    ours: set[tuple[int, int]] = set()

    def record() -> None:
        sessions = [os.path.basename(path) for path in _sessions(temp_dir, driver, since)]
        for pid, start in process_tree([driver]):
            command = _command(pid)
            if pid not in (driver, os.getpid()) and (
                    ray_dir in command or command.startswith("ray::")
                    or any(name in command for name in sessions)):
                ours.add((pid, start))

    while start_time(driver) == born:
        ready, _, _ = select.select([sys.stdin], [], [], _REAP_EVERY_S)
        if ready and not os.read(sys.stdin.fileno(), 1024):
            break  # stdin closed
        record()
    if start_time(driver) == born:
        record()
    alive = [pid for pid, start in ours if start_time(pid) == start]  # not a reused PID
    for pid, _ in process_tree(alive):  # they and whatever they started since
        if pid != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all(start_time(pid) != start for pid, start in ours), timeout_s=10)
    remove_sessions(temp_dir, _sessions(temp_dir, driver, since))


def remove_sessions(temp_dir: str, sessions: list[str]) -> None:
    """Delete the driver's own session directories, and Ray's ``session_latest`` link only where it
    points at one of them (another driver's latest session keeps its link)."""
    latest = os.path.join(temp_dir, "session_latest")
    for path in sessions:
        if os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(path):
            os.unlink(latest)
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2], sys.argv[3])
