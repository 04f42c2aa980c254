"""``RayCluster``: n Ray actors, the round engine, liveness, placement and a bounded close."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import threading
import time
import warnings
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import ray
import torch

from sazd.codes.checks import check_bool
from sazd.runtime import placement as place
from sazd.runtime.arena import open_arena
from sazd.runtime.channel import Channel, open_channels
from sazd.runtime.cluster import Cluster, ClusterError, Counters, SentTensors
from sazd.runtime.latency import LatencyModel, parse_latency
from sazd.runtime.ray.actor import ACTOR
from sazd.runtime.ray.bootstrap import (
    SHUTDOWN_S,
    WATCH_EVERY_S,
    bounded,
    join_ray,
    ray_processes,
    start_local_ray,
    stop_local_ray,
    within,
)
from sazd.runtime.ray.liveness import Liveness
from sazd.runtime.ray.processes import boot_id, kill_pid, process_tree, start_time
from sazd.runtime.ray.rounds import Rounds, _Call
from sazd.runtime.tls import ClusterCerts
from sazd.runtime.worker import Worker

_log = logging.getLogger("sazd.runtime")


class RayCluster(Rounds, Liveness, Cluster):
    """``n`` Ray actors; see module docstring.

    ``worker_timeout_s``: a worker silent that long (unfinished calls, none finished) is killed as an
    erasure. ``start_timeout_s`` bounds starting actors (each imports torch) and reserving their
    placement. ``placement``: ``"spread"`` (workers on distinct nodes while there are nodes) or
    ``"pack"``. ``torch_threads``: intra-op threads per actor. ``compute_dtype``: the workers' product
    precision (``"bfloat16"``, ``"float16"``; answers come back in the blocks' dtype). ``tls``:
    ``None``/``False`` (HMAC-sealed connections, in clear), ``True`` (TLS 1.3 with certificates made
    for this cluster) or a directory of certificates (``sazd.runtime.tls``). ``shared_memory``: workers
    on the master's machine get the calls' large tensors through a shared-memory arena
    (``sazd.runtime.arena``) instead of their socket; False sends everything on the sockets.
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
        shared_memory: bool = True,
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
        self._arena = open_arena() if check_bool(shared_memory, "shared_memory") else None
        self.data_plane_note: str | None = None  # said at start when workers run on other nodes
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
        self._spares: set[int] = set()  # workers run at a spare's CPU priority where cores are shared
        self._threads_before = torch.get_num_threads()  # the master's own, given back at close
        self.master_threads = self._threads_before
        if ray.is_initialized():
            pass
        elif address is None:
            self.started_ray = start_local_ray(num_cpus=max(os.cpu_count() or 1, n + 2),
                                               object_store_gb=object_store_gb)
            self._ray_procs = ray_processes()
        else:
            join_ray(address, connect_timeout_s)
            self.started_ray = True
        close_at_exit(self)  # from here on, nothing we started may outlive the interpreter
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
            nodes = within(place.alive_nodes, 5.0)
        except BaseException:
            self.close()
            raise
        warning = place.sharing([w["node_id"] for w in self._info], len(nodes), placement)
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        self._say_data_plane()

    def _say_data_plane(self) -> None:
        """With workers on other nodes, say whether their connections are encrypted: a warning when
        they are not, a log line when they are (``data_plane_note`` holds the sentence)."""
        here = ray.get_runtime_context().get_node_id()
        remote = sorted(j for j, info in enumerate(self._info) if info.get("node_id") != here)
        if not remote:
            self.data_plane_note = None
        elif self._certs is None:
            self.data_plane_note = (
                f"workers {remote} run on other nodes and the data plane is NOT encrypted (sealed with "
                "HMAC: an on-path attacker can read the tensors and break connections, not alter them "
                "or run code); pass tls=True (--tls) to encrypt it")
            warnings.warn(self.data_plane_note, RuntimeWarning, stacklevel=3)
        else:
            self.data_plane_note = (f"workers {remote} run on other nodes; the data plane is encrypted "
                                    f"(TLS 1.3, {self._certs.source} certificates)")
            _log.info(self.data_plane_note)

    def now(self) -> float:
        """Wall time: the workers are real processes."""
        return time.perf_counter()

    def note_master_time(self, seconds: float) -> None:
        """Nothing to do: real time passed while the master worked."""

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
            kill_pid(self._info[worker])
        if self._channels[worker] is not None:
            self._channels[worker].close(f"worker {worker} was killed")
            self._channels[worker] = None
        self._dead.add(worker)
        self._outstanding[worker].clear()

    def respawn(self, *workers: int) -> None:
        self._check_open()
        replaced = self._check_workers(workers)
        if not replaced:
            return
        for j in replaced:
            self.kill(j)
        with self._control_plane():
            for j in replaced:  # started together: each imports torch while the others do
                self.actors[j] = self._new_actor(j)
            # Wait until the new processes are up: calls queued while they start would count as backlog.
            self._await_started(replaced, what=f"replacements for workers {replaced}")
        self._share_cores()
        for j in replaced:
            self._renewed(j)
        self._lower_spares([j for j in replaced if j in self._spares])

    def spare(self, workers: Sequence[int]) -> None:
        """Run ``workers`` at the lowest CPU priority on every machine where the cluster's processes
        outnumber the cores and the spares do not (``placement.spare_nice``); a respawned one too.
        One-way: a worker is never given its priority back."""
        self._check_open()
        self._spares.update(self._check_workers(workers))
        self._lower_spares(workers)

    def _lower_spares(self, workers: Sequence[int]) -> None:
        here = boot_id()
        alive = self.alive()
        processes = Counter(self._info[j].get("boot_id") for j in alive) + Counter([here])
        spares = Counter(self._info[j].get("boot_id") for j in alive if j in self._spares)
        lowered = {}
        for j in workers:
            if j not in alive:
                continue
            machine = self._info[j].get("boot_id")  # the worker says how many cores it may run on
            nice = place.spare_nice(self._info[j].get("cores", 1), processes[machine], spares[machine])
            if nice is not None:
                lowered.setdefault(nice, []).append(j)
        for nice, group in lowered.items():
            self.wait_all(self.submit("lower_cpu_priority", (nice,), group))

    def workers_info(self) -> list[dict[str, Any]]:
        return [{key: info.get(key) for key in ("index", "node_id", "node_ip", "device")} | {"index": j}
                for j, info in enumerate(self._info)]

    def describe(self) -> dict[str, Any]:
        nodes = 0
        if ray.is_initialized() and not self._closed:
            with contextlib.suppress(Exception):
                nodes = len(within(place.alive_nodes, 5.0))
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
            "shared_memory_workers": 0 if self._closed else sum(map(self._maps_arena, self.alive())),
            "shared_memory_answers": 0 if self._closed else sum(map(self._answers_in_memory, self.alive())),
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
        if self._arena is not None:
            self._arena.close()
        ours = process_tree([proc.pid for _, proc in self._ray_procs if proc.poll() is None])
        if ray.is_initialized() and not self._lost:
            def stop_actors() -> None:
                for actor in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                with contextlib.suppress(Exception):
                    place.release(group)

            bounded(stop_actors, SHUTDOWN_S / 2)
        if self.started_ray and self.address is None:
            stop_local_ray()  # its reaper removes what is left of it, session directory included
        elif ray.is_initialized() and self.started_ray:
            bounded(ray.shutdown, SHUTDOWN_S)
        leftover = [info for info in self._info if info.get("pid")]
        deadline = time.monotonic() + 5.0
        while leftover and time.monotonic() < deadline:
            leftover = [info for info in leftover if os.path.exists(f"/proc/{info['pid']}")]
            time.sleep(0.05 if leftover else 0)
        for info in leftover:
            kill_pid(info)
        for pid, start in ours:  # the Ray we started and everything below it (agents, workers)
            if start_time(pid) == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for _, proc in self._ray_procs:
            with contextlib.suppress(Exception):
                proc.wait(5)
        self._outstanding = [deque() for _ in range(self.n)]

    def between_rounds(self) -> contextlib.AbstractContextManager[None]:
        """The master's threads from before it shared its cores with its workers (``_share_cores``):
        while no round is in flight, they are idle."""
        if self.master_threads >= self._threads_before:
            return contextlib.nullcontext()
        return place.torch_threads(self._threads_before)

    def _share_cores(self) -> None:
        """Give the master only the cores that the workers on its machine leave (see
        ``placement.master_threads``); workers on other machines take none of them."""
        here = sum(info.get("threads", 1) for info in self._info if info.get("boot_id") == boot_id())
        self.master_threads = place.master_threads(place.usable_cores(), here, self._threads_before)
        torch.set_num_threads(self.master_threads)

    def _new_actor(self, j: int) -> Any:
        options = dict(self._actor_options)
        if self._group is not None:
            options["scheduling_strategy"] = place.strategy(self._group, j)
        return ACTOR.options(**options).remote(j, self.device, self._torch_threads, self.compute_dtype)

    def _await_started(self, workers: Sequence[int], what: str = "workers") -> None:
        """Wait (bounded) until each actor of ``workers`` answers, record where it runs, and connect
        to its channel."""
        workers = list(workers)
        keys = {j: secrets.token_bytes(32) for j in workers}  # each actor's own: none speaks for another
        worker_id = self._certs.worker if self._certs else None
        arena = None if self._arena is None else self._arena.spec()
        refs = [self.actors[j].open_channel.remote(keys[j], worker_id, arena) for j in workers]
        deadline = time.monotonic() + self.start_timeout_s
        ready: list = []
        while len(ready) < len(refs) and time.monotonic() < deadline:
            self._watch()
            wait_s = min(WATCH_EVERY_S, max(deadline - time.monotonic(), 0.0))
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
            if info.get("boot_id") == boot_id():
                info["start"] = start_time(info["pid"])
            self._info[j] = info
        opened = open_channels({j: tuple(self._info[j]["address"]) for j in workers}, keys,
                               self._replied, self._certs.master if self._certs else None,
                               {j: self._info[j].get("answer_arena") for j in workers})
        for j in workers:  # every channel is kept, so that close() closes it, before any error
            self._channels[j] = opened[j] if isinstance(opened[j], Channel) else None
            self._heard[j] = time.monotonic()
        for j in workers:
            if isinstance(opened[j], Exception):
                err = opened[j]
                raise ClusterError(f"{what}: cannot connect to worker {j} at {self._info[j]['address']} "
                                   f"({type(err).__name__}: {err}); is that port reachable from the "
                                   "master?")


def close_at_exit(cluster: RayCluster) -> None:
    """Close the cluster when the interpreter exits (also after Ctrl-C), without keeping it alive."""
    ref = weakref.ref(cluster)

    def close() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    atexit.register(close)
    weakref.finalize(cluster, atexit.unregister, close)
