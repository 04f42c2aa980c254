"""Torch optimizers on coded models: ``coded_optimizer(torch.optim.SGD(model.parameters(), ...))``.

A coded weight reaches the optimizer as the module's own parameter (a ``CodedParameter``; an
optimizer made before ``parallelize`` holds the same object). ``coded_optimizer`` checks that the
optimizer can step it in its scheme (DEU: ``torch.optim.SGD`` only) and hooks the optimizer's
``step``; each step then reads every coded weight's parameter group (lr, momentum,
dampening, Nesterov, weight decay — as any ``torch.optim.lr_scheduler`` left them) and calls the
scheme's ``after_step``:

    optimizer.step()                           torch steps the master's parameters, then
      -> CodedContext.after_step(optimizer)    this hook, per model: its coded weights and groups
        -> DEU.after_step(ctx, stepped)        encode every layer's pending dY^T (and X^T)
          -> CodedContext.send("sgd", ...)     one Worker.sgd message per worker
            -> Worker.sgd(updates)             C_j(W) <- SGD(C_j(W), C_j(dY^T) X), every layer

Stepping a DEU model with an optimizer while no optimizer made by ``coded_optimizer`` holds its coded
weights raises at that step (they would silently stay unchanged). A new optimizer (a second
fine-tuning phase) starts, as torch's do, without momentum: ``coded_optimizer`` drops the workers'
DEU momentum of the weights an earlier optimizer stepped; ``optimizer.load_state_dict`` (a plain
model's state included: parameter names and order are the plain model's) ships DEU momentum to them,
and ``optimizer.state_dict()`` decodes it back into the weights' entries (the plain model's dict).
A DEU weight's gradient lives in factors (dY^T X, never formed); reading ``W.grad`` (as
``torch.nn.utils.clip_grad_norm_`` does) forms it on the master as autograd would have, and that
step sends the encoded gradient whole. ``clip_grad_norm_(model, max_norm)`` clips without forming it.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sazd.parallel.coded import CodedLayer, CodedParameter, raw_grad
from sazd.parallel.context import CodedContext
from sazd.parallel.plan import coded_layers

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6)


def coded_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer`` step the coded weights among its parameters; returns ``optimizer``.

    Raises TypeError at once when it cannot keep the code (DEU with anything but torch.optim.SGD)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"coded_optimizer takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _take_weights(optimizer)
    if not getattr(optimizer, "_sazd_hooked", False):
        optimizer.register_load_state_dict_post_hook(_loaded)
        optimizer.register_state_dict_post_hook(_saved)
        optimizer.zero_grad = _zero_grad(optimizer, optimizer.zero_grad)
        optimizer.add_param_group = _add_param_group(optimizer, optimizer.add_param_group)
        optimizer._sazd_hooked = True
    return optimizer


def _take_weights(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` the one that steps the coded weights among its parameters: check it can, drop
    the workers' state an earlier optimizer left (DEU momentum), and hook its step once per model."""
    for layer, group in _coded_weights(optimizer):
        layer.scheme.check_optimizer(optimizer, group, layer)
    for layer, _ in _coded_weights(optimizer):
        earlier = None if layer.stepped_by is None else layer.stepped_by()
        if earlier is not None and earlier is not optimizer:
            layer.scheme.new_optimizer(layer)  # DEU: the workers drop the earlier one's momentum
        layer.stepped_by = weakref.ref(optimizer)
    hooked = _hooked_models(optimizer)
    for layer, _ in _coded_weights(optimizer):
        if layer.ctx not in hooked:  # one pair of step hooks per model
            optimizer.register_step_pre_hook(layer.ctx.before_step)
            optimizer.register_step_post_hook(layer.ctx.after_step)
            hooked.add(layer.ctx)


def _add_param_group(optimizer: torch.optim.Optimizer, add: Callable[[dict], None]) -> Callable[[dict], None]:
    """``optimizer.add_param_group`` that takes the coded weights of the new group as ``coded_optimizer``
    takes those of the first (a group it cannot step is refused, and not added)."""

    @functools.wraps(add)
    def wrapped(param_group: dict) -> None:
        add(param_group)
        try:
            _take_weights(optimizer)
        except Exception:
            optimizer.param_groups.pop()
            raise

    return wrapped


def _hooked_models(optimizer: torch.optim.Optimizer) -> set[CodedContext]:
    """The models (their contexts) whose coded weights ``optimizer``'s step hooks send."""
    return optimizer.__dict__.setdefault("_sazd_models", set())


def _zero_grad(optimizer: torch.optim.Optimizer, zero_grad: Callable[..., None]) -> Callable[..., None]:
    """``optimizer.zero_grad`` that also drops the DEU gradients its coded weights keep."""

    @functools.wraps(zero_grad)
    def wrapped(set_to_none: bool = True) -> None:
        if set_to_none:  # dropped before torch's zero_grad reads them (a read forms them)
            for layer, _ in _coded_weights(optimizer):
                layer.drop_gradient()
        zero_grad(set_to_none)

    return wrapped


def grad_norm(model: nn.Module) -> Tensor:
    """Global 2-norm of every gradient of a parallelized model, DEU's dW = dY^T X kept for the
    workers (``layer.pending``) included."""
    for layer in coded_layers(model):
        if layer.spent or (layer.pending and raw_grad(layer.param) is not None):
            layer.fold_gradient()  # the norm of their sum, not the sum of their norms
    grads = [g for g in map(raw_grad, model.parameters()) if g is not None]
    sq = [torch.linalg.vector_norm(g).square() for g in grads]
    sq += [layer.grad_norm_sq() for layer in coded_layers(model) if layer.pending]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros(())


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a parallelized model (torch's own sees no DEU weight
    gradient): scale every gradient by min(1, max_norm / (norm + 1e-6)); DEU layers scale theirs when
    they send it. Returns the norm before clipping."""
    norm = grad_norm(model)
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    for g in map(raw_grad, model.parameters()):
        if g is not None:
            g.mul_(coef.to(g))
    for layer in coded_layers(model):
        if layer.pending:
            layer.pending.scale = layer.pending.scale * coef
    return norm


def _coded_weights(optimizer: torch.optim.Optimizer) -> Iterator[tuple[CodedLayer, dict[str, Any]]]:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, CodedParameter):
                yield param.layer, group


def _loaded(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` (e.g. a plain model's state): state the scheme keeps on the
    workers (DEU's momentum) goes there, out of the torch optimizer's state."""
    for layer, _ in _coded_weights(optimizer):
        state = optimizer.state.get(layer.param)
        if state:
            layer.scheme.take_optimizer_state(layer, state)


@contextlib.contextmanager
def workers_state_left_out(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside, ``optimizer.state_dict()`` is torch's own, without the state the workers keep (no round
    of the workers): for sazd's checkpoints, which save that state with the weights."""
    optimizer.__dict__["_sazd_left_out"] = True
    try:
        yield
    finally:
        optimizer.__dict__.pop("_sazd_left_out", None)


def _saved(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """After ``optimizer.state_dict()``: the state the workers keep (DEU's momentum), decoded, joins
    its weight's entry, so that the dict is the one the plain model's optimizer would save (it loads
    into a new coded optimizer, or a plain one)."""
    if optimizer.__dict__.get("_sazd_left_out"):
        return state_dict
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    held: dict[tuple[CodedContext, Any], list[CodedLayer]] = {}  # one round per model and scheme
    for layer, _ in _coded_weights(optimizer):
        held.setdefault((layer.ctx, layer.scheme), []).append(layer)
    for (ctx, scheme), layers in held.items():
        for layer, kept in scheme.optimizer_states(ctx, layers).items():
            state_dict["state"].setdefault(index[id(layer.param)], {}).update(kept)
    return state_dict


def _refuse_unhooked(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """After every optimizer's step: when it steps a parallelized model, that model's coded weights
    must have an optimizer that updates them; else their gradients would pile up, unapplied. (A
    hooked optimizer's own hook ran first and sent its weights' updates.)"""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    hooked = _hooked_models(optimizer)
    pending = [layer.name for layer, _ in _coded_weights(optimizer)
               if layer.pending and layer.ctx not in hooked]
    for ctx in list(CodedContext.live):
        if ctx in hooked:  # the coded optimizer of this model: weights it does not hold are left out
            continue
        model = None if ctx.model is None else ctx.model()
        if model is not None and any(id(p) in params for p in model.parameters()):
            pending += [m.name for m in ctx.layers.values() if not m.stepped and (
                m.pending or (m.scheme.decodes_weight and raw_grad(m.param) is not None))]
    if pending:
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() left the coded weights of {sorted(set(pending))} unchanged "
            "(their gradient lives on the workers) and no optimizer made by sazd.coded_optimizer holds "
            "them; create the optimizer as sazd.coded_optimizer(torch.optim.SGD(model.parameters(), ...))")


register_optimizer_step_post_hook(_refuse_unhooked)
