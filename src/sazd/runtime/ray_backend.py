"""Ray cluster: each worker is a Ray actor wrapping ``Worker``; calls travel over direct connections.

- ``RayCluster(n)`` starts a local Ray on loopback by itself (usage statistics off, no dashboard);
  ``address=...`` joins an existing cluster (a cluster that does not answer within ``connect_timeout_s``
  is a ``ClusterError``); an already initialised Ray is reused. ``close()`` kills the actors and shuts
  Ray down only if this object started it; every step is bounded, and processes of ours that outlive
  it are killed by PID.
- Placement (``sazd.runtime.placement``): the actors live in one placement group, spread over nodes
  by default (``placement="pack"`` packs them); ``workers_info()`` says where each one runs. While
  the cluster is open, the master's torch threads are lowered to the cores its workers on the same
  machine leave (``master_threads``; given back at ``close``): a master that computes on the cores
  its own workers need slows both.
- Ray starts, places, watches and kills the actors. The calls of training and their answers travel
  over one authenticated TCP connection per worker (``sazd.runtime.channel``), not through Ray's task
  path and object store, whose per-call cost dominated small rounds. ``submit`` copies its tensor
  arguments once (a broadcast once for every worker), so the master may change them afterwards.
- ``first_k`` takes answers in arrival order: a broken connection (the actor died, was killed or lost
  its node) answers every unanswered call of that worker as an erasure, and another answer is
  awaited. Late answers are read by the connection's own thread and dropped at the next round
  (their status checked); queued calls are never cancelled. An argument that cannot be sent is a
  TypeError at ``submit``, before any worker is asked.
- Every wait is bounded. A worker with unfinished calls that has not finished any call for
  ``worker_timeout_s`` is silent: it is killed (an erasure; the master respawns and repairs it). Every
  2 s while the master works or waits, the control plane is checked: its loss (the head's GCS, our
  raylet) is a ``ClusterError``, and a worker on a node Ray declared dead is killed (an erasure).
- Every call is answered with a status and a value. Fire-and-forget calls (loads, updates) and late
  answers are never used, but their status is checked at the next round: an exception
  raised in any worker call is recorded (``counters.worker_errors``, naming worker and method) and
  makes that worker an erasure; a round in which every asked worker raised re-raises the worker's
  exception (its type, with the worker and method in a note).
- Calls to one actor run in submission order, so a slow actor applies every update in order. The
  cluster tracks each actor's unfinished calls: ``ready_workers`` avoids actors still working on
  calls sent before the last gather, and an actor with more than ``max_backlog`` unfinished calls is
  killed (its queue would only grow) so that the master can respawn and repair it.
- Stragglers are real: the latency model's factor for each task is sent with the call and the actor
  sleeps ``(factor - 1)`` times its compute time (``Worker._timed``: products and updates; loads
  and state fetches are not slowed, unlike the in-process simulation which slows every call);
  ``set_delay`` on an actor multiplies in. A ``DeadWorkers`` model really kills the actor when its task comes.
- Actors have ``max_restarts=0``: a restarted actor would hold no blocks while the master believed
  it repaired; the master respawns and repairs instead.

Counters follow the in-process conventions (see ``sazd.runtime.inproc``): a broadcast argument's
bytes count once per worker called; only collected answers count as bytes from workers. ``sim_time_s``
stays 0: time is real here.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
import torch
from ray.exceptions import RaySystemError, RpcError

from sazd.runtime import channel
from sazd.runtime import placement as place
from sazd.runtime.channel import Channel, Reply, WorkerLost, WorkerRaised, encode, open_channels
from sazd.runtime.cluster import (
    Cluster,
    ClusterError,
    Counters,
    Round,
    SentTensors,
    map_tensors,
    tensor_bytes,
)
from sazd.runtime.latency import LatencyModel, parse_latency
from sazd.runtime.tls import ClusterCerts, Identity
from sazd.runtime.worker import METHODS, Worker, check_method

# Failures of Ray itself rather than of one worker: the run cannot continue.
_CONTROL = (RaySystemError, RpcError, OSError)
_WATCH_EVERY_S = 2.0  # how often a joined cluster's control plane is pinged while waiting
_SHUTDOWN_S = 20.0  # bound on closing: killing actors, shutting Ray down
_log = logging.getLogger("sazd.runtime")


def _boot_id() -> str:
    """This machine's boot id: a PID means the same process only on the same boot of the same machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _kill_pid(info: dict[str, Any]) -> bool:
    """SIGKILL the process ``info`` describes (``pid``, ``boot_id``, ``start``) if it still runs on
    this machine (same boot, same start time: a reused PID is left alone); True if a signal was sent."""
    pid = info.get("pid")
    if pid is None or info.get("boot_id") != _boot_id() or _start_time(pid) != info.get("start"):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def _start_time(pid: int) -> int | None:
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
    return [(pid, start) for pid in found if (start := _start_time(pid)) is not None]


def _within(fn: Callable[[], Any], timeout_s: float) -> Any:
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


def _bounded(fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread; True if it finished within ``timeout_s`` (errors are swallowed)."""
    try:
        _within(fn, timeout_s)
    except TimeoutError:
        return False
    except Exception:
        pass
    return True


def start_local_ray(num_cpus: int | None = None, object_store_gb: float = 2.0) -> bool:
    """Start a local, loopback-only Ray unless one is already initialised; True if this call started it.

    ``num_cpus`` is Ray's logical CPU count (scheduling only); it should cover the actors plus the
    driver, or the raylet warns that it starts more worker processes than it expects."""
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
        _within(lambda: ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING),
                timeout_s)
    except TimeoutError:
        raise ClusterError(f"the Ray cluster at {address} did not answer within {timeout_s:g} s; check the "
                           f"address (host:port of the head's GCS) and that the cluster is up") from None
    except BaseException as err:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {' '.join(str(err).split())[:300]}") \
            from err


class RayWorker(Worker):
    """The actor: a ``Worker`` answering calls on its channel, each with the task's slowdown factor."""

    def __init__(self, index: int, device: str = "cpu", torch_threads: int | None = None,
                 compute_dtype: str | None = None) -> None:
        super().__init__(index, device, compute_dtype)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.base_delay = 1.0

    def set_delay(self, factor: float) -> int:
        super().set_delay(factor)
        self.base_delay = self.delay_factor
        return self.index

    def _answer(self, method: str, slowdown: float, args: tuple) -> Any:
        check_method(method)
        self.delay_factor = self.base_delay * slowdown
        try:
            return map_tensors(getattr(self, method)(*args), torch.Tensor.cpu)
        finally:
            self.delay_factor = self.base_delay

    def open_channel(self, key: bytes, identity: Identity | None) -> dict[str, Any]:
        """Listen for the master's connection (proving ``key``; TLS with ``identity`` if given); say
        where this actor runs (node, device, its process, for killing it by PID) and the address to
        connect to."""
        context = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        return {"index": self.index, "node_id": context.get_node_id(), "node_ip": node_ip,
                "device": str(self.device), "pid": os.getpid(), "boot_id": _boot_id(),
                "threads": torch.get_num_threads(),
                "address": channel.serve(node_ip, key, self._answer, METHODS, identity)}


_ACTOR = ray.remote(RayWorker)


@dataclass(eq=False)
class _Call:
    """One call sent to one actor."""

    worker: int
    method: str
    reply: Reply  # done when the call finished or failed
    epoch: int  # the cluster's gather count when sent
    seq: int  # the worker's task number: calls to one worker run in this order
    incarnation: int
    sent: float  # time.monotonic() when sent
    gathering: bool = False  # a gather is waiting for it: leave it to the gather
    fetched: bool = False  # the gather took its value or error: nothing left to check


@dataclass
class RayRound(Round):
    method: str
    workers: list[int]
    calls: dict[int, _Call | None] = field(repr=False)  # worker -> call, or None: dead before sending
    cluster_id: int = 0
    gathered: bool = False
    sent: float = 0.0


class RayCluster(Cluster):
    """``n`` Ray actors; see module docstring.

    ``worker_timeout_s``: a worker silent that long (unfinished calls, none finished) is killed as an
    erasure. ``start_timeout_s`` bounds starting actors (each imports torch) and reserving their
    placement. ``placement``: ``"spread"`` (workers on distinct nodes while there are nodes) or
    ``"pack"``. ``torch_threads``: intra-op threads per actor. ``compute_dtype``: the workers' product
    precision (``"bfloat16"``, ``"float16"``; answers come back in the blocks' dtype).
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
        worker_timeout_s: float = 60.0,
        torch_threads: int | None = 1,
        object_store_gb: float = 2.0,
        placement: str = "spread",
        connect_timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
        compute_dtype: str | None = None,
        tls: bool | str | os.PathLike | None = None,
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
        for name, value in (("worker_timeout_s", worker_timeout_s), ("connect_timeout_s", connect_timeout_s),
                            ("start_timeout_s", start_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        Worker.check_dtype(compute_dtype)
        self._certs = ClusterCerts.resolve(tls)  # before anything starts: a bad directory is a ValueError
        self.placement = place.check_placement(placement)
        self.n = n
        self.latency = parse_latency(latency, seed).bind(n)
        self.max_backlog = max_backlog
        self.worker_timeout_s = worker_timeout_s
        self.start_timeout_s = start_timeout_s
        self.counters = Counters()
        self.device = "cuda" if gpus_per_worker > 0 else "cpu"
        self.compute_dtype = compute_dtype
        self.address = address
        self.started_ray = False
        self.actors: list[Any] = []
        self._info: list[dict[str, Any]] = [{} for _ in range(n)]
        self._outstanding: list[deque[_Call]] = [deque() for _ in range(n)]
        self._heard = [time.monotonic()] * n  # when each worker was last seen finishing a call
        self._epoch = 0
        self._tasks = [0] * n
        self._incarnation = [0] * n
        self._dead: set[int] = set()
        self._closed = False
        self._sent = SentTensors()
        self._replied = threading.Condition()  # notified by the channels whenever a reply is done
        self._channels: list[Channel | None] = [None] * n
        self._group = None
        self._ray_procs: list[tuple[str, Any]] = []  # (name, Popen) of the Ray we started
        self._last_watch = time.monotonic()
        self._lost = False  # the control plane is gone: close() kills by PID instead of asking Ray
        self._threads_before = torch.get_num_threads()  # the master's own, given back at close
        self.master_threads = self._threads_before
        if ray.is_initialized():
            pass
        elif address is None:
            self.started_ray = start_local_ray(num_cpus=max(os.cpu_count() or 1, n + 2),
                                               object_store_gb=object_store_gb)
            node = ray._private.worker._global_node
            self._ray_procs = [(name, info.process) for name, infos in node.all_processes.items()
                               for info in infos]
        else:
            join_ray(address, connect_timeout_s)
            self.started_ray = True
        _close_at_exit(self)  # from here on, nothing we started may outlive the interpreter
        try:
            have = ray.cluster_resources()
            for name, per_worker, arg in (("GPU", gpus_per_worker, "gpus_per_worker"),
                                          ("CPU", num_cpus_per_worker, "num_cpus_per_worker")):
                if n * per_worker > have.get(name, 0) + 1e-9:
                    raise ValueError(
                        f"{arg}={per_worker:g}: {n} workers need {n * per_worker:g} {name} but the Ray "
                        f"cluster has {have.get(name, 0):g}; lower {arg} (0 for none) or join a bigger "
                        "cluster"
                    )
            bundle = {"CPU": num_cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
            if any(bundle.values()):  # Ray refuses empty bundles; zero-resource actors need no placement
                self._group = place.reserve(n, bundle, placement, start_timeout_s)
            self._actor_options = {"num_cpus": num_cpus_per_worker, "num_gpus": gpus_per_worker,
                                   "max_restarts": 0, "max_task_retries": 0}
            self._torch_threads = torch_threads
            self.actors = [self._new_actor(j) for j in range(n)]
            self._await_started(range(n))
            self._share_cores()
            nodes = _within(place.alive_nodes, 5.0)
        except BaseException:
            self.close()
            raise
        warning = place.sharing([w["node_id"] for w in self._info], len(nodes), placement)
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        self._say_data_plane()

    def _say_data_plane(self) -> None:
        """With workers on other nodes, say whether their connections are encrypted."""
        here = ray.get_runtime_context().get_node_id()
        remote = sorted(j for j, info in enumerate(self._info) if info.get("node_id") != here)
        if not remote:
            return
        if self._certs is None:
            warnings.warn(f"workers {remote} run on other nodes and the data plane is NOT encrypted "
                          "(authenticated with HMAC: an on-path attacker can read the tensors and break "
                          "connections, not alter them or run code); pass tls=True (--tls) to encrypt it",
                          RuntimeWarning, stacklevel=3)
        else:
            _log.info("workers %s run on other nodes; the data plane is encrypted (TLS 1.3, %s "
                      "certificates)", remote, self._certs.source)

    # ------------------------------------------------------------------ rounds
    def submit(
        self, method: str, args: Sequence[tuple] | tuple, workers: Sequence[int] | None = None
    ) -> RayRound:
        self._check_open()
        with self._control_plane():
            workers, per_worker, payloads = self._prepare_submit(method, args, workers)
            calls: dict[int, _Call | None] = {}
            now = time.monotonic()
            for j in workers:
                self.counters.bytes_to_workers += tensor_bytes(per_worker[j])
                self.counters.calls += 1
                task = self._tasks[j]
                self._tasks[j] += 1
                if j not in self._dead and self.latency.fails(j, task, self._incarnation[j]):
                    self.kill(j)
                if j in self._dead:
                    calls[j] = None
                    self.counters.failed_results += 1
                    continue
                slowdown = self.latency.slowdown(j, task)
                reply = self._channels[j].send(method, slowdown, payloads[j])
                if not self._outstanding[j]:
                    self._heard[j] = now  # silence is counted from when it has work
                call = _Call(j, method, reply, self._epoch, task, self._incarnation[j], now)
                calls[j] = call
                self._outstanding[j].append(call)
        self.counters.rounds += 1
        return RayRound(method, list(workers), calls, id(self), sent=now)

    def _payloads(self, method: str, workers: list[int], per_worker: dict[int, tuple],
                  broadcast: bool) -> dict[int, Any]:
        """Each worker's call encoded (and checked) before anyone is asked, each tensor copied once."""
        copies: dict[int, torch.Tensor] = {}
        try:
            if broadcast:
                shared = encode(_own_copy(per_worker[workers[0]], copies))
                return {j: shared for j in workers}
            return {j: encode(_own_copy(per_worker[j], copies)) for j in workers}
        except TypeError as err:
            raise TypeError(f"submit {method!r}: {err}") from None

    def first_k(
        self, round_: Round, k: int, enough: Callable[[Collection[int]], bool] | None = None
    ) -> dict[int, Any]:
        calls = self._take(round_)
        done = self._stop_test(k, enough)
        got, times, failed = self._gather(round_, calls, done)
        self.counters.responses.record(self.n, round_.workers, times, failed)
        if not done(got.keys()):
            raise ClusterError(
                f"first_k({round_.method!r}): needed {k} answers{' that can decode' if enough else ''}, "
                f"got {len(got)} from {len(calls)} workers asked ({len(failed)} failed); "
                f"{len(self.alive())} of n={self.n} workers alive{self.counters.recent_errors()}"
            )
        late = [j for j, call in calls.items() if call is not None and j not in got and j not in failed]
        self.counters.late_results_discarded += len(late)
        self._epoch += 1
        return got

    def wait_all(self, round_: Round) -> dict[int, Any]:
        """Every successful answer of the round (dead workers are left out: check the keys)."""
        calls = self._take(round_)
        got, _, _ = self._gather(round_, calls, lambda got: False)
        self._epoch += 1
        return got

    def ready_workers(self, k: int) -> list[int]:
        self._check_open()
        with self._control_plane():
            self._prune()
        alive = self.alive()
        older = {j: sum(call.epoch < self._epoch for call in self._outstanding[j]) for j in alive}
        idle = [j for j in alive if older[j] == 0]
        busy = sorted((j for j in alive if older[j]), key=lambda j: (older[j], j))
        return sorted(idle + busy[: max(0, k - len(idle))])

    # ----------------------------------------------------------------- workers
    def alive(self) -> list[int]:
        return [j for j in range(self.n) if j not in self._dead]

    def kill(self, worker: int) -> None:
        """Kill actor ``worker`` (no restart): its unfinished calls fail, as do later calls. The process
        is also killed by PID when it runs on this machine (a frozen process may not answer Ray)."""
        self._check_workers([worker])
        self._record_raised(worker)
        if worker < len(self.actors):
            with contextlib.suppress(Exception):  # already dead, or Ray already shut down
                ray.kill(self.actors[worker], no_restart=True)
            _kill_pid(self._info[worker])
        if self._channels[worker] is not None:
            self._channels[worker].close(f"worker {worker} was killed")
            self._channels[worker] = None
        self._dead.add(worker)
        self._outstanding[worker].clear()

    def _record_raised(self, worker: int) -> None:
        """Before ``worker``'s unfinished calls are forgotten: record what its finished, unfetched calls
        raised (a kill must not hide why a load or update failed)."""
        for call in self._outstanding[worker]:
            if call.reply.done and not call.fetched and not call.gathering:
                with contextlib.suppress(WorkerLost):  # died: nothing raised by the worker's code
                    try:
                        call.reply.result()
                    except WorkerRaised as err:
                        self.counters.note_error(worker, call.method, err.cause)

    def respawn(self, worker: int) -> None:
        self._check_open()
        self._check_workers([worker])
        self.kill(worker)
        with self._control_plane():
            self.actors[worker] = self._new_actor(worker)
            # Wait until the new process is up: calls queued while it starts would count as backlog.
            self._await_started([worker], what=f"replacement for worker {worker}")
        self._share_cores()
        self._dead.discard(worker)
        self._tasks[worker] = 0
        self._incarnation[worker] += 1
        self.counters.note_respawn(worker)

    def workers_info(self) -> list[dict[str, Any]]:
        return [{key: info.get(key) for key in ("index", "node_id", "node_ip", "device")} | {"index": j}
                for j, info in enumerate(self._info)]

    def describe(self) -> dict[str, Any]:
        nodes = 0
        if ray.is_initialized() and not self._closed:
            with contextlib.suppress(Exception):
                nodes = len(_within(place.alive_nodes, 5.0))
        return {
            "backend": "ray",
            "n": self.n,
            "latency": self.latency.describe(),
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "address": self.address,
            "started_ray": self.started_ray,
            "placement": self.placement,
            "worker_timeout_s": self.worker_timeout_s,
            "nodes": nodes,
            "worker_nodes": len({info.get("node_id") for info in self._info}),
            "master_threads": self.master_threads,
            "data_plane": self.data_plane,
        }

    @property
    def data_plane(self) -> str:
        """``"tls"`` (encrypted, mutually authenticated) or ``"hmac"`` (authenticated, in clear)."""
        return "tls" if self._certs else "hmac"

    def backlog(self, worker: int) -> int:
        """Unfinished calls of ``worker``."""
        self._prune()
        return len(self._outstanding[worker])

    def pids(self) -> list[int]:
        """Process ids of the current actors (for fault injection and leak checks)."""
        return [info["pid"] for info in self._info if "pid" in info]

    def close(self) -> None:
        """Kill the actors, release their placement, shut Ray down if we started it: each step bounded;
        then SIGKILL whatever of ours on this machine is still alive."""
        if self._closed:
            return
        self._closed = True
        if torch.get_num_threads() == self.master_threads:  # unchanged by anyone else since
            torch.set_num_threads(self._threads_before)
        actors, group, self.actors = self.actors, self._group, []
        for link in self._channels:
            if link is not None:
                link.close("the cluster is closed")
        self._channels = [None] * self.n
        ours = process_tree([proc.pid for _, proc in self._ray_procs if proc.poll() is None])
        if ray.is_initialized() and not self._lost:
            def stop_actors() -> None:
                for actor in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                with contextlib.suppress(Exception):
                    place.release(group)

            _bounded(stop_actors, _SHUTDOWN_S / 2)
        if ray.is_initialized() and self.started_ray:
            _bounded(ray.shutdown, _SHUTDOWN_S)
        leftover = [info for info in self._info if info.get("pid")]
        deadline = time.monotonic() + 5.0
        while leftover and time.monotonic() < deadline:
            leftover = [info for info in leftover if os.path.exists(f"/proc/{info['pid']}")]
            time.sleep(0.05 if leftover else 0)
        for info in leftover:
            _kill_pid(info)
        for pid, start in ours:  # the Ray we started and everything below it (agents, workers)
            if _start_time(pid) == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for _, proc in self._ray_procs:
            with contextlib.suppress(Exception):
                proc.wait(5)
        self._outstanding = [deque() for _ in range(self.n)]

    # --------------------------------------------------------------- internals
    def _share_cores(self) -> None:
        """Give the master only the cores that the workers on its machine leave (see
        ``placement.master_threads``); workers on other machines take none of them."""
        here = sum(info.get("threads", 1) for info in self._info if info.get("boot_id") == _boot_id())
        self.master_threads = place.master_threads(place.usable_cores(), here, self._threads_before)
        torch.set_num_threads(self.master_threads)

    def _new_actor(self, j: int) -> Any:
        options = dict(self._actor_options)
        if self._group is not None:
            options["scheduling_strategy"] = place.strategy(self._group, j)
        return _ACTOR.options(**options).remote(j, self.device, self._torch_threads, self.compute_dtype)

    def _await_started(self, workers: Sequence[int], what: str = "workers") -> None:
        """Wait (bounded) until each actor of ``workers`` answers, record where it runs, and connect
        to its channel."""
        workers = list(workers)
        keys = {j: secrets.token_bytes(32) for j in workers}  # each actor's own: none speaks for another
        worker_id = self._certs.worker if self._certs else None
        refs = [self.actors[j].open_channel.remote(keys[j], worker_id) for j in workers]
        deadline = time.monotonic() + self.start_timeout_s
        ready: list = []
        while len(ready) < len(refs) and time.monotonic() < deadline:
            self._watch()
            wait_s = min(_WATCH_EVERY_S, max(deadline - time.monotonic(), 0.0))
            ready = ray.wait(refs, num_returns=len(refs), timeout=wait_s)[0]
        if len(ready) < len(refs):
            missing = [j for j, ref in zip(workers, refs, strict=True) if ref not in ready]
            raise ClusterError(f"{what}: workers {missing} did not start within {self.start_timeout_s:g} s "
                               f"(start_timeout_s); is the Ray cluster overloaded?")
        try:
            infos = ray.get(refs)
        except ray.exceptions.RayError as err:
            raise ClusterError(f"{what} did not start: {' '.join(str(err).split())[:300]}") from err
        for j, info in zip(workers, infos, strict=True):
            if info.get("boot_id") == _boot_id():
                info["start"] = _start_time(info["pid"])
            self._info[j] = info
        opened = open_channels({j: tuple(self._info[j]["address"]) for j in workers}, keys,
                               self._replied, self._certs.master if self._certs else None)
        for j in workers:  # every channel is kept, so that close() closes it, before any error
            self._channels[j] = opened[j] if isinstance(opened[j], Channel) else None
            self._heard[j] = time.monotonic()
        for j in workers:
            if isinstance(opened[j], Exception):
                err = opened[j]
                raise ClusterError(f"{what}: cannot connect to worker {j} at {self._info[j]['address']} "
                                   f"({type(err).__name__}: {err}); is that port reachable from the "
                                   "master?")

    def _gather(
        self, round_: RayRound, calls: dict[int, _Call | None], done: Callable
    ) -> tuple[dict[int, Any], dict[int, float], set[int]]:
        """Fetch answers in arrival order until ``done``; dead, silent and raising workers are erasures.
        Returns (answers, seconds to each answer, workers whose call failed)."""
        failed = {j for j, call in calls.items() if call is None}
        pending = [call for call in calls.values() if call is not None]
        got: dict[int, Any] = {}
        times: dict[int, float] = {}
        errors: list[tuple[_Call, WorkerRaised]] = []
        with self._control_plane():
            while True:
                self._collect(round_, pending, got, times, failed, errors, done)
                # an answer is good only if the worker's earlier calls (loads, updates) succeeded
                bad = self._check_earlier(got, calls)
                for j in bad:
                    del got[j], times[j]
                    failed.add(j)
                if not bad or not pending:
                    break
        for call in calls.values():
            if call is not None:
                call.gathering = False  # a late one's status is checked by a later _prune
        round_.calls = {}  # drop references: late answers are never fetched
        if errors and len(errors) == len(calls):  # the call itself is wrong: nobody is to blame
            call, err = errors[0]
            raise _worker_exception(call, err)
        for call, _ in errors:  # a failure confined to some workers: erasures
            self._erase(call)
        return got, times, failed

    def _collect(self, round_: RayRound, pending: list[_Call], got: dict[int, Any],
                 times: dict[int, float], failed: set[int], errors: list, done: Callable) -> None:
        """Take answers of ``pending`` into ``got`` until ``done`` or none is left to wait for."""
        while pending and not done(got.keys()):
            for call in list(pending):  # killed meanwhile (silent, backlog, by hand)
                if not self._current(call):
                    pending.remove(call)
                    failed.add(call.worker)
                    self.counters.failed_results += 1
            if not pending:
                break
            deadline = min(self._deadline(call.worker) for call in pending)
            wait_s = min(max(deadline - time.monotonic(), 0.0), _WATCH_EVERY_S)
            with self._replied:
                self._replied.wait_for(lambda: any(call.reply.done for call in pending), wait_s)
            ready = [call for call in pending if call.reply.done]
            if not ready:
                self._prune()  # kills silent workers; notices finished calls; watches Ray itself
                continue
            for call in ready:
                if done(got.keys()):
                    break
                pending.remove(call)
                call.fetched = True
                j = call.worker
                self._heard[j] = time.monotonic()
                try:
                    value = call.reply.result()
                except WorkerLost:
                    self._erase(call)
                    failed.add(j)
                    continue
                except WorkerRaised as err:
                    self.counters.note_error(j, call.method, err.cause)
                    failed.add(j)
                    errors.append((call, err))
                    continue
                got[j] = value
                times[j] = time.monotonic() - round_.sent
                self.counters.bytes_from_workers += tensor_bytes(value)

    def _check_earlier(self, got: dict[int, Any], calls: dict[int, _Call | None]) -> list[int]:
        """Workers of ``got`` with an earlier, unfetched call that failed (now erasures)."""
        earlier = [c for j in got for c in self._outstanding[j]
                   if not c.fetched and not c.gathering and c.seq < calls[j].seq]
        if not earlier:
            return []
        for call in earlier:
            self._outstanding[call.worker].remove(call)
        self._check_status(earlier)
        return [j for j in got if not self._current(calls[j])]

    def _erase(self, call: _Call) -> None:
        """Call ``call`` failed: its worker is an erasure (unless it was respawned since)."""
        self.counters.failed_results += 1
        if self._current(call):
            self.kill(call.worker)  # also one only unavailable: it must not come back stale

    def _current(self, call: _Call) -> bool:
        return call.worker not in self._dead and call.incarnation == self._incarnation[call.worker]

    def _deadline(self, worker: int) -> float:
        """When ``worker`` counts as silent if it finishes nothing more."""
        queue = self._outstanding[worker]
        oldest = queue[0].sent if queue else time.monotonic()
        return max(self._heard[worker], oldest) + self.worker_timeout_s

    def _prune(self) -> None:
        """Forget finished calls (checking the status of those nobody fetches), kill silent workers and
        workers whose backlog exceeds ``max_backlog``, and check that Ray itself is still there."""
        self._watch()
        calls = [call for queue in self._outstanding for call in queue]
        if calls:
            now = time.monotonic()
            unchecked = []
            for call in calls:
                if call.reply.done:
                    self._heard[call.worker] = now
                    if not call.gathering:
                        self._outstanding[call.worker].remove(call)
                        if not call.fetched:
                            unchecked.append(call)
            self._check_status(unchecked)
        now = time.monotonic()
        for j in self.alive():
            if self._outstanding[j] and now > self._deadline(j):
                self.kill(j)
                self.counters.timeouts += 1
            elif self.max_backlog is not None and len(self._outstanding[j]) > self.max_backlog:
                self.kill(j)
                self.counters.backlog_kills += 1

    def _check_status(self, calls: list[_Call]) -> None:
        """Finished calls nobody fetches: a failure makes the worker an erasure; a raise is recorded."""
        for call in calls:
            try:
                call.reply.result()
            except WorkerRaised as err:
                self.counters.note_error(call.worker, call.method, err.cause)
                self._erase(call)
            except WorkerLost:
                self._erase(call)

    def _watch(self) -> None:
        """At most every ``_WATCH_EVERY_S``: ClusterError if the Ray control plane is gone (a process
        of the Ray we started exited, or, joined, the head's GCS does not answer a ping within 5 s);
        a worker on a node Ray declared dead is killed (an erasure)."""
        now = time.monotonic()
        if now - self._last_watch < _WATCH_EVERY_S:
            return
        self._last_watch = now
        for name, proc in self._ray_procs:
            if name in ("gcs_server", "raylet") and proc.poll() is not None:
                self._lost = True
                raise ClusterError(f"the Ray cluster's {name} (pid {proc.pid}) exited with status "
                                   f"{proc.returncode}; the workers are lost")
        try:
            if not self._ray_procs:
                ray._private.worker.global_worker.gcs_client.internal_kv_get(b"sazd-ping", None, timeout=5)
            nodes = _within(place.alive_nodes, 5.0)  # Ray's own call waits for a lost GCS
        except Exception as err:
            self._lost = True
            raise ClusterError(f"the Ray cluster's control process (GCS) does not answer: "
                               f"{' '.join(str(err).split())[:200]}") from None
        for j in self.alive():  # Ray declared its node dead: an erasure, even if its process still answers
            node = self._info[j].get("node_id")  # None: still starting
            if node is not None and node not in nodes:
                self.kill(j)
                self.counters.node_losses += 1

    @contextlib.contextmanager
    def _control_plane(self) -> Iterator[None]:
        """Errors of Ray itself (not of a worker) become one ClusterError."""
        try:
            yield
        except _CONTROL as err:
            raise ClusterError(f"the Ray cluster failed: {type(err).__name__}: "
                               f"{' '.join(str(err).split())[:300]}") from err

    def _take(self, round_: Round) -> dict[int, _Call | None]:
        super()._take(round_, RayRound)
        for call in round_.calls.values():
            if call is not None:
                call.gathering = True  # its failure is the gather's to count
        with self._control_plane():
            self._prune()
        return dict(round_.calls)


def _own_copy(args: Any, copies: dict[int, torch.Tensor]) -> Any:
    """``args`` with every tensor replaced by a contiguous CPU copy of it (``copies``: by identity),
    so that what a worker gets is what the master had at ``submit``."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return copies[id(t)]

    return map_tensors(args, copy)


def _worker_exception(call: _Call, err: WorkerRaised) -> BaseException:
    """The worker's own exception, naming worker and method."""
    out = err.cause
    out.add_note(f"(raised by Ray worker {call.worker} in {call.method!r}, by every worker asked)")
    return out


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
