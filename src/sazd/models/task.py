"""What a model's output scores, so one trainer serves classifiers and language models.

A model declares its task as a class attribute ``task`` (``task_of`` defaults to classification):

- ``CLASSIFICATION``: logits (B, classes) against labels (B,).
- ``NEXT_TOKEN``: logits (B, T, vocab) against the next token at every position (B, T); the loss is
  the mean over all B*T positions and the run also reports perplexity, exp(loss).

Both are cross-entropy over the last axis once every leading axis is flattened, so the loss and the
count of correct predictions are one formula; only the extra metrics differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Task:
    name: str
    reports_perplexity: bool

    def loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of every scored position: logits (..., C) against targets (...)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)

    def correct(self, logits: Tensor, targets: Tensor) -> Tensor:
        """How many positions have their target as the top score."""
        return (logits.argmax(-1) == targets).sum()

    def metrics(self, loss: float, prefix: str = "") -> dict[str, float]:
        """Metrics derived from a mean loss (perplexity for language models), named ``prefix + name``."""
        if not self.reports_perplexity:
            return {}
        return {f"{prefix}perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709


CLASSIFICATION = Task("classification", reports_perplexity=False)
NEXT_TOKEN = Task("next-token", reports_perplexity=True)


def task_of(model: nn.Module) -> Task:
    """The task ``model`` declares (attribute ``task``); classification when it declares none."""
    task = getattr(model, "task", CLASSIFICATION)
    if not isinstance(task, Task):
        raise TypeError(f"{type(model).__name__}.task must be a sazd.models.Task, got {type(task).__name__}")
    return task
