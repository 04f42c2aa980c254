"""Latency models: which workers are slow or dead, task by task.

A model answers two questions for task number ``task`` (0, 1, 2, ... counted per worker since the
worker was last (re)spawned) of worker ``worker``:

- ``slowdown(worker, task)``: the factor (>= 1) by which that task takes longer than it would on a
  healthy worker. The in-process backend multiplies the measured duration by it (simulated time);
  the Ray backend makes the actor really sleep ``(factor - 1)`` times the compute time.
- ``fails(worker, task, incarnation)``: whether the worker dies at that task (an erasure from then
  on). ``incarnation`` is 0 for the original worker and counts respawns: a respawned worker is a new
  machine, so the models below only kill incarnation 0.

Every model is deterministic: a seeded model draws task ``(worker, task)``'s value from a generator
seeded by ``(seed, worker, task)``, so the answer does not depend on the order of questions. A model
therefore has no state of its own: the cluster's per-worker task numbers and incarnations are the
whole schedule, and ``Cluster.schedule_state`` (kept in checkpoints) continues it exactly.

Which workers are the stragglers of ``FixedStragglers(count=S)``: the FIRST S worker ids
``0..S-1``. For systematic codes these hold the plain blocks, so this is the worst case (the master
must decode every round); pass ``workers=[...]`` to choose others.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np


class LatencyModel(ABC):
    """Per-task slowdown factors and deaths; see module docstring."""

    def bind(self, n: int) -> LatencyModel:
        """Check the model against a cluster of ``n`` workers; returns self."""
        return self

    @abstractmethod
    def slowdown(self, worker: int, task: int) -> float:
        """Factor >= 1 by which task ``task`` of ``worker`` takes longer than on a healthy worker."""

    def fails(self, worker: int, task: int, incarnation: int = 0) -> bool:
        return False

    def describe(self) -> str:
        return type(self).__name__


class NoDelay(LatencyModel):
    """Every worker healthy, every task at measured speed."""

    def slowdown(self, worker: int, task: int) -> float:
        return 1.0

    def describe(self) -> str:
        return "none"


class FixedStragglers(LatencyModel):
    """S slow workers; each of their tasks takes ``factor`` times as long.

    ``workers`` names them; otherwise ``count`` picks the first ``count`` ids (see module docstring).
    """

    def __init__(self, workers: Iterable[int] | None = None, *, count: int | None = None,
                 factor: float = 5.0) -> None:
        if (workers is None) == (count is None):
            raise ValueError("FixedStragglers: give exactly one of workers=[ids] or count=S")
        if not factor >= 1 or math.isinf(factor):
            raise ValueError(f"straggler delay factor must be a finite number >= 1, got {factor!r}")
        if count is not None and count < 0:
            raise ValueError(f"straggler count must be >= 0, got {count!r}")
        self.factor = float(factor)
        self.count = count
        self.workers: frozenset[int] | None = None
        if workers is not None:
            self.workers = _check_ids("straggler workers", workers)
        elif count == 0:
            self.workers = frozenset()

    def bind(self, n: int) -> FixedStragglers:
        if self.workers is None:
            if self.count > n:  # type: ignore[operator]
                raise ValueError(f"stragglers={self.count} exceeds the number of workers n={n}; use S <= n")
            self.workers = frozenset(range(self.count))  # type: ignore[arg-type]
        elif self.workers and max(self.workers) >= n:
            raise ValueError(f"straggler workers {sorted(self.workers)} must be < n={n}")
        return self

    def slow_workers(self) -> list[int]:
        if self.workers is None:
            raise ValueError("FixedStragglers(count=...) is not bound to a cluster yet: call bind(n)")
        return sorted(self.workers)

    def slowdown(self, worker: int, task: int) -> float:
        if self.workers is None:
            self.slow_workers()  # raises: not bound
        return self.factor if worker in self.workers else 1.0  # type: ignore[operator]

    def describe(self) -> str:
        who = self.slow_workers() if self.workers is not None else f"first {self.count}"
        return f"fixed stragglers {who} x{self.factor:g}"


class ShiftedExponential(LatencyModel):
    """Random per-task slowdown ``shift + E`` with ``E ~ Exponential(rate)`` (mean ``1/rate``).

    The classic straggler model of the coded-computation literature (task time = shift + exponential
    tail), here as a factor on the measured task time. ``shift`` must be >= 1 so the factor is >= 1.
    """

    def __init__(self, shift: float = 1.0, rate: float = 1.0, seed: int = 0) -> None:
        if not shift >= 1 or math.isinf(shift):
            raise ValueError(f"shift must be a finite number >= 1, got {shift!r}")
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        self.shift, self.rate, self.seed = float(shift), float(rate), int(seed)

    def slowdown(self, worker: int, task: int) -> float:
        rng = np.random.default_rng([self.seed, worker, task])
        return self.shift + float(rng.exponential(1.0 / self.rate))

    def describe(self) -> str:
        return f"shifted exponential shift={self.shift:g} rate={self.rate:g} seed={self.seed}"


class Pareto(LatencyModel):
    """Heavy-tailed random per-task slowdown: a Pareto factor with minimum 1 and tail index ``alpha``.

    ``P(factor > x) = x^-alpha`` for ``x >= 1``: most tasks run near full speed, a few are very slow
    (the mean ``alpha / (alpha - 1)`` is infinite for ``alpha <= 1``).
    """

    def __init__(self, alpha: float = 2.0, seed: int = 0) -> None:
        if not alpha > 0 or math.isinf(alpha):
            raise ValueError(f"pareto alpha must be a finite number > 0, got {alpha!r}")
        self.alpha, self.seed = float(alpha), int(seed)

    def slowdown(self, worker: int, task: int) -> float:
        rng = np.random.default_rng([self.seed, worker, task])
        return 1.0 + float(rng.pareto(self.alpha))  # numpy's is Lomax (minimum 0): shift to minimum 1

    def describe(self) -> str:
        return f"pareto alpha={self.alpha:g} seed={self.seed}"


class SlowCalls(LatencyModel):
    """Each task of each worker is, independently with probability ``prob``, ``factor`` times slower."""

    def __init__(self, prob: float, factor: float = 5.0, seed: int = 0) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"slow-call probability must be in [0, 1], got {prob!r}")
        if not factor >= 1 or math.isinf(factor):
            raise ValueError(f"slow-call factor must be a finite number >= 1, got {factor!r}")
        self.prob, self.factor, self.seed = float(prob), float(factor), int(seed)

    def slowdown(self, worker: int, task: int) -> float:
        rng = np.random.default_rng([self.seed, worker, task])
        return self.factor if rng.random() < self.prob else 1.0

    def describe(self) -> str:
        return f"slow calls p={self.prob:g} x{self.factor:g} seed={self.seed}"


class DeadWorkers(LatencyModel):
    """Workers ``ids`` die at their task number ``after_calls`` (0: before answering anything).

    Only the original incarnation dies; a respawned worker is healthy.
    """

    def __init__(self, ids: Iterable[int], after_calls: int = 0) -> None:
        if after_calls < 0:
            raise ValueError(f"after_calls must be >= 0, got {after_calls!r}")
        self.ids = _check_ids("dead workers", ids)
        self.after_calls = int(after_calls)

    def bind(self, n: int) -> DeadWorkers:
        if self.ids and max(self.ids) >= n:
            raise ValueError(f"dead workers {sorted(self.ids)} must be < n={n}")
        return self

    def slowdown(self, worker: int, task: int) -> float:
        return 1.0

    def fails(self, worker: int, task: int, incarnation: int = 0) -> bool:
        return incarnation == 0 and worker in self.ids and task >= self.after_calls

    def describe(self) -> str:
        return f"dead workers {sorted(self.ids)} after {self.after_calls} calls"


class Combined(LatencyModel):
    """Several models at once: slowdowns multiply, a worker dies when any model says so."""

    def __init__(self, models: Iterable[LatencyModel]) -> None:
        self.models = list(models)

    def bind(self, n: int) -> Combined:
        for model in self.models:
            model.bind(n)
        return self

    def slowdown(self, worker: int, task: int) -> float:
        return math.prod(model.slowdown(worker, task) for model in self.models)

    def fails(self, worker: int, task: int, incarnation: int = 0) -> bool:
        return any(model.fails(worker, task, incarnation) for model in self.models)

    def describe(self) -> str:
        return " + ".join(model.describe() for model in self.models)


LATENCY_SPECS = ("none | fixed:S:F | shiftexp:RATE[:SHIFT] | pareto:ALPHA | slowcalls:P:F | dead:I,J[:AFTER] "
                 "(join several with '+')")


def parse_latency(spec: str | LatencyModel | None, seed: int = 0) -> LatencyModel:
    """Build a model from a spec string: ``none``, ``fixed:S:F`` (the first S workers F times slower),
    ``shiftexp:RATE[:SHIFT]``, ``pareto:ALPHA``, ``slowcalls:P:F`` (each task F times slower with
    probability P), ``dead:0,3[:AFTER]``; ``a+b`` combines models."""
    if spec is None:
        return NoDelay()
    if isinstance(spec, LatencyModel):
        return spec
    parts = [p.strip() for p in str(spec).split("+")]
    models = [_parse_one(p, seed, spec) for p in parts]
    return models[0] if len(models) == 1 else Combined(models)


def straggler_latency(stragglers: int = 0, straggler_delay: float = 5.0, spec: str | None = None,
                      seed: int = 0) -> LatencyModel:
    """The CLI's ``--stragglers S --straggler-delay F [--latency SPEC]`` as one model."""
    if stragglers < 0:
        raise ValueError(f"--stragglers must be >= 0, got {stragglers}")
    models = []
    if spec not in (None, "", "none"):
        models.append(parse_latency(spec, seed))
    if stragglers:
        models.append(FixedStragglers(count=stragglers, factor=straggler_delay))
    if not models:
        return NoDelay()
    return models[0] if len(models) == 1 else Combined(models)


def _parse_one(part: str, seed: int, spec: str) -> LatencyModel:
    name, _, rest = part.partition(":")
    fields = rest.split(":") if rest else []
    try:
        if name == "none" and not fields:
            return NoDelay()
        if name == "fixed" and len(fields) == 2:
            return FixedStragglers(count=int(fields[0]), factor=float(fields[1]))
        if name == "shiftexp" and len(fields) in (1, 2):
            shift = float(fields[1]) if len(fields) == 2 else 1.0
            return ShiftedExponential(shift=shift, rate=float(fields[0]), seed=seed)
        if name == "pareto" and len(fields) == 1:
            return Pareto(alpha=float(fields[0]), seed=seed)
        if name == "slowcalls" and len(fields) == 2:
            return SlowCalls(prob=float(fields[0]), factor=float(fields[1]), seed=seed)
        if name == "dead" and len(fields) in (1, 2):
            ids = [int(i) for i in fields[0].split(",") if i.strip()]
            return DeadWorkers(ids, after_calls=int(fields[1]) if len(fields) == 2 else 0)
    except ValueError as err:
        raise ValueError(f"latency spec {spec!r}: {err} (expected {LATENCY_SPECS})") from None
    raise ValueError(f"latency spec {spec!r}: cannot read {part!r}; expected {LATENCY_SPECS}")


def _check_ids(what: str, ids: Iterable[int]) -> frozenset[int]:
    ids = list(ids)
    if any(int(i) != i or i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{what} must be distinct worker ids >= 0, got {ids!r}")
    return frozenset(int(i) for i in ids)
