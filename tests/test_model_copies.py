"""A parallelized model copied, pickled or compiled by TorchScript. A copy (``copy.deepcopy``,
``torch.save(model)`` / ``torch.load``, ``pickle``) is a plain model with the current weights, which
scripts and traces as any plain model. ``torch.jit.script`` / ``torch.jit.trace`` of the coded model,
or of a module of it that holds a coded weight, would compute with the master's copy out of sazd's
sight (under DEU a stale one): refused with a message naming the fix."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.parallel import coded_layers
from sazd.parallel.coded import CODED
from sazd.runtime.inproc import InProcessCluster

F64 = torch.float64
SCHEMES = ["naive", "deu"]


def trained(scheme: str) -> tuple[nn.Module, nn.Module]:
    """A plain model and its coded twin after two equal SGD steps (DEU: the master's copy is stale)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 6)).to(F64)
    model = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=6, k=4), InProcessCluster(6),
                             scheme=scheme, min_features=6)
    assert len(coded_layers(model)) == 2
    for net in (plain, model):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        optimizer = sazd.coded_optimizer(optimizer) if net is model else optimizer
        for seed in range(2):
            optimizer.zero_grad()
            net(inputs(seed)).square().mean().backward()
            optimizer.step()
    return plain, model


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(7, 32, generator=torch.Generator().manual_seed(seed), dtype=F64)


def assert_plain_and_equal(copied: nn.Module, plain: nn.Module) -> None:
    assert not any(isinstance(p, CODED) for p in copied.parameters())
    with torch.no_grad():
        assert float((copied(inputs(5)) - plain(inputs(5))).abs().max()) < 1e-12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_jit_script_of_the_model_or_of_a_coded_module_is_refused_by_name(scheme: str) -> None:
    _, model = trained(scheme)
    for target in (model, model[2]):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .* coded.*plain_model"):
            torch.jit.script(target)
    with torch.no_grad():  # refusing changed nothing: the model still computes coded rounds
        model(inputs(1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_jit_trace_of_the_model_is_refused_by_name(scheme: str) -> None:
    _, model = trained(scheme)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace cannot record a coded product.*plain_model"):
        torch.jit.trace(model, inputs(1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_plain_copies_script_and_trace_with_the_current_weights(scheme: str) -> None:
    plain, model = trained(scheme)
    for copied in (sazd.parallel.plain_model(model), copy.deepcopy(model)):
        assert_plain_and_equal(copied, plain)
        scripted = torch.jit.script(copied)
        traced = torch.jit.trace(copy.deepcopy(copied), inputs(1))
        with torch.no_grad():
            for compiled in (scripted, traced):
                assert float((compiled(inputs(5)) - plain(inputs(5))).abs().max()) < 1e-12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_torch_save_of_the_whole_model_loads_a_plain_model(scheme: str) -> None:
    plain, model = trained(scheme)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_plain_and_equal(loaded, plain)
    assert_plain_and_equal(pickle.loads(pickle.dumps(model)), plain)
    torch.jit.script(loaded)  # a plain model: it scripts
    with torch.no_grad():  # and the coded model goes on as before
        assert float((model(inputs(6)) - plain(inputs(6))).abs().max()) < 1e-12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_new_parameter_made_from_a_coded_weight_is_refused_by_name(scheme: str) -> None:
    """``nn.Parameter(w)`` (as weight_norm's parametrization makes one) would take the weight out of
    the code; a plain copy of it is what the message offers, and works."""
    plain, model = trained(scheme)
    weight = model[2].weight
    refused = r"nn\.Parameter\(2\.weight\) of a coded weight.*detach\(\)\.clone\(\)"
    with pytest.raises(RuntimeError, match=refused):
        nn.Parameter(weight)
    with pytest.raises(RuntimeError, match=r"parametrize the plain model before sazd\.parallelize"):
        torch.nn.utils.parametrizations.weight_norm(model[2])
    copied = nn.Parameter(weight.detach().clone())
    assert type(copied) is nn.Parameter
    assert float((copied.data - plain[2].weight.data).abs().max()) < 1e-12  # current (DEU: decoded)
    with torch.no_grad():  # the model is untouched
        assert float((model(inputs(3)) - plain(inputs(3))).abs().max()) < 1e-12
