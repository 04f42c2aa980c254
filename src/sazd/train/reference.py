"""The oracle: the same network trained with plain PyTorch (same seed, init, batches and optimizer).

Deliberately independent of the coded path: a torch optimizer over ``model.parameters()``, the lr of
``lr_at`` set each step, and ``torch.nn.utils.clip_grad_norm_``. Coded training must match it to
floating-point tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sazd.data import batches
from sazd.models import build_model, task_of
from sazd.train.optim import OptimConfig, build_torch_optimizer, lr_at


def train_reference(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    cfg: OptimConfig,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    optimizer: torch.optim.Optimizer | None = None,
    first_step: int = 0,
) -> list[float]:
    """Train ``model`` in place over ``batches``; returns the loss of every step.

    ``optimizer``/``first_step`` continue an earlier call (pass the optimizer it built)."""
    cfg.validate()
    opt = optimizer or build_torch_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    losses = []
    model.train()
    for step, (xb, yb) in enumerate(batches, start=first_step):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def relative_weight_error(model: nn.Module, reference: nn.Module | dict[str, Tensor]) -> float:
    """max over parameters of ||w - w_ref|| / ||w_ref|| (float64), by state_dict name."""
    ref = reference if isinstance(reference, dict) else reference.state_dict()
    got = model if isinstance(model, dict) else model.state_dict()
    missing = sorted(set(ref) ^ set(got))
    if missing:
        raise ValueError(f"the two models differ in parameter names: {missing}")
    worst = 0.0
    for name, w_ref in ref.items():
        w_ref = w_ref.double()
        diff = torch.linalg.vector_norm(got[name].double() - w_ref)
        worst = max(worst, float(diff / torch.linalg.vector_norm(w_ref).clamp_min(1e-300)))
    return worst


def reference_run(cfg, data, iterations: int) -> nn.Module:
    """Plain PyTorch training of ``cfg``'s model (same seed and init) on the trainer's batch order
    (``sazd.data.batches`` epoch by epoch) for ``iterations`` steps; ``data`` already in cfg's dtype."""
    model = build_model(cfg.model, data.in_shape, data.num_classes, hidden=cfg.hidden, seed=cfg.seed,
                        dtype=getattr(torch, cfg.dtype))

    def stream() -> Iterator[tuple[Tensor, Tensor]]:
        count = 0
        for epoch in itertools.count():
            for xb, yb in batches(data.train_x, data.train_y, cfg.batch_size, cfg.seed, epoch):
                if count == iterations:
                    return
                yield xb, yb
                count += 1

    train_reference(model, stream(), cfg.optim, loss_fn=task_of(model).loss)
    return model
