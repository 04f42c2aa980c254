"""Optimizers for coded models: SGD (momentum, Nesterov, weight decay) and LR schedules in both
schemes, Adam/AdamW in the naive scheme only, and gradient clipping by global norm kept exact in DEU.

Why DEU takes only SGD: a DEU worker updates its coded block C_j(W) = sum_i z^t A_i itself, and the
result is still the encoding of the updated W only if the update commutes with encoding, i.e. is
linear in (weights, gradient, buffers). SGD with momentum and weight decay is (w <- w - lr*(g + wd*w)
...). Adam divides by sqrt(v), v a running mean of g*g: elementwise and nonlinear, so the encoding of
the true Adam update is not what a worker would compute from its coded gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sazd.parallel.optimizer import clip_grad_norm_, coded_optimizer, grad_norm, workers_state_left_out
from sazd.parallel.plan import coded_layers, context, plain_weights
from sazd.train.config import OptimConfig


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate of iteration ``step`` (0-based): the closed forms of StepLR / CosineAnnealingLR
    (cosine stays at ``min_lr`` after ``total_steps``)."""
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (step // cfg.step_size)
    if cfg.schedule == "cosine":
        if cfg.total_steps is None:
            raise ValueError("cosine schedule: total_steps is unset; set it (the trainer uses the run's)")
        t = min(step, cfg.total_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / cfg.total_steps))
    return cfg.lr


def build_torch_optimizer(cfg: OptimConfig, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The plain torch optimizer of ``cfg`` (its lr is overwritten by ``lr_at`` every step)."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


class CodedOptimizer:
    """``zero_grad()`` / ``step()`` for a parallelized model from an ``OptimConfig``: the torch
    optimizer of ``cfg`` over every trainable parameter (coded weights included) made coded by
    ``coded_optimizer``, the LR schedule of ``lr_at`` and clipping by global norm kept exact in DEU.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig) -> None:
        self.model = model
        self.ctx = context(model)
        self.cfg = cfg.validate(self.ctx.scheme)
        self.layers = coded_layers(model)
        self.named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in self.named_params]
        self.master = coded_optimizer(build_torch_optimizer(cfg, params)) if params else None
        self.steps = 0

    @property
    def lr(self) -> float:
        return lr_at(self.cfg, self.steps)

    def zero_grad(self) -> None:
        if self.master is not None:
            self.master.zero_grad(set_to_none=True)
        for layer in self.layers:
            layer.pending.clear()

    def step(self) -> None:
        """The torch optimizer's step at this iteration's lr; the coded weights follow (its hook)."""
        stats = self.ctx.stats
        start, others = time.perf_counter(), stats.encode_s + stats.worker_s + stats.decode_s
        if self.cfg.clip_norm is not None:
            clip_grad_norm_(self.model, self.cfg.clip_norm)
        if self.master is not None:
            for group in self.master.param_groups:
                group["lr"] = self.lr
            self.master.step()
        others = stats.encode_s + stats.worker_s + stats.decode_s - others  # the coded updates' share
        stats.update_s += time.perf_counter() - start - others
        self.steps += 1

    def grad_norm(self) -> Tensor:
        """Global 2-norm of all gradients (master grads and DEU's pending dW = dY^T X)."""
        return grad_norm(self.model)

    # ------------------------------------------------------------ checkpoints
    def plain_state(
        self, buffers: dict[str, Tensor] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Optimizer state by parameter name, as for the plain model: tensors {"fc1.weight/momentum_buffer":
        t} (DEU coded momentum decoded from k workers, or ``buffers`` already decoded by name) and
        JSON metadata."""
        tensors: dict[str, Tensor] = {}
        scalars: dict[str, Any] = {}
        if self.master is not None:
            with workers_state_left_out(self.master):  # the workers' momentum: read below, by name
                state = self.master.state_dict()["state"]
            for index, (name, _) in enumerate(self.named_params):
                for field, value in state.get(index, {}).items():
                    if isinstance(value, Tensor):
                        tensors[f"{name}/{field}"] = value.detach().clone()
                    else:
                        scalars[f"{name}/{field}"] = value
        # momentum the workers keep (DEU; none under naive, whose torch optimizer holds it)
        _, buffers = plain_weights(self.model, momentum=True) if buffers is None else ({}, buffers)
        tensors.update({f"{name}/momentum_buffer": buf for name, buf in buffers.items()})
        return tensors, {"steps": self.steps, "scalars": scalars, "config": self.cfg.to_dict()}

    def load_master_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore the master optimizer's state (coded DEU momentum is loaded with the weights)."""
        self.steps = int(meta["steps"])
        if self.master is None:
            return
        state: dict[int, dict[str, Any]] = {}
        for index, (name, p) in enumerate(self.named_params):
            entry = {key.split("/", 1)[1]: t.to(p.device) for key, t in tensors.items()
                     if key.split("/", 1)[0] == name}
            entry.update({key.split("/", 1)[1]: v for key, v in meta["scalars"].items()
                          if key.split("/", 1)[0] == name})
            if entry:
                state[index] = entry
        with workers_state_left_out(self.master):
            sd = self.master.state_dict()
        self.master.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
