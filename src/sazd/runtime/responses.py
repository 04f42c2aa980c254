"""Every worker's response to every compute round: answered (after how long), late, failed or skipped.

A compute round (``first_k``) asks some workers and keeps the first k answers. For each worker the
log records one of:

- ``answered``: its answer was among those kept, ``seconds`` after the round was submitted (Ray: wall
  time until the master saw it; in-process: simulated time);
- ``late``: it was asked but the round ended without its answer (in-process: ``seconds`` is when it
  would have answered; Ray: unknown, None);
- ``failed``: its call failed (dead, timed out or raised);
- ``skipped``: it was not asked (busy with older calls, or dead).

``summary`` turns the log into one row per worker (median and p95 answer time, times late, skipped,
failed, respawns), the table of a run report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ANSWERED, LATE, FAILED, SKIPPED = "answered", "late", "failed", "skipped"
STATUSES = (ANSWERED, LATE, FAILED, SKIPPED)


@dataclass
class ResponseLog:
    """Per round, per worker: (status, seconds or None); see module docstring."""

    rounds: list[dict[int, tuple[str, float | None]]] = field(default_factory=list)

    def record(self, n: int, asked: Iterable[int], answered: Mapping[int, float],
               failed: Iterable[int] = (), late_seconds: Mapping[int, float] | None = None) -> None:
        """One gathered round of ``n`` workers: ``answered`` maps worker -> seconds to its answer."""
        asked, failed, late_seconds = set(asked), set(failed), late_seconds or {}
        row: dict[int, tuple[str, float | None]] = {}
        for j in range(n):
            if j in answered:
                row[j] = (ANSWERED, float(answered[j]))
            elif j in failed:
                row[j] = (FAILED, None)
            elif j in asked:
                row[j] = (LATE, late_seconds.get(j))
            else:
                row[j] = (SKIPPED, None)
        self.rounds.append(row)

    def series(self, worker: int) -> tuple[list[int], list[float]]:
        """(round numbers, seconds) of ``worker``'s answers kept by the master."""
        xs, ys = [], []
        for i, row in enumerate(self.rounds):
            status, seconds = row.get(worker, (SKIPPED, None))
            if status == ANSWERED:
                xs.append(i)
                ys.append(seconds)
        return xs, ys

    def summary(self, n: int, respawns: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
        """One row per worker: answered, median_s, p95_s, late, skipped, failed, respawns."""
        respawns = respawns or {}
        rows = []
        for j in range(n):
            statuses = [row.get(j, (SKIPPED, None))[0] for row in self.rounds]
            times = np.asarray(self.series(j)[1], dtype=float)
            rows.append({
                "worker": j,
                "answered": int(times.size),
                "median_s": float(np.median(times)) if times.size else None,
                "p95_s": float(np.percentile(times, 95)) if times.size else None,
                **{status: statuses.count(status) for status in (LATE, SKIPPED, FAILED)},
                "respawns": int(respawns.get(j, 0)),
            })
        return rows

    def __len__(self) -> int:
        return len(self.rounds)
