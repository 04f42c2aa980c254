"""A coded weight stays its module's parameter (``CodedParameter``): every path that reads or writes
it either runs coded and equals plain PyTorch in float64, or says what it did. One test per class of
"silently wrong" (in-place writes, merges, ``.to``, autocast, fast paths, several models on one
cluster, a second optimizer, an optimizer made before ``parallelize``); oracle: plain PyTorch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import sazd
from sazd.codes import get_code
from sazd.parallel import Coded, CodedParameter, Master, coded_layers, context, parallelize
from sazd.runtime import make_cluster
from sazd.runtime.inproc import InProcessCluster

SCHEMES = ("naive", "deu")


class Block(nn.Module):
    """A GPT-2-style block: Conv1D projections (weights stored (in, out)), a square one, and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c_fc = Conv1D(24, 12)  # nf=24 outputs, nx=12 inputs: weight (12, 24)
        self.c_proj = Conv1D(24, 24)  # square: a transposed load would go unnoticed by shapes
        self.head = nn.Linear(24, 16)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c_proj(torch.tanh(self.c_fc(x)))))


def code_it(model: nn.Module, scheme: str, cluster=None, **kw) -> nn.Module:
    cluster = cluster if cluster is not None else InProcessCluster(5, base_time_s=0.0)
    return parallelize(model, get_code("sazd", n=5, k=3), cluster, scheme=scheme, min_features=8, **kw)


def pair(scheme: str, make=Block, **kw) -> tuple[nn.Module, nn.Module]:
    plain = make()
    return plain, code_it(copy.deepcopy(plain), scheme, **kw)


def data(steps: int = 3, shape: tuple[int, ...] = (4, 3, 12)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def optimizer(scheme: str, params) -> torch.optim.Optimizer:
    if scheme == "naive":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_conv1d_is_a_layout_state_dict_and_training_equal_plain_in_float64(scheme):
    plain, coded = pair(scheme)
    names = [layer.weight_name for layer in coded_layers(coded)]
    assert names == ["c_fc.weight", "c_proj.weight", "head.weight"]
    assert type(coded.c_fc) is Conv1D and isinstance(coded.c_fc.weight, CodedParameter)
    sd = coded.state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [(k, v.shape) for k, v in plain.state_dict().items()]
    assert all(type(v) is torch.Tensor for v in sd.values())
    assert [n for n, _ in coded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = data(1)[0]
    assert torch.allclose(coded(x), plain(x), rtol=0, atol=1e-12)
    train(plain, optimizer(scheme, plain.parameters()), data())
    train(coded, sazd.coded_optimizer(optimizer(scheme, coded.parameters())), data())
    assert max_diff(coded, plain) < 1e-11
    reloaded = Block()
    reloaded.load_state_dict(coded.state_dict())  # the plain class loads the coded model's state
    assert max_diff(reloaded, plain) < 1e-11


@pytest.mark.parametrize("scheme", SCHEMES)
def test_in_place_writes_reach_the_workers(scheme):
    """A custom init after parallelize, ``w.data += delta`` (peft's merge), ``w.data = new`` and
    ``copy_``: each is shipped before the next product."""
    plain, coded = pair(scheme)
    train(plain, optimizer(scheme, plain.parameters()), data(2))
    train(coded, sazd.coded_optimizer(optimizer(scheme, coded.parameters())), data(2))
    delta = torch.randn(12, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = data(1)[0]
    for edit in (lambda m: m.c_proj.weight.zero_(), lambda m: m.c_fc.weight.data.__iadd__(delta),
                 lambda m: setattr(m.c_fc.weight, "data", m.c_fc.weight.data + delta),
                 lambda m: m.head.weight.copy_(torch.ones(16, 24, dtype=torch.float64)),
                 lambda m: nn.init.normal_(m.c_proj.weight, generator=torch.Generator().manual_seed(4))):
        for model in (plain, coded):
            with torch.no_grad():
                edit(model)
        assert torch.allclose(coded(x), plain(x), rtol=0, atol=1e-11)
    assert max_diff(coded, plain) < 1e-11


def test_deu_in_place_edit_keeps_the_workers_momentum_as_torch_keeps_its_buffer():
    plain, coded = pair("deu")
    opts = optimizer("deu", plain.parameters()), sazd.coded_optimizer(optimizer("deu", coded.parameters()))
    for model, opt in zip((plain, coded), opts, strict=True):
        train(model, opt, data(2))
        with torch.no_grad():
            model.c_fc.weight.mul_(0.5)
        train(model, opt, data(2))
    assert max_diff(coded, plain) < 1e-11


@pytest.mark.parametrize("scheme", SCHEMES)
def test_to_dtype_after_parallelize_re_encodes_the_blocks(scheme):
    plain, coded = pair(scheme)
    plain.float()
    coded.float()
    x = data(1)[0].float()
    assert coded(x).dtype == torch.float32
    assert torch.allclose(coded(x), plain(x), rtol=0, atol=1e-5)
    worker = context(coded).cluster.workers[0]
    assert {b.dtype for key, b in worker.weights.items() if key.endswith(".row")} == {torch.float32}
    train(plain, optimizer(scheme, plain.parameters()), [x])
    train(coded, sazd.coded_optimizer(optimizer(scheme, coded.parameters())), [x])
    assert max_diff(coded, plain) < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_autocast_answers_in_the_dtype_plain_pytorch_would_and_backward_runs(scheme):
    plain, coded = pair(scheme)
    plain.float()
    coded.float()
    x = data(1)[0].float()
    outs = []
    for model in (plain, coded):
        with torch.autocast("cpu", torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        outs.append(y)
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16
    assert torch.allclose(outs[1].float(), outs[0].float(), rtol=0.05, atol=0.05)
    assert plain.head.bias.grad is not None and coded.head.bias.grad is not None


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def test_transformer_encoder_fast_path_is_never_taken_uncoded():
    """eval() under no_grad is PyTorch's fused fast path, which reads the weights directly: a coded
    weight turns it off (it has ``__torch_function__``), so every product is a coded round."""
    plain, coded = pair("deu", make=Encoder)
    names = {layer.name for layer in coded_layers(coded)}
    assert "encoder.layers.0.self_attn.in_proj_weight" in names and "encoder.layers.1.linear2" in names
    assert len(names) == 8  # in_proj, out_proj, linear1, linear2 of both layers
    plain.eval()
    coded.eval()
    x = data(1, (2, 5, 16))[0]
    rounds = context(coded).cluster.counters.rounds
    with torch.no_grad():
        got, want = coded(x), plain(x)
    assert context(coded).cluster.counters.rounds - rounds == 8
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_multihead_attention_trains_like_plain(scheme):
    plain, coded = pair(scheme, make=Encoder)
    batches = data(3, (2, 5, 16))
    train(plain, optimizer(scheme, plain.parameters()), batches)
    train(coded, sazd.coded_optimizer(optimizer(scheme, coded.parameters())), batches)
    assert max_diff(coded, plain) < 1e-9  # AdamW divides by sqrt(v): rounding grows


def test_two_models_with_the_same_names_on_one_cluster_keep_their_own_blocks():
    cluster = InProcessCluster(5, base_time_s=0.0)
    a_plain, b_plain = Block(), Block()
    with torch.no_grad():
        for p in b_plain.parameters():
            p.add_(1.0)
    a = code_it(copy.deepcopy(a_plain), "deu", cluster)
    b = code_it(copy.deepcopy(b_plain), "deu", cluster)
    x = data(1)[0]
    assert torch.allclose(a(x), a_plain(x), rtol=0, atol=1e-12)
    assert torch.allclose(b(x), b_plain(x), rtol=0, atol=1e-12)
    assert context(a).prefix != context(b).prefix


def test_a_new_deu_optimizer_starts_without_momentum_as_torch_does():
    plain, coded = pair("deu")
    for model, wrap in ((plain, lambda o: o), (coded, sazd.coded_optimizer)):
        train(model, wrap(optimizer("deu", model.parameters())), data(2))
        train(model, wrap(optimizer("deu", model.parameters())), data(2))  # second phase: fresh momentum
    assert max_diff(coded, plain) < 1e-11


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_optimizer_made_before_parallelize_steps_the_coded_weights(scheme):
    plain = Block()
    coded = copy.deepcopy(plain)
    opt = optimizer(scheme, coded.parameters())  # before parallelize: the same parameter objects
    code_it(coded, scheme)
    train(plain, optimizer(scheme, plain.parameters()), data())
    train(coded, sazd.coded_optimizer(opt), data())
    assert max_diff(coded, plain) < 1e-11


def test_a_plain_models_optimizer_state_loads_and_training_continues_equal():
    plain = Block()
    opt = optimizer("naive", plain.parameters())
    train(plain, opt, data(2))
    coded = code_it(copy.deepcopy(plain), "naive")
    coded_opt = sazd.coded_optimizer(optimizer("naive", coded.parameters()))
    coded_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # same parameter order
    train(plain, opt, data(2))
    train(coded, coded_opt, data(2))
    assert max_diff(coded, plain) < 1e-11


def test_deu_other_uses_decode_with_a_one_time_warning_naming_the_operation():
    plain, coded = pair("deu")
    train(plain, optimizer("deu", plain.parameters()), data(1))
    train(coded, sazd.coded_optimizer(optimizer("deu", coded.parameters())), data(1))
    with pytest.warns(UserWarning, match=r"sum on the coded weight head\.weight"):
        got = coded.head.weight.sum()
    assert torch.allclose(got, plain.head.weight.sum(), rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coded.head.weight.sum()  # cached until the next update, and said once


def test_explicit_plan_takes_patterns_and_a_scheme_per_weight():
    plan = {"c_*": Coded(scheme="naive"), "head": Master()}
    plain, coded = pair("deu", plan=plan)
    schemes = {layer.name: layer.scheme.name for layer in coded_layers(coded)}
    assert schemes == {"c_fc": "naive", "c_proj": "naive"}
    train(plain, torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9), data())
    train(coded, sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.05, momentum=0.9)), data())
    assert max_diff(coded, plain) < 1e-11


def test_maintainer_load_of_another_models_checkpoint_changes_nothing(tmp_path):
    _, coded = pair("deu")
    opt = sazd.coded_optimizer(optimizer("deu", coded.parameters()))
    train(coded, opt, data(1))
    other = code_it(Encoder(), "deu")
    sazd.Maintainer(other).save(tmp_path / "other.pt")
    before = {k: v.clone() for k, v in coded.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit the model.*nothing was loaded"):
        sazd.Maintainer(coded).load(tmp_path / "other.pt", opt)
    sazd.Maintainer(coded).save(tmp_path / "own.pt")  # no optimizer state
    with pytest.raises(ValueError, match=r"holds no optimizer state.*nothing was loaded"):
        sazd.Maintainer(coded).load(tmp_path / "own.pt", opt)
    lone = torch.optim.SGD([coded.head.bias], lr=0.1)
    sazd.Maintainer(coded).save(tmp_path / "own.pt", opt)
    with pytest.raises(ValueError, match=r"parameter groups of sizes.*nothing was loaded"):
        sazd.Maintainer(coded).load(tmp_path / "own.pt", lone)
    after = coded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_replacing_a_coded_weight_is_refused_naming_load_state_dict():
    _, coded = pair("naive")
    with pytest.raises(AttributeError, match="load_state_dict"):
        coded.c_fc.weight = nn.Parameter(torch.zeros(12, 24, dtype=torch.float64))


@pytest.mark.slow
def test_two_models_and_conv1d_on_ray(ray_session):
    cluster = make_cluster("ray", 5)
    try:
        pairs = [pair(scheme, cluster=cluster) for scheme in SCHEMES]
        for scheme, (plain, coded) in zip(SCHEMES, pairs, strict=True):
            train(plain, optimizer(scheme, plain.parameters()), data())
            train(coded, sazd.coded_optimizer(optimizer(scheme, coded.parameters())), data())
            assert max_diff(coded, plain) < 1e-11
        x = data(1)[0]
        with torch.no_grad():
            pairs[1][0].c_fc.weight.zero_()
            pairs[1][1].c_fc.weight.zero_()
        assert torch.allclose(pairs[1][1](x), pairs[1][0](x), rtol=0, atol=1e-11)
    finally:
        cluster.close()


def test_a_checkpoint_block_that_is_not_the_encoding_of_its_weight_is_refused_by_worker_and_block():
    _, coded = pair("deu")
    train(coded, sazd.coded_optimizer(optimizer("deu", coded.parameters())), data(2))
    keeper = sazd.Maintainer(coded)
    state = keeper.state(blocks=True)
    keeper.load_state(state)  # its own blocks pass
    before = {k: v.clone() for k, v in coded.state_dict().items()}
    worker = max(int(key.split("/")[0]) for key in state.blocks)  # a parity worker among the first k
    key = f"{worker}/c_proj.row"
    state.blocks[key] = state.blocks[key] + 0.5
    wrong = rf"block c_proj\.row of worker {worker} does not encode the checkpoint's plain c_proj\.weight"
    with pytest.raises(ValueError, match=wrong):
        keeper.load_state(state)
    after = coded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(16, 12)
        self.head = nn.Linear(12, 16, bias=False)
        self.head.weight = self.wte.weight
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.wte(ids)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_weight_tied_to_an_embedding_coded_by_plan_trains_exactly(scheme):
    """The lookup's gradient is autograd's ``.grad``, the head's products DEU's kept factors: under DEU
    the step sends their sum whole, encoded, so the workers' blocks stay the true weight's."""
    plain = TiedHead()
    coded = code_it(copy.deepcopy(plain), scheme, plan={"head": Coded()})
    opts = optimizer(scheme, plain.parameters()), sazd.coded_optimizer(optimizer(scheme, coded.parameters()))
    for step in range(3):
        ids = (torch.arange(12).reshape(3, 4) * (step + 1)) % 16
        for model, opt in zip((plain, coded), opts, strict=True):
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the lookup reads the master's copy: said once
                model(ids).square().mean().backward()
            opt.step()
        assert max_diff(coded, plain) < 1e-11, step
    assert coded.head.weight.grad is not None  # autograd's, kept after the step as torch keeps it


def test_bad_uses_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="scheme must be one of"):
        pair("deu", plan={"c_fc": Coded(scheme="adam")})
    with pytest.raises(ValueError, match="a style is Coded"):
        pair("deu", plan={"c_fc": "rowwise"})
    _, coded = pair("deu")
    with pytest.raises(ValueError, match=r"c_fc\.weight is coded with shape \(12, 24\).*re-parallelize"):
        coded.c_fc.weight.data = torch.zeros(24, 12, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"same dtype.*torch\.autocast"):
        coded(data(1)[0].float())
    with pytest.raises(ValueError, match="already parallelized"):
        code_it(coded, "deu")


def test_a_coded_optimizer_without_the_live_coded_weights_is_an_error_at_its_first_step():
    _, coded = pair("deu")
    opt = sazd.coded_optimizer(torch.optim.SGD([coded.head.bias, coded.c_fc.bias], lr=0.1))
    coded(data(1)[0]).square().mean().backward()
    left = r"left the coded weights of \['c_fc', 'c_proj', 'head'\] unchanged"
    with pytest.raises(RuntimeError, match=left):
        opt.step()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_products_and_input_gradients_are_laid_out_as_plain_pytorchs(scheme):
    """A coded product answers in the layout plain PyTorch's does (``F.linear``: row-major; ``conv2d``:
    the input's or weight's channels-last, else contiguous; ``conv1d``: contiguous), and so does the
    input gradient it hands autograd: a ``.view`` downstream works (FSMT's attention views a time-major
    projection), and a float32 reduction of a float64 model (transformers' RMSNorm) sums in the same
    order, bit for bit."""
    torch.manual_seed(0)
    plain = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16), "conv": nn.Conv2d(8, 16, 3),
                           "conv1d": nn.Conv1d(8, 16, 3)}).double()
    model = code_it(copy.deepcopy(plain), scheme)
    assert len(coded_layers(model)) == 4
    x = torch.randn(5, 3, 16, dtype=torch.float64)  # time-major (T, B, C)
    seen = []
    for net in (plain, model):
        h = net["a"](x)
        h.register_hook(lambda grad: seen.append(grad))  # the input gradient of b's product
        y = net["b"](h)
        assert y.stride() == (48, 16, 1) and y.view(5, 12, 4).shape == (5, 12, 4)
        squares = y.to(torch.float32).pow(2).mean(-1)  # RMSNorm's float32 statistic
        seen.append(squares)
        squares.sum().backward()
    assert seen[0].stride() == seen[2].stride() and seen[1].stride() == seen[3].stride()
    assert torch.equal(seen[1], seen[3])  # the float32 statistic, bit for bit
    images = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        want, got = (net["conv"](images.to(memory_format=layout)) for net in (plain, model))
        assert got.stride() == want.stride() and got.is_contiguous(memory_format=layout)
    sound = torch.randn(2, 6, 8, dtype=torch.float64).transpose(1, 2)  # a non-contiguous (B, C, L)
    want, got = (net["conv1d"](sound) for net in (plain, model))
    assert got.stride() == want.stride() and got.is_contiguous()
