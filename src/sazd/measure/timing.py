"""The one timing loop: every repeat runs every operation once, in alternating order, so a change of
load on a shared machine hits all of them alike; each keeps its times (best and median)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timed:
    """One operation to time; ``times`` holds the seconds of its measured repeats."""

    name: str
    fn: Callable[[], Any]
    times: list[float] = field(default_factory=list)

    @property
    def best_s(self) -> float:
        return min(self.times)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def alternate(
    ops: list[Timed],
    repeats: int,
    warmup: int = 0,
    sync: Callable[[], None] = lambda: None,
    before_repeat: Callable[[int], None] = lambda rep: None,
) -> list[Timed]:
    """``warmup`` unmeasured then ``repeats`` measured rounds; in each, every op once, forwards in even
    rounds and backwards in odd ones (no op always runs right after the same neighbour).
    ``before_repeat(rep)`` prepares a round (e.g. a fresh input shared by all ops); ``sync`` waits
    for a device before the clock is read."""
    for rep in range(warmup + repeats):
        before_repeat(rep)
        for op in ops if rep % 2 == 0 else reversed(ops):
            sync()
            start = time.perf_counter()
            op.fn()
            sync()
            if rep >= warmup:
                op.times.append(time.perf_counter() - start)
    return ops
