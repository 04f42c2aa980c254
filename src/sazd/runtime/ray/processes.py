"""Processes of ours on this machine, named by PID and start time (a reused PID is left alone)."""

from __future__ import annotations

import os
import signal
import socket
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
