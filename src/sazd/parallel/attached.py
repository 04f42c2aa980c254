"""What ``parallelize`` attaches to the user's model, and what becomes of it when the model is copied.

The model keeps its class; sazd adds three objects to it:

- ``KeptGradientsZeroGrad`` as ``model.zero_grad``: DEU's kept gradients are dropped before torch's
  ``zero_grad`` reads them (a read forms them);
- ``ForwardWatch``, a forward pre-hook: it notices ``torch.func`` computing with the master's copies;
- ``ScriptingRefusal`` as ``__prepare_scriptable__`` of the model and of each module that holds a
  coded weight: ``torch.jit.script`` would compile its forward with the master's copy of the weight,
  out of sazd's sight (no coded round; under DEU a stale copy), so it is refused by name.

A copy of a parallelized model (``copy.deepcopy``, ``pickle`` / ``torch.save(model)``) is a plain model,
its coded weights copied as plain parameters: the copy's watch watches nothing, and the copy's
refusal lets it be scripted (and takes the idle watch off first, which TorchScript cannot compile).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sazd.parallel.coded import CODED, CodedLayer, coded_parameters, warn_once
from sazd.parallel.context import CodedContext


class KeptGradientsZeroGrad:
    """``model.zero_grad`` of a parallelized model: the DEU gradients its coded weights keep are dropped
    first (torch's ``zero_grad`` reads every ``.grad``, and reading one forms it), then the model's own
    ``zero_grad`` runs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, set_to_none: bool = True) -> None:
        if set_to_none:
            for param in coded_parameters(self.model):
                param.layer.drop_gradient()
        type(self.model).zero_grad(self.model, set_to_none)


class ForwardWatch:
    """The forward pre-hook of a parallelized model. When ``torch.func.functional_call`` has swapped a
    coded weight out of its module (``slots``: module, attribute, layer) for a functorch-wrapped copy
    of itself (``torch.func.grad`` over the model's own parameters), the forward computes with the
    master's copy, out of sazd's sight: that copy is made current (DEU decodes it) and the use said."""

    def __init__(self, ctx: CodedContext | None, slots: Sequence[tuple[nn.Module, str, CodedLayer]]) -> None:
        self._ctx = None if ctx is None else weakref.ref(ctx)
        self._slots = tuple(slots)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        ctx = None if self._ctx is None else self._ctx()
        if ctx is None:  # a copy's
            return
        for owner, attr, layer in self._slots:
            swapped = owner._parameters.get(attr)
            if swapped is not layer.param and _unwrapped(swapped) is layer.param:
                warn_once("torch.func over functional_call", layer)
                with torch._C._DisableFuncTorch():  # the decode's own tensors are no transform's
                    layer.refresh()

    @property
    def watching(self) -> bool:
        """Whether the model it watches is still parallelized (a copy's watch is not)."""
        return self._ctx is not None and self._ctx() is not None

    def __deepcopy__(self, memo: dict) -> ForwardWatch:
        return ForwardWatch(None, ())  # the copy is a plain model: nothing to watch

    def __reduce__(self) -> tuple:
        return ForwardWatch, (None, ())


def _unwrapped(t: Any) -> Any:
    functorch = torch._C._functorch
    while isinstance(t, Tensor) and functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


class ScriptingRefusal:
    """``__prepare_scriptable__`` of a parallelized model and of each module of it holding a coded
    weight, which ``torch.jit.script`` calls before it compiles the module (and each of its submodules):
    while the module holds a coded weight, or is a parallelized model, it raises, naming the fix; a
    plain copy is returned as it is."""

    def __init__(self, module: nn.Module | None) -> None:
        self._module = weakref.ref(module) if module is not None else lambda: None

    def __call__(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise RuntimeError("torch.jit.script: the module this refusal belonged to is gone; script "
                               "the module itself")
        coded = [p.layer.weight_name for p in module._parameters.values() if isinstance(p, CODED)]
        hooks = module._forward_pre_hooks
        watches = {key: hook for key, hook in hooks.items() if isinstance(hook, ForwardWatch)}
        if coded or any(hook.watching for hook in watches.values()):
            what = f"a module whose weight {coded[0]} is coded" if coded else "a parallelized model"
            raise RuntimeError(
                f"torch.jit.script cannot compile {what}: the scripted forward would compute with the "
                "master's copy of each coded weight, out of sazd's sight (no coded round; under DEU a stale "
                "copy); script a plain copy, sazd.parallel.plain_model(model), or use torch.compile(model), "
                "which keeps the coded rounds")
        for key in watches:  # a copy's watch watches nothing, and TorchScript would compile it
            del module._forward_pre_hooks[key]
        return module

    def __deepcopy__(self, memo: dict) -> ScriptingRefusal:
        module = self._module()
        return ScriptingRefusal(memo.get(id(module), module))  # bound to the copied module

    def __reduce__(self) -> tuple:
        return ScriptingRefusal, (self._module(),)


def _say_replaced(parent: nn.Module, name: str, module: nn.Module | None) -> None:
    """A submodule holding coded weights replaced after ``parallelize`` (``model.head = nn.Linear(...)``):
    the replacement's weights compute on the master, uncoded. Said once per weight, and listed in the
    model's ``left_on_master``. A replacement that keeps the old module inside it (peft's LoRA wrapper
    holds it as ``base_layer``) keeps its coded weights: nothing is said."""
    old = parent._modules.get(name)
    if old is None or old is module:
        return
    kept = set() if module is None else {id(p) for p in module.parameters()}
    gone = [p.layer for p in old.parameters() if isinstance(p, CODED) and id(p) not in kept]
    for layer in {id(layer): layer for layer in gone}.values():
        model = None if layer.ctx.model is None else layer.ctx.model()
        path = next((f"{prefix}.{name}" if prefix else name for prefix, m in (model or parent).named_modules()
                     if m is parent), name)
        fix = "to code it, parallelize a plain copy: sazd.parallelize(sazd.parallel.plain_model(model), ...)"
        weight = layer.weight_name
        layer.ctx.left_on_master[path] = f"it replaced, after sazd.parallelize, the module of {weight}; {fix}"
        warn_once("replaced", layer, (
            f"{path} was replaced after sazd.parallelize (by {type(module).__name__}): the module that held "
            f"the coded weight {weight} left the model, and the replacement computes on the master, uncoded "
            f"(no straggler tolerance); {fix}"))


nn.modules.module.register_module_module_registration_hook(_say_replaced)


def attach(model: nn.Module, ctx: CodedContext, slots: Sequence[tuple[nn.Module, str, CodedLayer]]) -> None:
    """Attach the three to a model ``parallelize`` just coded (``slots``: module, attribute, layer)."""
    model.zero_grad = KeptGradientsZeroGrad(model)
    ctx.forward_hook = model.register_forward_pre_hook(ForwardWatch(ctx, slots)).id
    for owner in {id(m): m for m in [model, *(owner for owner, _, _ in slots)]}.values():
        owner.__dict__["__prepare_scriptable__"] = ScriptingRefusal(owner)


def detach(plain: nn.Module, forward_hook: int) -> None:
    """Remove them from ``plain``, a copy of a parallelized model (``sazd.parallel.plain_model``)."""
    if isinstance(plain.__dict__.get("zero_grad"), KeptGradientsZeroGrad):
        del plain.zero_grad
    plain._forward_pre_hooks.pop(forward_hook, None)
    for module in plain.modules():
        if isinstance(module.__dict__.get("__prepare_scriptable__"), ScriptingRefusal):
            del module.__dict__["__prepare_scriptable__"]


__all__ = ["ForwardWatch", "KeptGradientsZeroGrad", "ScriptingRefusal", "attach", "detach"]
