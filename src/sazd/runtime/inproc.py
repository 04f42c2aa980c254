"""In-process cluster: n ``Worker`` objects in this process, with a simulated clock.

Every call really executes (results are real) at ``submit`` time, in submission order per worker,
so side effects such as updates happen in order even when the answer is later discarded (within one
round, a burst's first call measures slow: the spares ``spare`` declares run first, the others take
turns after them). Its
duration is measured (``time.perf_counter`` around the call; or the constant ``base_time_s``, for
deterministic simulations) and turned into a simulated duration by the latency model.

Simulated clock (it mirrors Ray's semantics):

- The master has a clock ``self.clock``. The cluster alone accounts for the master's own work
  (encode, decode, optimizer, activations), as ``master_time`` says: ``"measured"`` (default) adds
  the wall time between its calls (from the return of one ``submit``, ``first_k``, ``wait_all`` or
  ``ready_workers`` to the start of the next); ``"explicit"`` (default with a constant
  ``base_time_s``, so that the clock is reproducible) adds only what ``note_master_time(s)``
  reports (the other modes ignore it); ``"ignored"`` keeps a clock of the workers only.
- A call submitted at master time t reaches worker j at ``t + in_bytes / bandwidth`` (no network
  model: at t), starts when the worker is free (``busy_until[j]``; calls run in submission order)
  and finishes ``duration * latency.slowdown(j, task)`` later.
- ``first_k`` takes answers in finish order, stops at the k-th success (or when ``enough`` holds)
  and moves the clock to that answer's arrival time; later answers are discarded.

Network model (``network_gbps``): the master has one full-duplex link of that bandwidth; what it
sends is serialised on its outgoing side in submission order and the answers it collects on its
incoming side in finish order, each taking ``bytes / (network_gbps * 1e9 / 8)`` seconds. Workers'
own links are not a bottleneck. A broadcast argument is sent once per worker (no multicast).

Counter conventions (the same in the Ray backend):

- ``bytes_to_workers``: tensor bytes of every call's arguments, once per worker called; a broadcast
  argument counts once for each worker it is sent to (it is real traffic to each of them).
- ``bytes_from_workers``: tensor bytes of the answers the master collects (the first k of
  ``first_k``, all of ``wait_all``). Discarded late answers are not counted and do not occupy the
  simulated link (the model of a master that never fetches them; the Ray backend's connections do
  receive and drop them).
- ``bytes_sent_once``: the master's egress when each distinct tensor leaves it once (``SentTensors``:
  a broadcast counts once, a tensor sent again unmodified counts no more), as on a network that
  multicasts.
- ``calls``: worker calls sent; ``rounds``: ``submit`` calls; ``late_results_discarded``: successful
  answers left behind by ``first_k``; ``failed_results``: calls that failed because their worker
  was dead or died; ``sim_time_s``: the simulated master clock.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sazd.runtime.cluster import (
    Cluster,
    ClusterError,
    Counters,
    Round,
    SentTensors,
    choose_ready,
    tensor_bytes,
)
from sazd.runtime.latency import LatencyModel, parse_latency
from sazd.runtime.worker import Worker

MASTER_TIME = ("explicit", "measured", "ignored")


def _master_clock(method: Callable) -> Callable:
    """With ``master_time="measured"``, the wall time since the cluster's last timed call returned
    is master work: it advances the clock before ``method`` runs."""

    @functools.wraps(method)
    def timed(self: InProcessCluster, *args: Any, **kwargs: Any) -> Any:
        if self.master_time == "measured" and self._left_at is not None:
            self._advance(self.clock + time.perf_counter() - self._left_at)
        try:
            return method(self, *args, **kwargs)
        finally:
            self._left_at = time.perf_counter()

    return timed


def _times(name: str, value: Any, count: int | None = None) -> list[float]:
    """Finite times >= 0 read from a schedule (``count`` of them when given), or ValueError naming it."""
    if not isinstance(value, list) or (count is not None and len(value) != count) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in value):
        raise ValueError(f"schedule.{name} must be a list of {count or 'any number of'} finite "
                         f"times >= 0, got {value!r}")
    return [float(v) for v in value]


@dataclass
class _Call:
    worker: int
    finish: float  # simulated time the answer (or the failure) is ready at the worker
    value: Any = None
    failed: bool = False
    out_bytes: int = 0
    start: float = 0.0  # simulated time the worker started it


@dataclass
class InProcessRound(Round):
    method: str
    workers: list[int]
    calls: dict[int, _Call] = field(repr=False)
    cluster_id: int = 0
    gathered: bool = False
    sent: float = 0.0  # simulated time of the submit


class InProcessCluster(Cluster):
    """``n`` in-process workers with simulated latency; see module docstring.

    ``latency``: a ``LatencyModel`` or a spec string for ``parse_latency`` (seeded with ``seed``).
    ``base_time_s``: when given, every call's healthy duration is this constant instead of the
    measured time, which makes the simulated clock exactly reproducible.
    ``max_backlog``: a worker with more unfinished calls than this is declared dead (its queue would
    only grow); ``None`` disables the check.
    ``master_time``: how the master's own work reaches the clock, one of ``MASTER_TIME`` (see the
    module docstring); default ``"measured"``, or ``"explicit"`` with ``base_time_s``.
    ``worker_timeout_s``: as on Ray, a worker busy with one call for longer than this (simulated time)
    is silent: it is killed at that moment, an erasure; ``None``: no timeout.

    An exception raised by a worker's call makes that worker an erasure (recorded in
    ``counters.worker_errors``); when every worker a submit asks raises, the first exception propagates
    with the worker and method in a note.
    """

    def __init__(
        self,
        n: int,
        latency: LatencyModel | str | None = None,
        network_gbps: float | None = None,
        device: str = "cpu",
        seed: int = 0,
        base_time_s: float | None = None,
        max_backlog: int | None = 64,
        master_time: str | None = None,
        worker_timeout_s: float | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if master_time is None:  # a constant task time asks for a reproducible clock
            master_time = "measured" if base_time_s is None else "explicit"
        if master_time not in MASTER_TIME:
            raise ValueError(f"master_time must be one of {list(MASTER_TIME)}, got {master_time!r}")
        if network_gbps is not None and not network_gbps > 0:
            raise ValueError(f"network_gbps must be > 0 (or None for no network model), got {network_gbps!r}")
        if base_time_s is not None and not base_time_s >= 0:
            raise ValueError(f"base_time_s must be >= 0 (or None to measure), got {base_time_s!r}")
        if max_backlog is not None and max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1 (or None), got {max_backlog!r}")
        self.n = n
        self.device = device
        self.latency = parse_latency(latency, seed).bind(n)
        self.bytes_per_s = None if network_gbps is None else network_gbps * 1e9 / 8
        self.base_time_s = base_time_s
        if worker_timeout_s is not None and not worker_timeout_s > 0:
            raise ValueError(f"worker_timeout_s must be > 0 seconds (or None), got {worker_timeout_s!r}")
        self.max_backlog = max_backlog
        self.master_time = master_time
        self._left_at: float | None = None  # perf_counter when the last timed call returned
        self.worker_timeout_s = worker_timeout_s
        self.compute_dtype = Worker.check_dtype(compute_dtype)
        self.counters = Counters()
        self.workers: list[Worker] = [Worker(j, device, compute_dtype) for j in range(n)]
        self._cuda = self.workers[0].device.type == "cuda"  # each call then waits for its kernels
        self.clock = 0.0
        self._busy_until = [0.0] * n
        self._lag_until = [0.0] * n  # busy_until as of the last gather: unfinished *older* work
        self._pending: list[deque[_Call]] = [deque() for _ in range(n)]
        self._tasks = [0] * n  # per-worker task number, for the latency model
        self._incarnation = [0] * n
        self._dead: set[int] = set()
        self._out_free = 0.0  # master link, outgoing side, busy until
        self._in_free = 0.0  # master link, incoming side, busy until
        self._closed = False
        self._sent = SentTensors()
        self._spares: set[int] = set()  # run first in each burst (see ``submit``)

    # ------------------------------------------------------------------ rounds
    def spare(self, workers: Sequence[int]) -> None:
        """``workers`` answer only when others are late: they run first in each burst (see ``submit``)."""
        self._spares.update(self._check_workers(workers))

    @_master_clock
    def submit(
        self, method: str, args: Sequence[tuple] | tuple, workers: Sequence[int] | None = None
    ) -> InProcessRound:
        self._check_open()
        self._enforce_backlog()
        workers, per_worker, _ = self._prepare_submit(method, args, workers)
        calls, errors = {}, {}
        sizes: dict[int, int] = {}  # per distinct argument tuple (a broadcast is one)
        arrive = {}
        for j in workers:  # the master's link sends in worker order
            nbytes = sizes.get(id(per_worker[j]))
            if nbytes is None:
                nbytes = sizes[id(per_worker[j])] = tensor_bytes(per_worker[j])
            self.counters.bytes_to_workers += nbytes
            self.counters.calls += 1
            arrive[j] = self._send(nbytes)
        # The call run first in a burst measures slower (cold caches after the master's own work), an
        # artifact of running the workers one after another. The spares run first and take it, as on
        # shared cores their lower priority makes them answer last; starting each round at the next
        # worker spreads the rest over all of them, so that no worker is the permanent straggler.
        turn = self.counters.rounds % len(workers)
        rotated = workers[turn:] + workers[:turn]
        for j in [j for j in rotated if j in self._spares] + [j for j in rotated if j not in self._spares]:
            try:
                calls[j] = self._execute(j, method, per_worker[j], arrive=arrive[j])
            except Exception as err:
                err.add_note(f"(in-process worker {j}, call {method!r})")
                errors[j] = err
        raised = [(j, errors[j]) for j in workers if j in errors]  # in worker order
        for j, err in raised:
            self.counters.note_error(j, method, err)
        self.counters.rounds += 1
        if raised and len(raised) == len(workers):  # the call itself is wrong: nobody is to blame
            raise raised[0][1]
        for j, _ in raised:  # a failure confined to some workers: erasures
            self.kill(j)
            calls[j] = _Call(j, self.clock, failed=True)
            self.counters.failed_results += 1
        return InProcessRound(method, list(workers), calls, id(self), sent=self.clock)

    @_master_clock
    def first_k(
        self, round_: Round, k: int, enough: Callable[[Collection[int]], bool] | None = None,
        patience_s: float = 0.0,
    ) -> dict[int, Any]:
        patience_s = self._check_patience(patience_s)
        calls = self._take(round_)
        done = self._stop_test(k, enough)
        got: dict[int, Any] = {}
        # a call silent past the worker timeout fails when the timeout expires (the worker is killed)
        timeout = self.worker_timeout_s
        order = sorted(calls.values(), key=lambda c: (c.finish, c.worker)) if timeout is None else sorted(
            calls.values(), key=lambda c: (self._answer_or_timeout(c), c.worker))
        for call in order:
            if call.failed:
                continue
            if timeout is not None and self._answer_or_timeout(call) < call.finish:
                self._advance(max(self.clock, self._answer_or_timeout(call)))
                self._time_out(call.worker)
                continue
            self._receive(call)
            got[call.worker] = call.value
            if len(got) >= k and done(got.keys()):  # no code decodes from fewer than k answers
                break
        if patience_s > 0 and enough is None and self.master_time == "measured" and done(got.keys()):
            self._wait_for_preferred(calls, got, self.clock + patience_s)
        failed = {c.worker for c in calls.values() if c.failed}
        late = [c for c in calls.values() if not c.failed and c.worker not in got]
        self.counters.responses.record(self.n, round_.workers,
                                       {j: calls[j].finish - round_.sent for j in got},
                                       failed, {c.worker: c.finish - round_.sent for c in late})
        if not done(got.keys()):
            raise ClusterError(
                f"first_k({round_.method!r}): needed {k} answers{' that can decode' if enough else ''}, "
                f"got {len(got)} from {len(calls)} workers asked ({len(failed)} failed); "
                f"{len(self.alive())} of n={self.n} workers alive{self.counters.recent_errors()}"
            )
        self.counters.late_results_discarded += len(late)
        self._mark_lagging()
        return got

    def _wait_for_preferred(self, calls: dict[int, _Call], got: dict[int, Any], until: float) -> None:
        """Take the answers of workers that are no spares arriving by ``until`` (simulated) in place of
        spares' answers (``Cluster._prefer``); as on Ray, a wait that ends without them lasts until
        ``until``."""
        held = sum(j in self._spares for j in got)
        coming = sorted((c for c in calls.values() if not c.failed and c.worker not in got
                         and c.worker not in self._spares and self._answer_or_timeout(c) >= c.finish),
                        key=lambda c: (c.finish, c.worker))[:held]
        answers = {}
        for call in coming:
            if call.finish > until:
                self._advance(max(self.clock, until))
                break
            self._receive(call)
            answers[call.worker] = call.value
        self._prefer(got, self._spares, answers)

    @_master_clock
    def wait_all(self, round_: Round) -> dict[int, Any]:
        """Every successful answer of the round (failed workers are left out: check the keys)."""
        calls = self._take(round_)
        got = {}
        for call in sorted(calls.values(), key=lambda c: (c.finish, c.worker)):
            if not call.failed:
                self._receive(call)
                got[call.worker] = call.value
        self._mark_lagging()
        return got

    @_master_clock
    def ready_workers(self, k: int) -> list[int]:
        self._check_open()
        self._enforce_backlog()
        behind = {j: (max(1, len(self._pending[j])) if self._lag_until[j] > self.clock else 0,
                      self._lag_until[j]) for j in self.alive()}
        return choose_ready(behind, k, in_line=[j for j, (calls, _) in behind.items() if calls == 1])

    def note_master_time(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        if self.master_time == "explicit":  # "measured" has counted it already
            self._advance(self.clock + seconds)

    def now(self) -> float:
        return self.clock

    def _clock_state(self) -> dict[str, Any]:
        return {"clock": {"clock": self.clock, "out_free": self._out_free, "in_free": self._in_free,
                          "busy_until": list(self._busy_until), "lag_until": list(self._lag_until),
                          "pending": [[c.finish for c in q if not c.failed] for q in self._pending]}}

    def _check_clock(self, clock: Any) -> dict[str, Any]:
        keys = {"clock", "out_free", "in_free", "busy_until", "lag_until", "pending"}
        if not isinstance(clock, dict) or set(clock) != keys:
            raise ValueError(f"schedule.clock must hold exactly {sorted(keys)}, got {clock!r:.200}")
        now, out_free, in_free = _times("clock.clock/out_free/in_free",
                                        [clock["clock"], clock["out_free"], clock["in_free"]], 3)
        if not isinstance(clock["pending"], list) or len(clock["pending"]) != self.n:
            raise ValueError(f"schedule.clock.pending must be a list of n={self.n} lists of times")
        return {"clock": now, "out_free": out_free, "in_free": in_free,
                "busy_until": _times("clock.busy_until", clock["busy_until"], self.n),
                "lag_until": _times("clock.lag_until", clock["lag_until"], self.n),
                "pending": [_times(f"clock.pending[{j}]", q) for j, q in enumerate(clock["pending"])]}

    def _load_clock(self, clock: dict[str, Any]) -> None:
        self.clock = self.counters.sim_time_s = clock["clock"]
        self._out_free, self._in_free = clock["out_free"], clock["in_free"]
        self._busy_until, self._lag_until = clock["busy_until"], clock["lag_until"]
        # an unanswered call: only its finish time matters
        self._pending = [deque(_Call(j, t, start=t) for t in times)
                         for j, times in enumerate(clock["pending"])]

    # ----------------------------------------------------------------- workers
    def alive(self) -> list[int]:
        return [j for j in range(self.n) if j not in self._dead]

    def kill(self, worker: int) -> None:
        """Worker ``worker`` dies now: its unfinished calls fail, later calls fail (erasures)."""
        self._check_workers([worker])
        self._dead.add(worker)
        for call in self._pending[worker]:
            if call.finish > self.clock and not call.failed:
                call.failed, call.value, call.finish = True, None, self.clock
                self.counters.failed_results += 1
        self._pending[worker].clear()

    def respawn(self, *workers: int) -> None:
        self._check_open()
        for worker in self._check_workers(workers):
            if worker not in self._dead:
                self.kill(worker)
            self.workers[worker] = Worker(worker, self.device, self.compute_dtype)
            self._busy_until[worker] = self._lag_until[worker] = self.clock
            self._renewed(worker)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "inproc",
            "n": self.n,
            "latency": self.latency.describe(),
            "network_gbps": None if self.bytes_per_s is None else self.bytes_per_s * 8 / 1e9,
            "base_time_s": self.base_time_s,
            "master_time": self.master_time,
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "worker_timeout_s": self.worker_timeout_s,
        }

    def busy_until(self, worker: int) -> float:
        """Simulated time at which ``worker`` finishes everything submitted to it so far."""
        return self._busy_until[worker]

    def close(self) -> None:
        self._closed = True
        self.workers = []
        self._pending = [deque() for _ in range(self.n)]

    # --------------------------------------------------------------- internals
    def _execute(self, j: int, method: str, args: tuple, arrive: float) -> _Call:
        task = self._tasks[j]
        self._tasks[j] += 1
        if j not in self._dead and self.latency.fails(j, task, self._incarnation[j]):
            self.kill(j)
        if j in self._dead:
            self.counters.failed_results += 1
            return _Call(j, arrive, failed=True)
        start = max(arrive, self._busy_until[j])
        worker = self.workers[j]
        t0 = time.perf_counter()
        value = getattr(worker, method)(*args)
        if self._cuda:
            torch.cuda.synchronize(worker.device)
        measured = time.perf_counter() - t0
        base = measured if self.base_time_s is None else self.base_time_s
        finish = start + base * self.latency.slowdown(j, task)
        self._busy_until[j] = finish
        call = _Call(j, finish, value, out_bytes=tensor_bytes(value), start=start)
        self._pending[j].append(call)
        return call

    def _send(self, nbytes: int) -> float:
        if self.bytes_per_s is None:
            return self.clock
        self._out_free = max(self.clock, self._out_free) + nbytes / self.bytes_per_s
        return self._out_free

    def _receive(self, call: _Call) -> None:
        """Collect one answer: count its bytes, move the clock to its arrival."""
        arrival = call.finish
        if self.bytes_per_s is not None:
            arrival = self._in_free = max(call.finish, self._in_free) + call.out_bytes / self.bytes_per_s
        self.counters.bytes_from_workers += call.out_bytes
        self._advance(max(self.clock, arrival))

    def _advance(self, t: float) -> None:
        self.clock = t
        self.counters.sim_time_s = t

    def _mark_lagging(self) -> None:
        # Work submitted before this gather and still unfinished marks a worker as lagging.
        self._lag_until = list(self._busy_until)

    def _answer_or_timeout(self, call: _Call) -> float:
        """When ``call`` answers, or earlier when its worker times out on it."""
        if self.worker_timeout_s is None:
            return call.finish
        return min(call.finish, call.start + self.worker_timeout_s)

    def _time_out(self, worker: int) -> None:
        self.kill(worker)
        self.counters.timeouts += 1

    def _enforce_backlog(self) -> None:
        for j in self.alive():
            pending = self._pending[j]
            while pending and pending[0].finish <= self.clock:
                pending.popleft()
            silent_at = self._answer_or_timeout(pending[0]) if pending else None
            if silent_at is not None and silent_at < pending[0].finish and silent_at <= self.clock:
                self._time_out(j)
            elif self.max_backlog is not None and len(pending) > self.max_backlog:
                self.kill(j)
                self.counters.backlog_kills += 1

    def _take(self, round_: Round) -> dict[int, _Call]:
        super()._take(round_, InProcessRound)
        return round_.calls
