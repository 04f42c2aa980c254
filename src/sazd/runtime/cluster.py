"""The interface between the master and its n workers.

The master only talks to workers through a ``Cluster``. A round sends one call to every live
worker (``submit``) and continues with the first k answers (``first_k``); calls to one worker run in
submission order, so a slow worker applies every update in order and stays consistent, only late.
Backends: ``InProcessCluster`` (workers are objects in this process; latency is simulated by a
model) and ``RayCluster`` (workers are Ray actors).
"""

from __future__ import annotations

import contextlib
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sazd.runtime.responses import ResponseLog
from sazd.runtime.worker import check_method


class ClusterError(RuntimeError):
    """The cluster cannot continue, e.g. fewer than k workers are alive."""


@dataclass
class Counters:
    """Deterministic traffic counters plus timings, accumulated over the cluster's life."""

    bytes_to_workers: int = 0
    bytes_from_workers: int = 0
    # Master egress when each distinct tensor leaves the master once (what a multicast or broadcast-tree
    # network needs; sazd's own connections send each worker a copy, counted in bytes_to_workers): a
    # broadcast counts once, and a tensor sent again later, unmodified (a round's X^T to the workers
    # the round skipped), costs nothing more.
    bytes_sent_once: int = 0
    # Ray backend: bytes written into the shared-memory arena, once per tensor, which workers on the
    # master's machine copy from memory instead of reading from their socket (part of bytes_to_workers)
    bytes_through_memory: int = 0
    # Ray backend: bytes of the collected answers that came from the workers' own shared-memory arenas
    # instead of their sockets (part of bytes_from_workers)
    bytes_from_memory: int = 0
    calls: int = 0
    rounds: int = 0
    late_results_discarded: int = 0
    failed_results: int = 0
    sim_time_s: float = 0.0  # in-process backend only: simulated wall time of all rounds
    respawns: int = 0  # workers replaced by fresh ones (the master then repairs them)
    backlog_kills: int = 0  # workers declared dead because their queue of calls exceeded max_backlog
    timeouts: int = 0  # workers declared dead because they were silent longer than the worker timeout
    node_losses: int = 0  # workers declared dead because Ray declared their node dead
    # calls that raised inside a worker: {"worker", "method", "error"}; each made its worker an erasure
    worker_errors: list[dict[str, Any]] = field(default_factory=list)
    respawned: dict[int, int] = field(default_factory=dict)  # worker -> times respawned
    responses: ResponseLog = field(default_factory=ResponseLog)  # every compute round, every worker

    def snapshot(self) -> dict[str, Any]:
        return {
            "bytes_to_workers": self.bytes_to_workers,
            "bytes_from_workers": self.bytes_from_workers,
            "bytes_sent_once": self.bytes_sent_once,
            "bytes_through_memory": self.bytes_through_memory,
            "bytes_from_memory": self.bytes_from_memory,
            "calls": self.calls,
            "rounds": self.rounds,
            "late_results_discarded": self.late_results_discarded,
            "failed_results": self.failed_results,
            "sim_time_s": self.sim_time_s,
            "respawns": self.respawns,
            "backlog_kills": self.backlog_kills,
            "timeouts": self.timeouts,
            "node_losses": self.node_losses,
            "worker_errors": len(self.worker_errors),
        }

    def note_respawn(self, worker: int) -> None:
        self.respawns += 1
        self.respawned[worker] = self.respawned.get(worker, 0) + 1

    def note_error(self, worker: int, method: str, err: BaseException) -> None:
        """Record an exception raised by ``worker``'s call of ``method`` (the worker becomes an erasure)."""
        self.worker_errors.append({"worker": worker, "method": method,
                                   "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"})

    def recent_errors(self, count: int = 3) -> str:
        """The latest worker errors in one phrase ('' when none), for error messages."""
        if not self.worker_errors:
            return ""
        shown = "; ".join(f"worker {e['worker']} {e['method']!r}: {e['error']}"
                          for e in self.worker_errors[-count:])
        return f"; worker errors: {shown}"


def map_tensors(obj: Any, fn: Callable[[Any], Any], kind: type = Tensor) -> Any:
    """``obj`` with ``fn`` applied to every ``kind`` (default: tensor) inside nested tuples, lists, dicts."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: map_tensors(v, fn, kind) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, kind) for v in obj)
    return obj


def iter_tensors(obj: Any, kind: type = Tensor) -> list[Any]:
    """Every ``kind`` (default: tensor) inside ``obj`` (nested tuples, lists, dicts), in order."""
    if isinstance(obj, kind):
        return [obj]
    # one loop with a stack, no call per container: it walks every argument of every worker call
    found: list[Any] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, kind):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(item.values()))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return found


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside ``obj`` (nested tuples, lists, dicts)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


class SentTensors:
    """The tensors that have left the master, by identity, while they live unmodified (same
    ``_version``); an entry is dropped when its tensor dies."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int]] = {}

    def __contains__(self, t: Tensor) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == t._version

    def add(self, t: Tensor) -> None:
        if t.is_inference():  # made under torch.inference_mode: no version counter to watch, not kept
            return
        key = id(t)
        self._entries[key] = (weakref.ref(t, lambda _: self._entries.pop(key, None)), t._version)


class Broadcast(tuple):
    """One argument tuple for every worker called: ``Broadcast((key, x))``."""


class PerWorker(dict):
    """An argument tuple per worker id: ``PerWorker({j: (key, block_j) ...})``."""


Args = Broadcast | PerWorker | tuple | Sequence[tuple] | dict[int, tuple]


def resolve_args(args: Args, workers: Sequence[int], n: int) -> tuple[dict[int, tuple], bool]:
    """The argument tuple of each worker in ``workers`` and whether it is one broadcast tuple.

    ``Broadcast`` (a tuple) goes to every worker, ``PerWorker`` (a dict {worker: tuple}) gives each
    its own; a plain ``tuple`` or ``dict`` means the same, and a ``list`` of n tuples is indexed by
    worker id.
    """
    if isinstance(args, tuple):
        return {j: args for j in workers}, True
    if isinstance(args, dict):
        missing = [j for j in workers if j not in args]
        if missing:
            raise ValueError(f"args: no argument tuple for workers {missing}; give one per called worker")
        return {j: args[j] for j in workers}, False
    if isinstance(args, list):
        if len(args) != n:
            raise ValueError(
                f"args: per-worker list has {len(args)} entries, expected n={n} (indexed by worker id); "
                "pass a tuple to broadcast one argument tuple to all workers"
            )
        return {j: args[j] for j in workers}, False
    raise ValueError(
        f"args must be Broadcast(tuple), PerWorker({{worker: tuple}}) or a list of n tuples, "
        f"got {type(args).__name__}"
    )


@dataclass(frozen=True)
class Answers:
    """The answers of one compute round and the workers it asked (DEU reuses the round's inputs on
    exactly those)."""

    results: dict[int, Any]
    workers: frozenset[int]


class Round(ABC):
    """Handle for one call submitted to several workers."""

    workers: list[int]


def choose_ready(behind: dict[int, tuple[int, float]], k: int, in_line: Collection[int] = ()) -> list[int]:
    """The workers to ask next, from ``behind``: {live worker: (its unfinished calls of earlier rounds,
    an order among the busy: the sooner done, the lower)}. Every idle worker is asked, topped up with
    the least-behind busy ones so that at least k are. One more than k is asked where a worker of
    ``in_line`` (merely late, not stuck: on Ray, busy with a single call of the latest round;
    in-process, with a single call) can take it: a round asked of exactly k would wait for any of
    them that stalls within it. Any other busy worker gets no more work while enough others can
    answer (its queue would only grow)."""
    idle = [j for j, (calls, _) in behind.items() if calls == 0]
    busy = sorted((j for j in behind if j not in idle), key=lambda j: (*behind[j], j))
    asked = idle + busy[: max(0, k - len(idle))]
    spare = [j for j in busy if j not in asked and j in in_line]
    if len(asked) <= k and spare:
        asked.append(spare[0])
    return sorted(asked)


class Cluster(ABC):
    """n workers, each holding coded state; see module docstring."""

    n: int
    counters: Counters

    @abstractmethod
    def submit(self, method: str, args: Args, workers: Sequence[int] | None = None) -> Round:
        """Call ``Worker.<method>(*args)`` on each of ``workers`` (default: every live worker).

        ``args``: ``Broadcast(tuple)`` for all workers or ``PerWorker({worker: tuple})`` (per-worker
        inputs such as coded blocks); see ``resolve_args`` for the short forms.
        """

    @abstractmethod
    def first_k(
        self, round_: Round, k: int, enough: Callable[[Collection[int]], bool] | None = None,
        patience_s: float = 0.0,
    ) -> dict[int, Any]:
        """Block until ``k`` workers of the round have answered successfully; return {worker: result}.

        ``enough`` (e.g. ``code.can_decode``) replaces the plain count test when given, for codes such
        as replication where not every k-set decodes (the in-process backend asks it only once k
        answers are in: no code decodes from fewer).

        ``patience_s``: once the k answers are in and some of them are spares' (``spare``), wait up to
        this long for the answers of the other workers of the round; each that comes replaces a
        spare's (a systematic code then decodes by a copy). Only without ``enough`` (any k decode).
        The in-process backend waits only where the master's own time is on its clock
        (``master_time="measured"``): elsewhere the wait would cost time and save none.

        Failed calls (dead workers) are erasures: the worker is marked dead and another answer is
        awaited. Answers that arrive after the k-th are discarded. Raises ``ClusterError`` when fewer
        than k workers can still answer.
        """

    @abstractmethod
    def wait_all(self, round_: Round) -> dict[int, Any]:
        """Wait for every live worker of the round (used for loads and state fetches)."""

    @abstractmethod
    def ready_workers(self, k: int) -> list[int]:
        """Workers to send the next compute round to (``choose_ready`` of how far behind each live
        worker is)."""

    def describe(self) -> dict[str, Any]:
        """Backend and settings, for run reports."""
        return {"backend": type(self).__name__, "n": self.n}

    def workers_info(self) -> list[dict[str, Any]]:
        """Where each worker runs: ``{"index", "node_id", "node_ip", "device"}`` per worker index."""
        device = str(getattr(self, "device", "cpu"))
        return [{"index": j, "node_id": "in-process", "node_ip": None, "device": device}
                for j in range(self.n)]

    @abstractmethod
    def note_master_time(self, seconds: float) -> None:
        """Account ``seconds`` of master-side work on this backend's clock (real time: nothing to do)."""

    @abstractmethod
    def now(self) -> float:
        """Seconds on this backend's clock (real backends: wall time; in-process: simulated time)."""

    def compute(self, method: str, args: Args, k: int,
                enough: Callable[[Collection[int]], bool] | None = None, patience_s: float = 0.0) -> Answers:
        """One compute round, the single place of the retry and first-k policy: ask the ready workers
        (``ready_workers``; every live one when those would not satisfy ``enough``), continue with the
        first k answers (or once ``enough`` holds; ``patience_s``: see ``first_k``). When a worker of the
        round dies and the busy ones were left out, the round is asked once more of every live worker."""
        workers = self.ready_workers(k)
        if enough is not None and not enough(workers):  # e.g. replication: not every k-set decodes
            workers = self.alive()
        try:
            answers = self.first_k(self.submit(method, args, workers), k, enough, patience_s)
            return Answers(answers, frozenset(workers))
        except ClusterError:
            alive = self.alive()
            if set(alive) <= set(workers) or not (enough(alive) if enough else len(alive) >= k):
                raise
            return Answers(self.first_k(self.submit(method, args, alive), k, enough, patience_s),
                           frozenset(alive))

    def between_rounds(self) -> contextlib.AbstractContextManager[None]:
        """Around the master's own work while none of its rounds is in flight (the weight gradients
        of a DEU step, before the update goes out): where the workers share the master's cores, they
        are idle then, and the backend may give the master every core it had. In-process: as is."""
        return contextlib.nullcontext()

    def spare(self, workers: Sequence[int]) -> None:
        """``workers`` answer only when others are late (a code's workers beyond the k it prefers):
        where workers share cores, the backend may run them at a lower CPU priority (see
        ``placement.spare_nice``); ``first_k`` may wait a little for the others (``patience_s``)."""
        self._check_workers(workers)

    @staticmethod
    def _prefer(got: dict[int, Any], spares: Collection[int], answers: dict[int, Any]) -> list[int]:
        """Put the ``answers`` of workers that are no spares in ``got`` in place of spares' answers,
        one for one; returns the spares whose answers left ``got``."""
        replaced = []
        for j, value in answers.items():
            held = [i for i in got if i in spares]
            if not held:
                break
            del got[held[-1]]
            replaced.append(held[-1])
            got[j] = value
        return replaced

    @abstractmethod
    def alive(self) -> list[int]:
        """Worker ids currently believed alive."""

    @abstractmethod
    def kill(self, worker: int) -> None:
        """Worker ``worker`` dies now: its unfinished calls fail, and so do later ones (an erasure)."""

    @abstractmethod
    def respawn(self, *workers: int) -> None:
        """Replace workers with fresh ones (empty state), started together: the master must repair
        each."""

    @abstractmethod
    def close(self) -> None:
        """Stop all workers; no processes may outlive this call."""

    # ------------------------------------------------ shared argument checks
    _closed: bool = False
    _sent: SentTensors  # set by each backend's __init__

    def _take(self, round_: Round, kind: type[Round]) -> None:
        """Mark a round of this cluster as gathered (each round is gathered once)."""
        self._check_open()
        if not isinstance(round_, kind) or getattr(round_, "cluster_id", None) != id(self):
            raise ValueError(f"round_ must be a round submitted to this cluster, got {round_!r}")
        if round_.gathered:
            raise ValueError(f"round of {round_.method!r} was already gathered; gather each round once")
        round_.gathered = True

    def _prepare_submit(
        self, method: str, args: Args, workers: Sequence[int] | None
    ) -> tuple[list[int], dict[int, tuple], dict[int, Any]]:
        """Validate a submit; return (workers, per-worker argument tuples, what each worker is sent)
        and count the master's egress with each tensor sent once. Nothing is counted when a check
        fails, including the backend's ``_payloads``."""
        check_method(method)
        workers = self.alive() if workers is None else self._check_workers(workers)
        if not workers:
            raise ClusterError(f"submit {method!r}: no live workers (n={self.n}, all dead); respawn some")
        per_worker, broadcast = resolve_args(args, workers, self.n)
        payloads = self._payloads(method, workers, per_worker, broadcast)
        self._send_once(args if broadcast else list(per_worker.values()))
        return workers, per_worker, payloads

    def _payloads(self, method: str, workers: list[int], per_worker: dict[int, tuple],
                  broadcast: bool) -> dict[int, Any]:
        """What each worker is sent (the backend may encode, and refuse what it cannot send)."""
        return per_worker

    def _send_once(self, args: Any) -> None:
        """Count each tensor of ``args`` that has not left the master before (unmodified)."""
        for t in iter_tensors(args):
            if t not in self._sent:
                self._sent.add(t)
                self.counters.bytes_sent_once += t.numel() * t.element_size()

    def _renewed(self, worker: int) -> None:
        """Bookkeeping of a replaced worker: alive, a new incarnation, its task count from zero."""
        self._dead.discard(worker)
        self._tasks[worker] = 0
        self._incarnation[worker] += 1
        self.counters.note_respawn(worker)

    def _check_workers(self, workers: Sequence[int]) -> list[int]:
        workers = list(workers)
        bad = [j for j in workers if not isinstance(j, int) or not 0 <= j < self.n]
        if bad or len(set(workers)) != len(workers):
            raise ValueError(f"workers must be distinct ids in 0..{self.n - 1}, got {workers!r}")
        return workers

    def _stop_test(
        self, k: int, enough: Callable[[Collection[int]], bool] | None
    ) -> Callable[[Collection[int]], bool]:
        """When ``first_k`` has enough answers: ``enough`` when given, else k of them (k checked)."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n:
            raise ValueError(f"k must be an integer in 1..n={self.n}, got {k!r}")
        return enough if enough is not None else (lambda got: len(got) >= k)

    @staticmethod
    def _check_patience(patience_s: Any) -> float:
        """``first_k``'s ``patience_s`` as seconds (a number >= 0, infinity allowed), or ValueError."""
        if isinstance(patience_s, bool) or not isinstance(patience_s, int | float) or not patience_s >= 0:
            raise ValueError(f"patience_s must be a number of seconds >= 0 (0: no wait), got {patience_s!r}")
        return float(patience_s)

    def _check_open(self) -> None:
        if self._closed:
            raise ClusterError("the cluster is closed")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------ schedule state (checkpoints)
    def schedule_state(self) -> dict[str, Any]:
        """What decides the rest of the schedule, as JSON: per-worker task numbers (the latency model's
        input), incarnations (respawns) and dead workers, plus what the backend's own clock needs
        (``_clock_state``). ``load_schedule_state`` on a fresh cluster of the same settings continues
        exactly from here."""
        return {"n": self.n, "tasks": list(self._tasks), "incarnation": list(self._incarnation),
                "dead": sorted(self._dead), **self._clock_state()}

    def load_schedule_state(self, state: dict[str, Any]) -> None:
        """Continue from ``schedule_state()`` of an earlier cluster (read from disk: every field is
        checked; a bad one raises ValueError naming it). A ``clock`` entry is the in-process backend's
        simulated clock: taken over by a backend that has one, ignored by one whose time is real (an
        in-process run may continue on Ray, and the reverse)."""
        want = {"n", "tasks", "incarnation", "dead"}
        if not isinstance(state, dict) or not want <= set(state) <= want | {"clock"}:
            raise ValueError(f"schedule must hold {sorted(want)} and optionally 'clock', got {state!r:.200}")
        if state["n"] != self.n:
            raise ValueError(f"schedule.n = {state['n']!r}, but the cluster has n={self.n} workers")
        tasks, incarnation = self._counts("tasks", state["tasks"]), self._counts("incarnation",
                                                                                 state["incarnation"])
        dead = state["dead"]
        if not isinstance(dead, list) or len(set(dead)) != len(dead) or not all(
                isinstance(j, int) and not isinstance(j, bool) and 0 <= j < self.n for j in dead):
            raise ValueError(f"schedule.dead must list distinct worker ids in 0..{self.n - 1}, got {dead!r}")
        clock = self._check_clock(state["clock"]) if "clock" in state else None
        for j in dead:
            if j in self.alive():
                self.kill(j)
        self._tasks, self._incarnation = list(tasks), list(incarnation)
        if clock is not None:
            self._load_clock(clock)

    def _counts(self, name: str, value: Any) -> list[int]:
        if not isinstance(value, list) or len(value) != self.n or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"schedule.{name} must be a list of n={self.n} integers >= 0, got {value!r}")
        return value

    def _clock_state(self) -> dict[str, Any]:
        """A backend with a simulated clock: ``{"clock": ...}``; real time needs nothing."""
        return {}

    def _check_clock(self, clock: Any) -> Any:
        """The checked clock of a schedule, or None where this backend's time is real (ignored)."""
        return None

    def _load_clock(self, clock: Any) -> None:
        """Take over a clock that ``_check_clock`` returned (only a backend with a clock returns one)."""
        raise NotImplementedError(f"{type(self).__name__} has no simulated clock to load")
