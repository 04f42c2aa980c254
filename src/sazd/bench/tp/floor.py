"""Each side's compute floor in `sazd bench tp`: how much of an iteration is work, how much overhead.

A side's compute per iteration is the CPU seconds all its processes spend on the step's work:

- sazd: every worker's ``Worker.counters()["compute_s"]`` (the thread CPU time of its products and
  updates, straggler stalls excluded) over the phase's measured iterations, plus the master's encode
  and decode seconds. A worker respawned during the phase restarts its counter at 0, so only the
  workers alive throughout (same incarnation before and after) are counted.
- TP: the sum over ranks of each rank's thread CPU time of its step (forward, backward, optimizer
  step; a straggler's sleep takes no CPU time), averaged over the measured steps.

The floor is that work perfectly packed on the cores the processes may use: compute / cores. A median
iteration ``over_floor`` times the floor spends the rest on overhead (messages, waiting, scheduling);
``work_vs_tp`` is how much more work a side does than TP for the same step (coding's redundancy).

A side's CPU per iteration is every CPU second its processes spent, whatever on: compute, and the
overhead that also needs a core (packing, hashing, copies into and out of sockets, threads handing
off, collectives). sazd: each worker's whole process CPU (``counters()["process_s"]``, the workers
alive throughout) plus the master process's over the measured iterations (none with a target: the
evaluations would count); TP: each rank's process CPU of its steps. ``cpu_s / cores`` is a second,
higher floor: on shared cores an iteration cannot be shorter, so a side whose ``cpu_s`` exceeds
another's by more than the other's idle cores can absorb cannot catch up by waiting less.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def cores() -> int:
    """The CPUs this process (and the processes it starts) may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def floor_fields(compute_s: float | None, n_cores: int, p50_s: float | None) -> dict[str, Any]:
    """The row's floor: compute per iteration, the floor (compute / cores) and the median over it."""
    if n_cores < 1:
        raise ValueError(f"cores must be >= 1, got {n_cores}")
    if compute_s is None or not compute_s > 0 or not math.isfinite(compute_s):
        return {"compute_per_iteration_s": None, "cores": n_cores, "floor_s": None, "over_floor": None}
    floor = compute_s / n_cores
    return {"compute_per_iteration_s": compute_s, "cores": n_cores, "floor_s": floor,
            "over_floor": None if p50_s is None else p50_s / floor}


def alive_throughout(start: Mapping[str, Any], end: Mapping[str, Any]) -> list[int]:
    """The workers whose counters were read at ``start`` and at ``end`` (each ``{"counters": {worker:
    ...}, "incarnation": [per worker]}``) in the same incarnation: not respawned in between."""
    return sorted(j for j in end["counters"] if j in start["counters"]
                  and end["incarnation"][j] == start["incarnation"][j])


def sazd_compute(before: Mapping[int, Mapping[str, float]], after: Mapping[int, Mapping[str, float]],
                 counted: Sequence[int], master_s: Sequence[float],
                 master_cpu_s: float | None = None) -> dict[str, Any]:
    """sazd's compute per iteration from the workers' counters before and after the ``len(master_s)``
    measured iterations (``counted``: the workers alive throughout) and the master's encode + decode
    seconds of each of them; with ``master_cpu_s`` (the master process's CPU seconds over those
    iterations) also its CPU per iteration, ``cpu_s``: the workers' process CPU plus the master's."""
    iterations = len(master_s)
    if iterations == 0 or not counted:
        return {"compute_s": None, "workers_s": None, "master_s": None, "counted": list(counted),
                "updates": {}, "cpu_s": None}
    workers = _per_iteration(before, after, counted, "compute_s", iterations)
    master = statistics.fmean(master_s)
    updates = {j: int(after[j]["updates_applied"] - before[j]["updates_applied"]) for j in counted}
    cpu = None
    if master_cpu_s is not None:
        cpu = _per_iteration(before, after, counted, "process_s", iterations) + master_cpu_s / iterations
    return {"compute_s": workers + master, "workers_s": workers, "master_s": master, "counted": list(counted),
            "updates": updates, "cpu_s": cpu}


def _per_iteration(before: Mapping[int, Mapping[str, float]], after: Mapping[int, Mapping[str, float]],
                   counted: Sequence[int], counter: str, iterations: int) -> float:
    return math.fsum(after[j][counter] - before[j][counter] for j in counted) / iterations


def tp_compute(cpu_s_per_rank: Sequence[Sequence[float]]) -> float | None:
    """TP's compute (or, given each step's process CPU, its CPU) per iteration: the sum over ranks of
    each rank's mean step CPU time (None when a rank measured no step)."""
    if not cpu_s_per_rank or any(not steps for steps in cpu_s_per_rank):
        return None
    return math.fsum(statistics.fmean(steps) for steps in cpu_s_per_rank)


def add_work_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``work_vs_tp`` and ``cpu_vs_tp``: its compute and its CPU per iteration over the
    TP row's of the same phase."""
    tp = next((r for r in rows if r["side"].startswith("TP")), {})
    for mine, ratio in (("compute_per_iteration_s", "work_vs_tp"), ("cpu_per_iteration_s", "cpu_vs_tp")):
        theirs = tp.get(mine)
        for row in rows:
            value = row.get(mine)
            row[ratio] = None if value is None or not theirs else value / theirs
