"""Stragglers that PyTorch tensor parallelism and sazd share, real in wall time.

One description of who is slow, applied the same way to a TP rank and to a sazd worker:

- ``SlowWorker(worker, factor)``: that worker's compute takes ``factor`` times as long. A sazd worker
  sleeps ``(factor - 1)`` times each call's measured compute (``Worker._timed``); a TP rank sleeps
  ``(factor - 1)`` times its measured step compute (``straggle``), once per step.
- ``RandomDelays(model)``: seeded per-call factors (``SlowCalls``: factor F with probability P,
  ``ShiftedExponential``, ``Pareto``). Worker/rank ``j``'s ``t``-th call draws
  ``model.slowdown(j, t)`` on both sides: the same sequence of draws (a sazd call is one task of a
  round, a TP call is one training step).
- ``NoisyNeighbour(worker, share)``: CPU taken from that worker's process by the platform, not by a
  sleep: a cgroup CPU quota of ``share`` of one core (Linux, root, cgroup v2 or v1 ``cpu``), else a
  busy process pinned to the worker's core. ``attach(pid)`` says which it used.
- ``DeadWorker(worker, after)``: the worker dies at its call ``after``. TP: the run stops; sazd:
  the master repairs it.

Each is a ``LatencyModel`` (``sazd.runtime.latency``) for sazd's clusters, and a JSON dict
(``to_dict`` / ``from_dict``) for the TP ranks, which are separate processes.
``Recorder`` wraps a latency model and counts, per worker, the calls it slowed, so a test can
check that exactly the named worker was slowed.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sazd.runtime.latency import (
    DeadWorkers,
    FixedStragglers,
    LatencyModel,
    NoDelay,
    Pareto,
    ShiftedExponential,
    SlowCalls,
)


def straggle(factor: float, compute_s: float) -> float:
    """Sleep ``(factor - 1) x compute_s`` (the straggler rule of both sides); returns the seconds slept."""
    if not factor >= 1 or math.isinf(factor):
        raise ValueError(f"straggler factor must be a finite number >= 1, got {factor!r}")
    seconds = (factor - 1.0) * max(compute_s, 0.0)
    if seconds > 0:
        time.sleep(seconds)
    return seconds


class Straggler(ABC):
    """Who is slow, and how; ``kind`` names it in JSON and reports."""

    kind: ClassVar[str]

    @abstractmethod
    def latency(self) -> LatencyModel:
        """The per-call factors and deaths (``NoDelay`` when the slowing is done by the platform)."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-ready."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params()}

    def around(self, pids: dict[int, int]) -> contextlib.AbstractContextManager[Neighbour | None]:
        """Slowing done by the platform while inside, given the processes ``{worker: pid}`` at hand
        (a TP rank passes itself, sazd's master all its workers). Only a noisy neighbour does any."""
        return contextlib.nullcontext(None)

    def describe(self) -> str:
        return f"{self.kind} " + " ".join(f"{k}={v}" for k, v in self.params().items())


def _worker_id(worker: Any) -> int:
    if type(worker) is not int or worker < 0:
        raise ValueError(f"straggler worker must be an integer id >= 0, got {worker!r}")
    return worker


@dataclass(frozen=True)
class NoStraggler(Straggler):
    kind: ClassVar[str] = "none"

    def latency(self) -> LatencyModel:
        return NoDelay()

    def params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return "none"


@dataclass(frozen=True)
class SlowWorker(Straggler):
    worker: int
    factor: float
    kind: ClassVar[str] = "slow"

    def __post_init__(self) -> None:
        _worker_id(self.worker)
        FixedStragglers([self.worker], factor=self.factor)  # checks the factor

    def latency(self) -> LatencyModel:
        return FixedStragglers([self.worker], factor=self.factor)

    def params(self) -> dict[str, Any]:
        return {"worker": self.worker, "factor": self.factor}


RANDOM_MODELS: dict[str, type[LatencyModel]] = {"calls": SlowCalls, "shiftexp": ShiftedExponential,
                                               "pareto": Pareto}


@dataclass(frozen=True)
class RandomDelays(Straggler):
    """Seeded per-call factors drawn by ``model`` (a key of ``RANDOM_MODELS``) with ``options``."""

    model: str
    options: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    kind: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        if self.model not in RANDOM_MODELS:
            raise ValueError(f"random delays: model must be one of {sorted(RANDOM_MODELS)}, "
                             f"got {self.model!r}")
        try:
            self.latency()
        except TypeError as err:
            raise ValueError(f"random delays {self.model}: bad options {self.options!r} ({err})") from None

    def latency(self) -> LatencyModel:
        return RANDOM_MODELS[self.model](**self.options, seed=self.seed)

    def params(self) -> dict[str, Any]:
        return {"model": self.model, "options": dict(self.options), "seed": self.seed}


@dataclass(frozen=True)
class DeadWorker(Straggler):
    worker: int
    after: int
    kind: ClassVar[str] = "dead"

    def __post_init__(self) -> None:
        _worker_id(self.worker)
        DeadWorkers([self.worker], after_calls=self.after)  # checks `after`

    def latency(self) -> LatencyModel:
        return DeadWorkers([self.worker], after_calls=self.after)

    def params(self) -> dict[str, Any]:
        return {"worker": self.worker, "after": self.after}


CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


@dataclass(frozen=True)
class NoisyNeighbour(Straggler):
    """The worker's process gets ``share`` of one core (a cgroup quota), or shares its core with a busy
    process when no cgroup can be made."""

    worker: int
    share: float = 0.5
    kind: ClassVar[str] = "noisy"

    def __post_init__(self) -> None:
        _worker_id(self.worker)
        if not 0 < self.share <= 1:
            raise ValueError(f"noisy neighbour: share must be in (0, 1], got {self.share!r}")

    def latency(self) -> LatencyModel:
        return NoDelay()

    def params(self) -> dict[str, Any]:
        return {"worker": self.worker, "share": self.share}

    def around(self, pids: dict[int, int]) -> contextlib.AbstractContextManager[Neighbour | None]:
        return self.attach(pids[self.worker]) if self.worker in pids else contextlib.nullcontext(None)

    @contextlib.contextmanager
    def attach(self, pid: int, prefer_cgroup: bool = True) -> Iterator[Neighbour]:
        """Slow process ``pid`` while inside; yields what was done. Undone on exit (also on error)."""
        group = cgroup_dir() if prefer_cgroup else None
        if group is not None:
            path = group / f"sazd-noisy-{os.getpid()}-{pid}"
            path.mkdir()
            try:
                _write_quota(path, self.share)
                (path / "cgroup.procs").write_text(f"{pid}\n")
                yield Neighbour(pid, f"cgroup CPU quota {self.share:.0%} of a core ({path})", cgroup=path)
            finally:
                with contextlib.suppress(OSError):
                    (group / "cgroup.procs").write_text(f"{pid}\n")  # back to the parent group
                with contextlib.suppress(OSError):
                    path.rmdir()
            return
        core = min(os.sched_getaffinity(pid))
        old = os.sched_getaffinity(pid)
        os.sched_setaffinity(pid, {core})
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            os.sched_setaffinity(busy.pid, {core})
            yield Neighbour(pid, f"busy process {busy.pid} pinned with it to core {core}", busy_pid=busy.pid,
                            core=core)
        finally:
            busy.send_signal(signal.SIGKILL)
            busy.wait(timeout=10)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, old)


@dataclass(frozen=True)
class Neighbour:
    """What a ``NoisyNeighbour`` did to process ``pid`` (``method``: for the report)."""

    pid: int
    method: str
    cgroup: Path | None = None
    busy_pid: int | None = None
    core: int | None = None


def cgroup_dir() -> Path | None:
    """A cgroup directory with CPU quotas we may write (v2 with the cpu controller, else v1 ``cpu``)."""
    if os.geteuid() != 0:
        return None
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        return CGROUP_V2
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").is_file() and os.access(CGROUP_V1_CPU, os.W_OK):
        return CGROUP_V1_CPU
    return None


def _write_quota(path: Path, share: float) -> None:
    quota = max(1000, int(share * PERIOD_US))
    if (path / "cpu.max").exists():
        (path / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
    else:
        (path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
        (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")


KINDS: dict[str, type[Straggler]] = {cls.kind: cls for cls in (NoStraggler, SlowWorker, RandomDelays,
                                                                DeadWorker, NoisyNeighbour)}


def from_dict(spec: dict[str, Any]) -> Straggler:
    """The straggler a ``to_dict`` wrote (read back by each TP rank)."""
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ValueError(f"straggler: expected a dict with kind in {sorted(KINDS)}, got {spec!r}")
    fields = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return KINDS[spec["kind"]](**fields)
    except TypeError as err:
        raise ValueError(f"straggler {spec['kind']}: bad fields {sorted(fields)} ({err})") from None


class Recorder(LatencyModel):
    """``inner``'s factors and deaths, counting per worker the calls slowed and their summed extra factor.

    ``start``: each worker's task number when the phase began; ``inner`` then sees calls counted from
    there (0, 1, ... as a TP rank counts its steps), and a respawned worker's from its own start.
    """

    def __init__(self, inner: LatencyModel, start: dict[int, int] | None = None) -> None:
        self.inner = inner
        self.start = dict(start or {})
        self.slowed: Counter[int] = Counter()
        self.extra: Counter[int] = Counter()  # sum of (factor - 1): sleeps in units of compute
        self.calls: Counter[int] = Counter()

    def bind(self, n: int) -> Recorder:
        self.inner.bind(n)
        return self

    def _call(self, worker: int, task: int) -> int:
        begun = self.start.get(worker, 0)
        return task - begun if task >= begun else task

    def skip(self, tasks: dict[int, int]) -> None:
        """Leave ``tasks[worker]`` calls just made out of the count (e.g. an evaluation between steps):
        the next call of each worker is numbered as if they had not happened."""
        for worker, count in tasks.items():
            self.start[worker] = self.start.get(worker, 0) + count

    def slowdown(self, worker: int, task: int) -> float:
        factor = self.inner.slowdown(worker, self._call(worker, task))
        self.calls[worker] += 1
        if factor > 1:
            self.slowed[worker] += 1
            self.extra[worker] += factor - 1
        return factor

    def fails(self, worker: int, task: int, incarnation: int = 0) -> bool:
        return self.inner.fails(worker, self._call(worker, task), incarnation)

    def describe(self) -> str:
        return self.inner.describe()


__all__ = ["KINDS", "DeadWorker", "Neighbour", "NoStraggler", "NoisyNeighbour", "RandomDelays", "Recorder",
           "SlowWorker", "Straggler", "cgroup_dir", "from_dict", "straggle"]
