"""What users do with gradients besides ``loss.backward(); optimizer.step()``, on a coded model, both
schemes: ``torch.autograd.grad`` (of an input, of the weights, with ``create_graph`` for a gradient
penalty), hooks on a weight, ``backward(inputs=...)``, reading ``.grad`` after the step, no
``zero_grad`` between steps, ``model.zero_grad()`` and ``zero_grad(set_to_none=False)``, clipping by
value and by norm. DEU keeps a weight's gradient as factors on the master; each of these must still
see, and step with, exactly the gradient plain PyTorch has. Oracle: the plain model, float64."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.parallel import CodedLayer, coded_layers
from sazd.runtime.inproc import InProcessCluster

F64 = torch.float64
SCHEMES = ["naive", "deu"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 6)).to(F64)


def pair(scheme: str, make: Callable[[], nn.Module] = mlp) -> tuple[nn.Module, nn.Module]:
    plain = make()
    model = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=6, k=4), InProcessCluster(6),
                             scheme=scheme, min_features=6)
    assert len(coded_layers(model)) == 3
    return plain, model


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return sazd.coded_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 32, generator=g, dtype=F64), torch.randn(10, 6, generator=g, dtype=F64)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = batch(seed)
    return (model(x) - y).square().mean()


def assert_same_weights(model: nn.Module, plain: nn.Module, tol: float = 1e-12) -> None:
    with torch.no_grad():
        for (name, got), want in zip(model.named_parameters(), plain.parameters(), strict=True):
            assert float((got - want).abs().max()) <= tol, name


Step = Callable[[nn.Module, torch.optim.Optimizer, int], None]


def step_both(plain: nn.Module, model: nn.Module, step: Step, steps: int = 3) -> None:
    """Run ``step(model, optimizer, i)`` on both models (no warning from the coded one), compare."""
    opts = (torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), sgd(model))
    for i in range(steps):
        step(plain, opts[0], i)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step(model, opts[1], i)
    assert_same_weights(model, plain)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_autograd_grad_of_an_input_adds_nothing_to_the_next_step(scheme):
    """An input-gradient probe (saliency, a gradient penalty's first half) runs the coded layers'
    backward: under DEU their weight factors must not join the optimizer's update."""
    plain, model = pair(scheme)

    def step(m, opt, i):
        opt.zero_grad()
        x, _ = batch(100 + i)
        x.requires_grad_(True)
        torch.autograd.grad(m(x).square().sum(), x)
        loss_of(m, i).backward()
        opt.step()

    step_both(plain, model, step)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_autograd_grad_of_the_weights_is_plain_and_leaves_no_update(scheme):
    plain, model = pair(scheme)
    want = torch.autograd.grad(loss_of(plain, 0), list(plain.parameters()))
    got = torch.autograd.grad(loss_of(model, 0), list(model.parameters()))
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max()) <= 1e-13
    assert all(not layer.keeps_gradient for layer in coded_layers(model))
    assert all(p.grad is None for p in model.parameters())
    step_both(plain, model, lambda m, opt, i: (opt.zero_grad(), loss_of(m, i).backward(), opt.step()))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_gradient_penalty_differentiates_twice_through_the_coded_products(scheme):
    """WGAN-GP style: the norm of d(output)/d(input), made with ``create_graph=True``, is part of the
    loss; its gradient runs backward through the products' own backward."""
    plain, model = pair(scheme)

    def step(m, opt, i):
        opt.zero_grad()
        x, _ = batch(200 + i)
        x.requires_grad_(True)
        (dx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        (loss_of(m, i) + (dx.norm(dim=1) - 1).square().mean()).backward()
        opt.step()

    step_both(plain, model, step)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_hook_on_a_coded_weight_sees_and_changes_its_gradient(scheme):
    plain, model = pair(scheme)
    seen: dict[int, list[torch.Tensor]] = {id(plain): [], id(model): []}
    for m in (plain, model):
        m[2].weight.register_hook(lambda g, m=m: seen[id(m)].append(g.clone()) or g * 0.5)

    step_both(plain, model, lambda m, opt, i: (opt.zero_grad(), loss_of(m, i).backward(), opt.step()))
    assert len(seen[id(model)]) == 3
    for g, w in zip(seen[id(model)], seen[id(plain)], strict=True):
        assert float((g - w).abs().max()) <= 1e-13


@pytest.mark.parametrize("scheme", SCHEMES)
def test_backward_with_inputs_leaves_the_other_weights_alone(scheme):
    plain, model = pair(scheme)

    def step(m, opt, i):
        opt.zero_grad()
        loss_of(m, i).backward(inputs=[m[0].weight, m[4].bias])  # the middle weight gets nothing
        opt.step()

    step_both(plain, model, step)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_gradient_is_there_after_the_step_and_accumulates_without_zero_grad(scheme):
    plain, model = pair(scheme)
    opts = (torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), sgd(model))
    for i in range(3):  # no zero_grad: each step adds the earlier gradients again, as torch does
        for m, opt in zip((plain, model), opts, strict=True):
            loss_of(m, i).backward()
            opt.step()
        for got, want in zip(model.parameters(), plain.parameters(), strict=True):
            assert float((got.grad - want.grad).abs().max()) <= 1e-12  # read after the step
    assert_same_weights(model, plain)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("zero", ["model", "model-zeros", "optimizer-zeros"])
def test_every_zero_grad_spelling_trains_as_plain(scheme, zero):
    plain, model = pair(scheme)

    def step(m, opt, i):
        if zero == "model":
            m.zero_grad()
        elif zero == "model-zeros":
            m.zero_grad(set_to_none=False)
        else:
            opt.zero_grad(set_to_none=False)
        loss_of(m, i).backward()
        opt.step()

    step_both(plain, model, step)
    for got, want in zip(model.parameters(), plain.parameters(), strict=True):
        assert float((got.grad - want.grad).abs().max()) <= 1e-12


def test_model_zero_grad_drops_deus_kept_gradient_without_forming_it(monkeypatch):
    """torch's ``zero_grad`` reads every ``.grad`` before setting it to None; a DEU weight's read forms
    its gradient on the master (a weight-sized product): the parallelized model's drops it first."""
    _, model = pair("deu")
    opt = sgd(model)
    loss_of(model, 0).backward()
    opt.step()
    assert all(layer.keeps_gradient for layer in coded_layers(model))  # the last step's, until zero_grad
    formed = []
    monkeypatch.setattr(CodedLayer, "fold_gradient", lambda layer: formed.append(layer.name))
    model.zero_grad()
    opt.zero_grad()
    assert formed == []
    assert all(not layer.keeps_gradient for layer in coded_layers(model))
    assert all(p.grad is None for p in model.parameters())
    assert "zero_grad" not in sazd.parallel.plain_model(model).__dict__


@pytest.mark.parametrize("scheme", SCHEMES)
def test_clipping_by_value_and_twice_by_norm_trains_as_plain(scheme):
    plain, model = pair(scheme)

    def step(m, opt, i):
        opt.zero_grad()
        loss_of(m, i).backward()
        if i == 0:
            torch.nn.utils.clip_grad_value_(m.parameters(), 0.02)
        else:
            for max_norm in (0.5, 0.2):  # the second clip scales what the first left
                clip = sazd.parallel.clip_grad_norm_ if m is model else torch.nn.utils.clip_grad_norm_
                clip(m if m is model else m.parameters(), max_norm)
        opt.step()

    step_both(plain, model, step)


class Regularized(nn.Module):
    """A weight used by a product and by a penalty on its values (no product): DEU keeps one part of
    its gradient as factors and autograd holds the other in ``.grad``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(32, 48), nn.Linear(48, 48), nn.Linear(48, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))
        return out + 0.01 * self.b.weight.square().sum()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_norm_of_a_gradient_held_in_two_parts_is_the_norm_of_their_sum(scheme):
    plain, model = pair(scheme, lambda: Regularized().to(F64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the penalty reads the weight: said once, on purpose
        loss_of(model, 0).backward()
    loss_of(plain, 0).backward()
    want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e9)
    got = sazd.parallel.clip_grad_norm_(model, 1e9)
    assert abs(float(got) - float(want)) <= 1e-12 * float(want)


def test_load_state_dict_with_assign_names_the_action_and_the_fix():
    plain, model = pair("deu")
    with pytest.raises(RuntimeError, match=r"assign=True.*assign=False"):
        model.load_state_dict(plain.state_dict(), assign=True)
    model.load_state_dict({k: v * 2 for k, v in plain.state_dict().items()})
    x, _ = batch(0)
    with torch.no_grad():
        plain.load_state_dict({k: v * 2 for k, v in plain.state_dict().items()})
        assert float((model(x) - plain(x)).abs().max()) <= 1e-12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_func_grad_over_the_models_own_parameters_uses_their_current_values_and_says_so(scheme):
    """``torch.func.grad`` wraps the parameters and ``functional_call`` swaps the wrappers in: the
    forward never reaches sazd and computes with the master's copies, which after a DEU step are stale
    until decoded. They are made current, and the use is said."""
    plain, model = pair(scheme)
    for m in (plain, model):
        opt = sgd(m) if m is model else torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        loss_of(m, 0).backward()
        opt.step()

    def grads(m: nn.Module) -> dict[str, torch.Tensor]:
        x, y = batch(1)
        loss = lambda params: (torch.func.functional_call(m, params, (x,)) - y).square().mean()  # noqa: E731
        return torch.func.grad(loss)(dict(m.named_parameters()))

    want = grads(plain)
    with pytest.warns(UserWarning, match="torch.func over functional_call on the coded weight 0.weight"):
        got = grads(model)
    assert all(float((got[k] - want[k]).abs().max()) <= 1e-13 for k in want)
    replaced = {k: v.detach().clone() * 0.5 for k, v in plain.named_parameters()}  # the user's own tensors
    x, _ = batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # values not the coded weights: nothing to say
        out = torch.func.functional_call(model, replaced, (x,))
    assert float((out - torch.func.functional_call(plain, replaced, (x,))).abs().max()) <= 1e-13


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_torch_func_transform_reaching_a_coded_product_names_the_fix(scheme):
    _, model = pair(scheme)
    x, _ = batch(0)
    with pytest.raises(RuntimeError, match=r"0\.weight: a coded product cannot run under a torch\.func "
                                           r"transform.*plain_model"):
        torch.func.vmap(lambda row: model(row.unsqueeze(0)).squeeze(0))(x)
    with torch.no_grad():
        assert model(x).shape == (10, 6)  # and the model goes on
