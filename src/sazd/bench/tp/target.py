"""Time to a target in `sazd bench tp`: when a phase's model reaches it, and how long that took.

With a ``Target`` every phase trains a fresh model (the seed's initial weights, a fresh optimizer)
on the same batches, and evaluates it on the held-out set after every ``every`` steps (and after
step ``max_steps``) until the metric reaches ``value``: test accuracy at least ``value`` (mlp), or
validation loss at most ``value`` (gpt). The phase goes on until that has happened and the
unmeasured plus measured steps of the iteration-time columns have run, or ``max_steps``.

Its time to the target is the wall time of training steps 1..s, where s is the first evaluated step
whose metric reached the target: the sum of those steps' own measured times, the evaluations
excluded. Not reached: None, reported as "not reached in N steps".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

METRICS = {"mlp": "accuracy", "gpt": "loss"}  # the metric each model's target is on


@dataclass(frozen=True)
class Target:
    """Reach ``metric`` (``accuracy``: at least ``value``; ``loss``: at most) within ``max_steps``,
    evaluating every ``every`` steps."""

    metric: str
    value: float
    every: int
    max_steps: int

    def __post_init__(self) -> None:
        if self.metric not in METRICS.values():
            raise ValueError(f"target: metric must be one of {sorted(set(METRICS.values()))}, "
                             f"got {self.metric!r}")
        if self.metric == "accuracy" and not 0 < self.value <= 1:
            raise ValueError(f"--target {self.value}: a test accuracy must be in (0, 1], e.g. 0.75")
        if self.metric == "loss" and not (self.value > 0 and math.isfinite(self.value)):
            raise ValueError(f"--target {self.value}: a validation loss must be a finite number > 0, "
                             "e.g. 3.2")
        if type(self.every) is not int or self.every < 1:
            raise ValueError(f"--eval-every must be an integer >= 1, got {self.every!r}")
        if type(self.max_steps) is not int or self.max_steps < 1:
            raise ValueError(f"--max-steps must be an integer >= 1, got {self.max_steps!r}")

    def reached(self, value: float) -> bool:
        return value >= self.value if self.metric == "accuracy" else value <= self.value

    def evaluates_at(self, step: int) -> bool:
        """Whether the model is evaluated after training step ``step`` (counted from 1)."""
        return step % self.every == 0 or step == self.max_steps

    def pick(self, loss: float, accuracy: float) -> float:
        """The target's metric of an evaluation's (loss, accuracy)."""
        return accuracy if self.metric == "accuracy" else loss

    def first_reached(self, evals: Sequence[Sequence[float]]) -> int | None:
        """The first evaluated step, of ``(step, value)`` pairs, whose value reached the target."""
        return next((int(step) for step, value in evals if self.reached(value)), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_to_target(step_s: Sequence[float], steps: int | None) -> float | None:
    """Seconds of training steps 1..``steps`` (each step's own measured time); None: not reached."""
    if steps is None:
        return None
    if not 1 <= steps <= len(step_s):
        raise ValueError(f"time to target: step {steps} was not measured (only {len(step_s)} steps ran)")
    return math.fsum(step_s[:steps])


class Schedule:
    """When a phase's training loop evaluates and stops: ``evaluate(step)`` after each step; ``done(step)``
    once the target is reached and ``min_steps`` have run (without a target: never early)."""

    def __init__(self, target: Target | None, min_steps: int) -> None:
        self.target, self.min_steps = target, min_steps
        self.evals: list[tuple[int, float]] = []
        self.reached_at: int | None = None

    def evaluates(self, step: int) -> bool:
        return self.target is not None and self.reached_at is None and self.target.evaluates_at(step)

    def record(self, step: int, loss: float, accuracy: float) -> None:
        assert self.target is not None
        value = self.target.pick(loss, accuracy)
        self.evals.append((step, value))
        if self.reached_at is None and self.target.reached(value):
            self.reached_at = step

    def done(self, step: int) -> bool:
        return self.reached_at is not None and step >= self.min_steps
