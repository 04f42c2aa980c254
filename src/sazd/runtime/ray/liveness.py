"""Who is alive: silent workers, backlogs, failed calls nobody fetched, and Ray's own control plane.

Every wait is bounded. A worker with unfinished calls that has not finished any call for
``worker_timeout_s`` is silent: it is killed (an erasure; the master respawns and repairs it). Every
2 s while the master works or waits, the control plane is checked: its loss (the head's GCS, our
raylet) is a ``ClusterError``, and a worker on a node Ray declared dead is killed (an erasure).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from ray.exceptions import RaySystemError, RpcError

from sazd.runtime import placement as place
from sazd.runtime.channel import WorkerLost, WorkerRaised
from sazd.runtime.cluster import ClusterError
from sazd.runtime.ray.bootstrap import WATCH_EVERY_S, ping_gcs, within
from sazd.runtime.ray.rounds import _Call

# Failures of Ray itself rather than of one worker: the run cannot continue.
_CONTROL = (RaySystemError, RpcError, OSError)


class Liveness:
    """What ``RayCluster`` does to tell live workers from dead ones."""

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

    def _watch(self) -> None:
        """At most every ``WATCH_EVERY_S``: ClusterError if the Ray control plane is gone (a process
        of the Ray we started exited, or, joined, the head's GCS does not answer a ping within 5 s);
        a worker on a node Ray declared dead is killed (an erasure)."""
        now = time.monotonic()
        if now - self._last_watch < WATCH_EVERY_S:
            return
        self._last_watch = now
        for name, proc in self._ray_procs:
            if name in ("gcs_server", "raylet") and proc.poll() is not None:
                self._lost = True
                raise ClusterError(f"the Ray cluster's {name} (pid {proc.pid}) exited with status "
                                   f"{proc.returncode}; the workers are lost")
        try:
            if not self._ray_procs:
                ping_gcs(5.0)
            nodes = within(place.alive_nodes, 5.0)  # Ray's own call waits for a lost GCS
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
