"""The round engine: submit a call to workers, gather the first k answers in arrival order.

Answers are taken in arrival order: a broken connection answers every unanswered call of that
worker as an erasure, and another answer is awaited. Late answers are read by the master's
data-plane thread (``channel.Hub``) and dropped at the next round (their status checked); queued
calls are never cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sazd.runtime.arena import Lease
from sazd.runtime.channel import Encoded, Reply, WorkerLost, WorkerRaised, encode
from sazd.runtime.cluster import ClusterError, Round, choose_ready, map_tensors, tensor_bytes
from sazd.runtime.ray.bootstrap import WATCH_EVERY_S


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

class Rounds:
    """What ``RayCluster`` does with rounds (its state: see ``RayCluster.__init__``)."""

    def submit(
        self, method: str, args: Sequence[tuple] | tuple, workers: Sequence[int] | None = None
    ) -> RayRound:
        self._check_open()
        with self._control_plane():
            workers, per_worker, payloads = self._prepare_submit(method, args, workers)
            calls: dict[int, _Call | None] = {}
            now = time.monotonic()
            try:
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
                    if payloads[j].lease is not None:
                        payloads[j].lease.hold(reply)
                    if not self._outstanding[j]:
                        self._heard[j] = now  # silence is counted from when it has work
                    call = _Call(j, method, reply, self._epoch, task, self._incarnation[j], now)
                    calls[j] = call
                    self._outstanding[j].append(call)
            finally:
                for payload in payloads.values():
                    if payload.lease is not None:
                        payload.lease.close()  # its regions are reused once every call holding them is done
        self.counters.rounds += 1
        return RayRound(method, list(workers), calls, id(self), sent=now)

    def _payloads(self, method: str, workers: list[int], per_worker: dict[int, tuple],
                  broadcast: bool) -> dict[int, Any]:
        """Each worker's call encoded (and checked) before anyone is asked, each tensor copied once:
        into the shared-memory arena when it goes to a worker that maps it (the calls of this submit
        hold its regions), else into the master's memory."""
        copies: dict[int, torch.Tensor] = {}
        digests: dict[tuple[int, int], bytes] = {}  # of the copies, alive until the calls are written
        arena = self._arena
        lease = None if arena is None else Lease()
        placed_before = 0 if arena is None else arena.placed_bytes

        def payload(args: tuple, via_memory: bool) -> Encoded:
            lane = arena if via_memory and arena is not None else None
            place = None if lane is None else (lambda t: lane.place(t, lease))
            return encode(own_copy(args, copies, place), digests, lane, lease)

        try:
            if broadcast:
                shared = payload(per_worker[workers[0]], all(map(self._maps_arena, workers)))
                payloads = {j: shared for j in workers}
            else:
                payloads = {j: payload(per_worker[j], self._maps_arena(j)) for j in workers}
        except TypeError as err:
            if lease is not None:
                lease.close()
            raise TypeError(f"submit {method!r}: {err}") from None
        if arena is not None:
            self.counters.bytes_through_memory += arena.placed_bytes - placed_before
        return payloads

    def _maps_arena(self, worker: int) -> bool:
        """Whether this worker copies the master's shared-memory arena (it runs on the master's machine)."""
        return self._info[worker].get("shared_memory") is True

    def _answers_in_memory(self, worker: int) -> bool:
        """Whether this worker's answers bring their large tensors through its own arena (which the
        master maps)."""
        channel = self._channels[worker]
        return channel is not None and channel.answers_refused is None

    def first_k(
        self, round_: Round, k: int, enough: Callable[[Collection[int]], bool] | None = None,
        patience_s: float = 0.0,
    ) -> dict[int, Any]:
        patience_s = self._check_patience(patience_s)
        calls = self._take(round_)
        done = self._stop_test(k, enough)
        got, times, failed = self._gather(round_, calls, done, patience_s if enough is None else 0.0)
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
        older = {j: [call.epoch for call in self._outstanding[j] if call.epoch < self._epoch]
                 for j in self.alive()}
        return choose_ready({j: (len(epochs), 0.0) for j, epochs in older.items()}, k,
                            in_line=[j for j, epochs in older.items() if epochs == [self._epoch - 1]])

    def _take(self, round_: Round) -> dict[int, _Call | None]:
        super()._take(round_, RayRound)
        for call in round_.calls.values():
            if call is not None:
                call.gathering = True  # its failure is the gather's to count
        with self._control_plane():
            self._prune()
        return dict(round_.calls)

    def _gather(
        self, round_: RayRound, calls: dict[int, _Call | None], done: Callable, patience_s: float = 0.0,
    ) -> tuple[dict[int, Any], dict[int, float], set[int]]:
        """Fetch answers in arrival order until ``done`` (then up to ``patience_s`` more for workers that
        are no spares: ``first_k``); dead, silent and raising workers are erasures. Returns (answers,
        seconds to each answer, workers whose call failed)."""
        failed = {j for j, call in calls.items() if call is None}
        pending = [call for call in calls.values() if call is not None]
        got: dict[int, Any] = {}
        times: dict[int, float] = {}
        errors: list[tuple[_Call, WorkerRaised]] = []
        with self._control_plane():
            while True:
                self._collect(round_, pending, got, times, failed, errors, done)
                if patience_s > 0 and done(got.keys()):
                    self._wait_for_preferred(round_, pending, got, times, failed, errors, patience_s)
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
            raise worker_exception(call, err)
        for call, _ in errors:  # a failure confined to some workers: erasures
            self._erase(call)
        return got, times, failed

    def _wait_for_preferred(self, round_: RayRound, pending: list[_Call], got: dict[int, Any],
                            times: dict[int, float], failed: set[int], errors: list,
                            patience_s: float) -> None:
        """Wait up to ``patience_s`` for the answers of pending workers that are no spares, each taking
        a spare's place in ``got`` (``Cluster._prefer``)."""
        held = sum(j in self._spares for j in got)
        wanted = [call for call in pending if call.worker not in self._spares]
        if not held or not wanted:
            return
        answers: dict[int, Any] = {}
        self._collect(round_, wanted, answers, times, failed, errors, lambda came: len(came) >= held,
                      until=time.monotonic() + patience_s)
        pending[:] = [call for call in pending if not call.fetched and call.worker not in failed]
        for j in self._prefer(got, self._spares, answers):
            times.pop(j, None)

    def _collect(self, round_: RayRound, pending: list[_Call], got: dict[int, Any],
                 times: dict[int, float], failed: set[int], errors: list, done: Callable,
                 until: float | None = None) -> None:
        """Take answers of ``pending`` into ``got`` until ``done``, none is left to wait for, or the
        monotonic time ``until``."""
        while pending and not done(got.keys()) and (until is None or time.monotonic() < until):
            for call in list(pending):  # killed meanwhile (silent, backlog, by hand)
                if not self._current(call):
                    pending.remove(call)
                    failed.add(call.worker)
                    self.counters.failed_results += 1
            if not pending:
                break
            deadline = min(self._deadline(call.worker) for call in pending)
            if until is not None:
                deadline = min(deadline, until)
            wait_s = min(max(deadline - time.monotonic(), 0.0), WATCH_EVERY_S)
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
                self.counters.bytes_from_memory += call.reply.shared_bytes

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


def own_copy(args: Any, copies: dict[int, torch.Tensor],
             place: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> Any:
    """``args`` with every tensor replaced by a contiguous CPU copy of it (``copies``: by identity),
    so that what a worker gets is what the master had at ``submit``; ``place(t)`` makes the copy
    (in shared memory) when it can."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            source = t.detach()
            placed = None if place is None else place(source)
            copies[id(t)] = placed if placed is not None else \
                source.to("cpu", memory_format=torch.contiguous_format, copy=True)
        return copies[id(t)]

    return map_tensors(args, copy)


def worker_exception(call: _Call, err: WorkerRaised) -> BaseException:
    """The worker's own exception, naming worker and method."""
    out = err.cause
    out.add_note(f"(raised by Ray worker {call.worker} in {call.method!r}, by every worker asked)")
    return out
