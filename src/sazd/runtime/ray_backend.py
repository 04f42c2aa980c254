"""Ray cluster: each worker is a Ray actor wrapping ``Worker``; tensors travel via the object store.

- ``RayCluster(n)`` starts a local Ray on loopback by itself (usage statistics off, no dashboard);
  ``address=...`` joins an existing cluster; an already initialised Ray is reused. ``close()``
  kills the actors and shuts Ray down only if this object started it.
- Each large tensor argument is ``ray.put`` once and its reference passed to every actor that gets it,
  also in later calls while the master's tensor lives unmodified (``SentTensors``): a broadcast is
  stored once, and a round's X^T sent again to the workers the round skipped is not stored again.
- ``first_k`` loops on ``ray.wait(num_returns=1)`` and checks each ready result: a dead actor's
  result counts as ready (its ``ray.get`` raises), so a ``RayActorError`` is an erasure and another answer is
  awaited. Late results are never fetched, and queued actor calls are never cancelled (cancelling
  one breaks the actor): their references are simply dropped.
- Calls to one actor run in submission order, so a slow actor applies every update in order. The
  cluster tracks each actor's unfinished calls: ``ready_workers`` avoids actors still working on
  calls sent before the last gather, and an actor with more than ``max_backlog`` unfinished calls is
  killed (its queue would only grow) so that the master can respawn and repair it.
- Stragglers are real: the latency model's factor for each task is sent with the call and the actor
  sleeps ``(factor - 1)`` times its compute time (``Worker._timed``: products and updates; loads
  and state fetches are not slowed, unlike the in-process simulation which slows every call);
  ``set_delay`` on an actor multiplies in. A ``DeadWorkers`` model really kills the actor when its task comes.
- Actors have ``max_restarts=0`` and ``max_task_retries=0``: a retried call would run on fresh state.

Counters follow the in-process conventions (see ``sazd.runtime.inproc``): a broadcast argument's
bytes count once per worker called; only collected answers count as bytes from workers. ``sim_time_s``
stays 0: time is real here.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError

from sazd.runtime.cluster import (
    Cluster,
    ClusterError,
    Counters,
    Round,
    SentTensors,
    iter_tensors,
    map_tensors,
    tensor_bytes,
)
from sazd.runtime.latency import LatencyModel, parse_latency
from sazd.runtime.worker import Worker

# A worker that answers with one of these is gone (ActorDiedError, ActorUnavailableError are
# RayActorErrors; a lost node loses its objects): an erasure. Errors raised by Worker code propagate.
_DEATH = (RayActorError, ObjectLostError, WorkerCrashedError)
_INLINE_BYTES = 100 * 1024  # Ray's max_direct_call_object_size: smaller arguments travel inline


def start_local_ray(num_cpus: int | None = None, object_store_gb: float = 2.0) -> bool:
    """Start a local, loopback-only Ray unless one is already initialised; True if this call started it."""
    if ray.is_initialized():
        return False
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",
        num_cpus=num_cpus or max(os.cpu_count() or 1, 2),
        object_store_memory=int(object_store_gb * 1e9),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


class RayWorker(Worker):
    """The actor: a ``Worker`` plus one entry point that applies the task's slowdown factor."""

    def __init__(self, index: int, device: str = "cpu", torch_threads: int | None = None) -> None:
        super().__init__(index, device)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.base_delay = 1.0

    def set_delay(self, factor: float) -> int:
        super().set_delay(factor)
        self.base_delay = self.delay_factor
        return self.index

    def call(self, method: str, slowdown: float, args: tuple) -> Any:
        self.delay_factor = self.base_delay * slowdown
        try:
            return map_tensors(getattr(self, method)(*_fetch(args)), torch.Tensor.cpu)
        finally:
            self.delay_factor = self.base_delay


def _fetch(args: tuple) -> tuple:
    """``args`` with every object-store reference inside replaced by its value (one ``ray.get``)."""
    refs = list(iter_tensors(args, ray.ObjectRef))
    if not refs:
        return args
    values = iter(ray.get(refs))
    return map_tensors(args, lambda _: next(values), ray.ObjectRef)


@dataclass
class RayRound(Round):
    method: str
    workers: list[int]
    refs: dict[int, Any] = field(repr=False)  # worker -> ObjectRef, or None: failed before sending
    incarnations: dict[int, int] = field(repr=False, default_factory=dict)  # which actor of each slot
    cluster_id: int = 0
    gathered: bool = False


class RayCluster(Cluster):
    """``n`` Ray actors; see module docstring.

    ``timeout_s`` bounds every gather: a round that gets no answer for that long raises
    ``ClusterError`` instead of hanging. ``torch_threads``: intra-op threads per actor.
    """

    def __init__(
        self,
        n: int,
        address: str | None = None,
        gpus_per_worker: float = 0,
        num_cpus_per_worker: float = 0.01,
        latency: LatencyModel | str | None = None,
        max_backlog: int | None = 64,
        seed: int = 0,
        timeout_s: float = 300.0,
        torch_threads: int | None = 1,
        object_store_gb: float = 2.0,
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if gpus_per_worker < 0 or num_cpus_per_worker < 0:
            raise ValueError(
                f"gpus_per_worker and num_cpus_per_worker must be >= 0, got {gpus_per_worker!r}, "
                f"{num_cpus_per_worker!r}"
            )
        if max_backlog is not None and max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1 (or None), got {max_backlog!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.n = n
        self.latency = parse_latency(latency, seed).bind(n)
        self.max_backlog = max_backlog
        self.timeout_s = timeout_s
        self.counters = Counters()
        self.device = "cuda" if gpus_per_worker > 0 else "cpu"
        self.address = address
        self.started_ray = False
        self.actors: list[Any] = []
        self._outstanding: list[deque[tuple[int, Any]]] = [deque() for _ in range(n)]  # (epoch, ref)
        self._epoch = 0
        self._tasks = [0] * n
        self._incarnation = [0] * n
        self._dead: set[int] = set()
        self._closed = False
        self._sent = SentTensors()
        if ray.is_initialized():
            pass
        elif address is None:
            self.started_ray = start_local_ray(object_store_gb=object_store_gb)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            self.started_ray = True
        _close_at_exit(self)  # from here on, nothing we started may outlive the interpreter
        have = ray.cluster_resources()
        for name, per_worker, arg in (("GPU", gpus_per_worker, "gpus_per_worker"),
                                      ("CPU", num_cpus_per_worker, "num_cpus_per_worker")):
            if n * per_worker > have.get(name, 0) + 1e-9:
                self.close()
                raise ValueError(
                    f"{arg}={per_worker:g}: {n} workers need {n * per_worker:g} {name} but the Ray cluster "
                    f"has {have.get(name, 0):g}; lower {arg} (0 for none) or join a bigger cluster"
                )
        self._actor_cls = ray.remote(RayWorker).options(
            num_cpus=num_cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
        )
        self._torch_threads = torch_threads
        try:
            self.actors = [self._new_actor(j) for j in range(n)]
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ rounds
    def submit(
        self, method: str, args: Sequence[tuple] | tuple, workers: Sequence[int] | None = None
    ) -> RayRound:
        self._check_open()
        self._prune()
        workers, per_worker, broadcast = self._prepare_submit(method, args, workers)
        shared = self._payload(args) if broadcast else None
        refs: dict[int, Any] = {}
        for j in workers:
            self.counters.bytes_to_workers += tensor_bytes(per_worker[j])
            self.counters.calls += 1
            task = self._tasks[j]
            self._tasks[j] += 1
            if j not in self._dead and self.latency.fails(j, task, self._incarnation[j]):
                self.kill(j)
            if j in self._dead:
                refs[j] = None
                self.counters.failed_results += 1
                continue
            slowdown = self.latency.slowdown(j, task)
            payload = shared if broadcast else self._payload(per_worker[j])
            ref = self.actors[j].call.remote(method, slowdown, payload)
            refs[j] = ref
            self._outstanding[j].append((self._epoch, ref))
        self.counters.rounds += 1
        incarnations = {j: self._incarnation[j] for j in workers}
        return RayRound(method, list(workers), refs, incarnations, id(self))

    def first_k(
        self, round_: Round, k: int, enough: Callable[[Collection[int]], bool] | None = None
    ) -> dict[int, Any]:
        refs = self._take(round_)
        if not isinstance(k, int) or not 1 <= k <= self.n:
            raise ValueError(f"k must be an integer in 1..n={self.n}, got {k!r}")
        done = (lambda got: enough(got)) if enough is not None else (lambda got: len(got) >= k)
        got = self._gather(round_, refs, done)
        if not done(got.keys()):
            failed = sum(ref is None for ref in refs.values())
            raise ClusterError(
                f"first_k({round_.method!r}): needed {k} answers{' that can decode' if enough else ''}, "
                f"got {len(got)} from {len(refs)} workers asked ({failed} failed); "
                f"{len(self.alive())} of n={self.n} workers alive"
            )
        late = [j for j, ref in refs.items() if ref is not None and j not in got]
        self.counters.late_results_discarded += len(late)
        self._epoch += 1
        return got

    def wait_all(self, round_: Round) -> dict[int, Any]:
        """Every successful answer of the round (dead workers are left out: check the keys)."""
        refs = self._take(round_)
        got = self._gather(round_, refs, lambda got: False)
        self._epoch += 1
        return got

    def ready_workers(self, k: int) -> list[int]:
        self._check_open()
        self._prune()
        alive = self.alive()
        older = {j: sum(epoch < self._epoch for epoch, _ in self._outstanding[j]) for j in alive}
        idle = [j for j in alive if older[j] == 0]
        busy = sorted((j for j in alive if older[j]), key=lambda j: (older[j], j))
        return sorted(idle + busy[: max(0, k - len(idle))])

    # ----------------------------------------------------------------- workers
    def alive(self) -> list[int]:
        return [j for j in range(self.n) if j not in self._dead]

    def kill(self, worker: int) -> None:
        """Kill actor ``worker`` (no restart): its unfinished calls fail, as do later calls."""
        self._check_workers([worker])
        if worker < len(self.actors):
            with contextlib.suppress(Exception):  # already dead, or Ray already shut down
                ray.kill(self.actors[worker], no_restart=True)
        self._dead.add(worker)
        self._outstanding[worker].clear()

    def respawn(self, worker: int) -> None:
        self._check_open()
        self._check_workers([worker])
        self.kill(worker)
        self.actors[worker] = self._new_actor(worker)
        # Wait until the new process is up: calls queued while it starts would count as backlog.
        try:
            ray.get(self.actors[worker].ping.remote(), timeout=self.timeout_s)
        except Exception as err:  # any failure to start is reported the same way
            raise ClusterError(f"replacement for worker {worker} did not start: {err}") from err
        self._dead.discard(worker)
        self._tasks[worker] = 0
        self._incarnation[worker] += 1
        self.counters.respawns += 1

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "ray",
            "n": self.n,
            "latency": self.latency.describe(),
            "device": self.device,
            "address": self.address,
            "started_ray": self.started_ray,
            "nodes": len([node for node in ray.nodes() if node.get("Alive")]) if ray.is_initialized() else 0,
        }

    def backlog(self, worker: int) -> int:
        """Unfinished calls of ``worker``."""
        self._prune()
        return len(self._outstanding[worker])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            self.actors = []
            if self.started_ray:
                ray.shutdown()
        self._outstanding = [deque() for _ in range(self.n)]

    # --------------------------------------------------------------- internals
    def _store(self, t: torch.Tensor) -> Any:
        """Put a large tensor in the object store once; Ray sends small arguments inline anyway."""
        return ray.put(t) if t.numel() * t.element_size() >= _INLINE_BYTES else None

    def _payload(self, args: tuple) -> tuple:
        """``args`` with each stored tensor replaced by its object-store reference."""
        def stored(t: torch.Tensor) -> Any:
            handle = self._sent.get(t)[1]
            return t if handle is None else handle

        return map_tensors(args, stored)

    def _new_actor(self, j: int) -> Any:
        return self._actor_cls.remote(j, self.device, self._torch_threads)

    def _gather(self, round_: RayRound, refs: dict[int, Any], done: Callable) -> dict[int, Any]:
        """Fetch answers in arrival order until ``done``; dead actors are erasures."""
        pending = {ref: j for j, ref in refs.items() if ref is not None}
        got: dict[int, Any] = {}
        while pending and not done(got.keys()):
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise ClusterError(
                    f"{round_.method!r}: no answer from workers {sorted(pending.values())} within "
                    f"{self.timeout_s:g} s (timeout_s); {len(got)} answered so far"
                )
            rest = [ref for ref in pending if ref not in ready]
            if rest:  # everything else already finished, in one call
                ready += ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)[0]
            for ref in ready:
                if done(got.keys()):
                    break
                j = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except _DEATH:
                    self.counters.failed_results += 1
                    refs[j] = None
                    if round_.incarnations.get(j) == self._incarnation[j]:  # not respawned since
                        self.kill(j)  # also one only unavailable: it must not come back stale
                    continue
                got[j] = value
                self.counters.bytes_from_workers += tensor_bytes(value)
        round_.refs = {}  # drop references: late answers are never fetched
        return got

    def _prune(self) -> None:
        """Forget finished calls; kill actors whose backlog exceeds ``max_backlog``."""
        refs = [ref for queue in self._outstanding for _, ref in queue]
        if refs:
            finished = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
            for queue in self._outstanding:
                kept = [(epoch, ref) for epoch, ref in queue if ref not in finished]
                queue.clear()
                queue.extend(kept)
        if self.max_backlog is not None:
            for j in self.alive():
                if len(self._outstanding[j]) > self.max_backlog:
                    self.kill(j)
                    self.counters.backlog_kills += 1

    def _take(self, round_: Round) -> dict[int, Any]:
        super()._take(round_, RayRound)
        return dict(round_.refs)


def _close_at_exit(cluster: RayCluster) -> None:
    """Close the cluster when the interpreter exits (also after Ctrl-C), without keeping it alive."""
    ref = weakref.ref(cluster)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    atexit.register(close)
    weakref.finalize(cluster, atexit.unregister, close)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (for tests and shutdown checks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
