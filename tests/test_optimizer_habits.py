"""Optimizer habits on a coded model, against the plain model in float64: torch's fused optimizer
kernels (which write the weights without moving their version counters), SGD(maximize=True) under
DEU, ``add_param_group`` after ``coded_optimizer``, and an optimizer over part of the model (the rest
accumulating gradients, as in torch, without DEU's kept factors growing without bound)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.parallel import coded_layers
from sazd.runtime.inproc import InProcessCluster

F64 = torch.float64
Make = Callable[[list], torch.optim.Optimizer]


def pair(scheme: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 6))
    plain = plain.to(F64)
    model = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=6, k=4), InProcessCluster(6),
                             scheme=scheme, min_features=6)
    assert len(coded_layers(model)) == 3
    return plain, model


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(10, 32, generator=g, dtype=F64), torch.randn(10, 6, generator=g, dtype=F64)
    return (model(x) - y).square().mean()


def gap(model: nn.Module, plain: nn.Module) -> float:
    with torch.no_grad():
        pairs = zip(model.parameters(), plain.parameters(), strict=True)
        return max(float((a - b).abs().max()) for a, b in pairs)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for seed in range(steps):
        optimizer.zero_grad()
        loss_of(model, seed).backward()
        optimizer.step()


FUSED: dict[str, Make] = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_optimizer_kernels_reach_the_workers_under_naive(name: str) -> None:
    plain, model = pair("naive")
    train(plain, FUSED[name](plain.parameters()))
    train(model, sazd.coded_optimizer(FUSED[name](model.parameters())))
    assert gap(model, plain) < 1e-12
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 32, generator=g, dtype=F64)
    with torch.no_grad():  # the workers' blocks hold the stepped weights: the coded forward agrees
        assert float((model(x) - plain(x)).abs().max()) < 1e-12


def test_fused_sgd_under_deu_steps_on_the_workers() -> None:
    plain, model = pair("deu")
    train(plain, FUSED["SGD"](plain.parameters()))
    train(model, sazd.coded_optimizer(FUSED["SGD"](model.parameters())))
    assert gap(model, plain) < 1e-12


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_sgd_maximize_ascends_as_torch_does(scheme: str) -> None:
    plain, model = pair(scheme)

    def make(ps: list) -> torch.optim.Optimizer:
        return torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01, maximize=True)

    train(plain, make(plain.parameters()))
    train(model, sazd.coded_optimizer(make(model.parameters())))
    assert gap(model, plain) < 1e-12
    with torch.no_grad():
        assert float(loss_of(model, 0)) > float(loss_of(pair(scheme)[0], 0))  # it ascended


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_add_param_group_after_coded_optimizer_steps_the_new_group(scheme: str) -> None:
    plain, model = pair(scheme)
    for net in (plain, model):
        params = list(net.parameters())
        optimizer = torch.optim.SGD(params[:2], lr=0.1, momentum=0.9)
        optimizer = sazd.coded_optimizer(optimizer) if net is model else optimizer
        train(net, optimizer, steps=1)  # layers 2 and 4 accumulate gradients, unstepped, as in torch
        optimizer.add_param_group({"params": params[2:], "lr": 0.2})
        train(net, optimizer, steps=2)
    assert gap(model, plain) < 1e-12


def test_add_param_group_that_deu_cannot_step_is_refused_and_not_added() -> None:
    _, model = pair("deu")
    params = list(model.parameters())
    optimizer = sazd.coded_optimizer(torch.optim.Adam([params[1]], lr=0.1))  # a bias only
    with pytest.raises(TypeError, match="cannot step the DEU-coded weight"):
        optimizer.add_param_group({"params": params[2:4]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_an_optimizer_over_the_head_only_leaves_the_rest_as_torch_does(scheme: str) -> None:
    """Only the last layer is stepped; ``optimizer.zero_grad`` clears only its own parameters, so the
    other layers' gradients accumulate step after step, in torch as in sazd (DEU folds its kept
    factors into one gradient once they outgrow the weight)."""
    plain, model = pair(scheme)
    for net in (plain, model):
        head = list(net[4].parameters())
        optimizer = torch.optim.SGD(head, lr=0.1, momentum=0.9)
        train(net, sazd.coded_optimizer(optimizer) if net is model else optimizer, steps=12)
    assert gap(model, plain) < 1e-12
    for layer in coded_layers(model)[:2]:
        assert len(layer.pending.factors) <= 5  # 10 rows a step, bounded by twice the weight's size
    for (name, got), want in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert float((got.grad - want.grad).abs().max()) < 1e-12, name  # the accumulated gradients


def test_a_step_that_raised_leaves_deu_gradients_readable() -> None:
    """A step that raises (here a plain model's, from its closure) is over: reading a DEU weight's
    ``.grad`` afterwards forms it as before, so ``clip_grad_value_`` clips it as torch does."""
    bystander = nn.Linear(3, 3)
    failing = torch.optim.SGD(bystander.parameters(), lr=0.1)

    def closure() -> torch.Tensor:
        raise ValueError("a user's closure failed")

    with pytest.raises(ValueError, match="closure failed"):
        failing.step(closure)
    plain, model = pair("deu")
    for net in (plain, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        optimizer = sazd.coded_optimizer(optimizer) if net is model else optimizer
        for seed in range(3):
            optimizer.zero_grad()
            loss_of(net, seed).backward()
            nn.utils.clip_grad_value_(net.parameters(), 0.01)
            optimizer.step()
    assert gap(model, plain) < 1e-12


def conv1d_pair(scheme: str) -> tuple[nn.Module, nn.Module]:
    """A transformers ``Conv1D`` (weight stored transposed) before two Linear layers."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    plain = nn.Sequential(Conv1D(48, 32), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 6)).to(F64)
    model = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=6, k=4), InProcessCluster(6),
                             scheme=scheme, min_features=6)
    assert len(coded_layers(model)) == 3
    return plain, model


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_optimizer_state_dict_is_the_plain_one_and_resumes_exactly(scheme: str) -> None:
    """``optimizer.state_dict()`` of a coded model holds what the plain model's optimizer holds (DEU's
    momentum lives on the workers: it is decoded into the dict, in the parameter's layout), and it
    resumes training exactly in a new coded optimizer and in a plain one."""
    plain, model = conv1d_pair(scheme)
    def sgd(net: nn.Module) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        return sazd.coded_optimizer(optimizer) if net is model else optimizer

    optimizers = [sgd(plain), sgd(model)]
    for net, optimizer in zip((plain, model), optimizers, strict=True):
        train(net, optimizer, steps=2)
    want, got = (optimizer.state_dict() for optimizer in optimizers)
    assert got["param_groups"] == want["param_groups"] and sorted(got["state"]) == sorted(want["state"])
    for index, state in want["state"].items():
        assert float((got["state"][index]["momentum_buffer"] - state["momentum_buffer"]).abs().max()) < 1e-12
    plain_copy = copy.deepcopy(plain)
    resumed = {net: sgd(net) for net in (plain, model, plain_copy)}
    resumed[plain].load_state_dict(want)  # (loading shares the dict's tensors: one copy for each)
    resumed[model].load_state_dict(copy.deepcopy(got))
    resumed[plain_copy].load_state_dict(copy.deepcopy(got))  # the coded model's, into a plain optimizer
    for net, optimizer in resumed.items():
        for seed in range(2, 4):
            optimizer.zero_grad()
            loss_of(net, seed).backward()
            optimizer.step()
    assert gap(model, plain) < 1e-12 and gap(plain_copy, plain) < 1e-12


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_an_optimizer_stepped_in_backward_steps_exactly(scheme: str) -> None:
    """torch's "optimizer step in backward" pattern: one optimizer per parameter, stepped by the
    parameter's post-accumulate-grad hook. DEU's own hook, which takes the backward's factors, runs
    before the user's, so the step sends this backward's update."""
    plain, model = pair(scheme)
    for net in (plain, model):
        for param in net.parameters():
            optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
            optimizer = sazd.coded_optimizer(optimizer) if net is model else optimizer

            def step_now(_: torch.Tensor, optimizer: torch.optim.Optimizer = optimizer) -> None:
                optimizer.step()
                optimizer.zero_grad()

            param.register_post_accumulate_grad_hook(step_now)
        for seed in range(3):
            loss_of(net, seed).backward()
    assert gap(model, plain) < 1e-12
