"""A coded weight used the ways real models use it beyond ``F.linear``: through its transpose
(``x @ W.T``, as transformers' Falcon does), ``torch.mm``, a product edited in place, a use that is
no product at all, and the wide matrices of modules the automatic plan does not know (a mixture of
experts' stacked weights, a custom layer's own ``W``). Oracle: the plain model, in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.parallel import Coded, coded_layers, context
from sazd.runtime.inproc import InProcessCluster

F64 = torch.float64
TOL = 1e-10  # relative, float64 (as the zoo tests)


def coded(model: nn.Module, scheme: str, **kw) -> nn.Module:
    return sazd.parallelize(model, get_code("sazd", n=6, k=4), InProcessCluster(6), scheme=scheme, **kw)


def optimizer(model: nn.Module, scheme: str) -> torch.optim.Optimizer:
    if scheme == "naive":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_side_by_side(plain: nn.Module, model: nn.Module, scheme: str, batches, loss) -> list[float]:
    """Steps of both models on the same batches; the worst relative gap of each step's output."""
    opts = {id(plain): optimizer(plain, scheme), id(model): sazd.coded_optimizer(optimizer(model, scheme))}
    gaps = []
    for batch in batches:
        outs = []
        for m in (plain, model):
            opts[id(m)].zero_grad()
            out = m(batch)
            loss(out).backward()
            opts[id(m)].step()
            outs.append(out.detach())
        gaps.append(float((outs[1] - outs[0]).abs().max() / outs[0].abs().max()))
    return gaps


def assert_same_state(model: nn.Module, plain: nn.Module, tol: float = TOL) -> None:
    got, want = model.state_dict(), plain.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert (got[key] - value).abs().max() <= tol * max(1.0, float(value.abs().max())), key


def assert_trains_as_plain(plain: nn.Module, scheme: str, steps: int = 3, **kw) -> nn.Module:
    """Code a copy of ``plain``; ``steps`` steps of both on random (8, 64) batches, with no warning,
    give the same outputs and the same state. Returns the coded model."""
    model = coded(copy.deepcopy(plain), scheme, **kw)
    batches = [torch.randn(8, 64, dtype=F64) for _ in range(steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing runs on the master's copy
        gaps = train_side_by_side(plain, model, scheme, batches, lambda y: y.square().mean())
    assert max(gaps) <= TOL
    assert_same_state(model, plain)
    return model


class TransposedUses(nn.Module):
    """Every spelling of a product with a weight's transpose, and torch.mm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 96), nn.Linear(96, 64, bias=False), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.a.weight.T + self.a.bias)
        h = torch.tanh(torch.mm(h, self.b.weight.t()))
        h = torch.matmul(h, self.c.weight.transpose(0, 1)) + h @ self.c.weight.permute(1, 0)
        return F.linear(h, self.c.weight.mT.T) + self.c.weight.T.mm(h.T).T


def rounds(model: nn.Module) -> int:
    return context(model).cluster.counters.rounds


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_products_with_a_transposed_coded_weight_are_coded_rounds_and_train_exactly(scheme):
    torch.manual_seed(0)
    plain = TransposedUses().double()
    model = coded(copy.deepcopy(plain), scheme, min_features=32)
    assert {p.layer.name for p in sazd.parallel.coded_parameters(model)} == {"a", "b", "c"}
    x = torch.randn(8, 64, dtype=F64)
    before = rounds(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing runs on the master's copy
        with torch.no_grad():
            y = model(x)
    # one round per product: a, b, and c's four uses; the last (W^T as the left operand) reads the
    # weight on the master, so it is no coded round (and said when it is differentiated, below)
    assert rounds(model) - before == 5
    assert (y - plain(x)).abs().max() <= TOL * y.abs().max()


class TransposedProducts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 96), nn.Linear(96, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.a.weight.T + self.a.bias)
        return torch.mm(h, self.b.weight.t()) + F.linear(h, self.b.weight.T.T) + h @ self.b.weight.mT


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_training_through_transposed_products_equals_plain(scheme):
    torch.manual_seed(1)
    assert_trains_as_plain(TransposedProducts().double(), scheme, min_features=32)


class LeftTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.weight.T.mm(x.T).T  # W^T on the left: not a product the workers compute


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_a_differentiated_use_that_is_no_coded_product_warns_naming_it(scheme):
    torch.manual_seed(2)
    plain = LeftTranspose().double()
    model = coded(copy.deepcopy(plain), scheme, min_features=32)
    x = torch.randn(8, 64, dtype=F64)
    with pytest.warns(UserWarning, match=r"mm on the coded weight a\.weight is not a coded product"):
        y = model(x)
    assert (y - plain(x)).abs().max() <= TOL * y.abs().max()


def test_views_comparisons_and_no_grad_reads_do_not_warn():
    model = coded(nn.Sequential(nn.Linear(64, 64)).double(), "naive", min_features=32)
    W = model[0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert W[:8].shape == (8, 64)
        assert torch.equal(W, W)
        with torch.no_grad():
            assert torch.isfinite(W.sum())


def test_einsum_with_a_coded_weight_warns_under_naive_and_stays_exact():
    class Einsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bi,oi->bo", x, self.a.weight)

    torch.manual_seed(3)
    plain = Einsum().double()
    model = coded(copy.deepcopy(plain), "naive", min_features=32)
    batches = [torch.randn(8, 64, dtype=F64) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"einsum on the coded weight a\.weight .*no straggler tolerance"):
        gaps = train_side_by_side(plain, model, "naive", batches, lambda y: y.square().mean())
    assert max(gaps) <= TOL


class EditsItsProduct(nn.Module):
    """A product without bias edited in place downstream, as attention code scales its queries."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64, bias=False)
        self.out = nn.Linear(64, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(x.shape[0], 4, 16)
        q.mul_(0.25)
        return self.out(torch.tanh(q.reshape(x.shape[0], 64)))


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_a_product_edited_in_place_trains_exactly(scheme):
    torch.manual_seed(4)
    assert_trains_as_plain(EditsItsProduct().double(), scheme, min_features=32)


class Convolutions1d(nn.Module):
    """Conv1d layers as audio encoders use them (strided, dilated, circular padding, no bias), beside
    the kinds that stay on the master: a grouped Conv1d and a ConvTranspose1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(80, 64, 3, padding=1)
        self.c2 = nn.Conv1d(64, 64, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv1d(64, 64, 5, padding=4, dilation=2, padding_mode="circular")
        self.up = nn.ConvTranspose1d(64, 64, 4)
        self.grouped = nn.Conv1d(64, 64, 3, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.grouped(self.up(h))


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_conv1d_layers_are_coded_and_train_exactly_and_the_others_are_listed(scheme):
    torch.manual_seed(7)
    plain = Convolutions1d().double()
    model = coded(copy.deepcopy(plain), scheme, min_features=32)
    ctx = context(model)
    assert set(ctx.layers) == {"c1", "c2", "c3"}
    assert ctx.left_on_master["grouped"].startswith("it is a grouped Conv1d (groups=4)")
    assert ctx.left_on_master["up"].startswith("it is a ConvTranspose1d")
    batches = [torch.randn(2, 80, 20, dtype=F64) for _ in range(3)]
    gaps = train_side_by_side(plain, model, scheme, batches, lambda y: y.square().mean())
    assert max(gaps) <= TOL
    assert_same_state(model, plain)


class OwnMatrix(nn.Module):
    """A custom layer holding its weight as a bare parameter, stored (in, out) and used as ``x @ W``."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(fan_in, fan_out) / fan_in ** 0.5)
        self.scale = nn.Parameter(torch.ones(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.W) * self.scale


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = OwnMatrix(64, 96)
        self.head = nn.Linear(96, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)))


def test_a_custom_layers_own_matrix_is_listed_with_the_plan_that_codes_it():
    model = coded(CustomNet().double(), "deu", min_features=32)
    why = context(model).left_on_master["inner"]
    assert "{'W': (64, 96)}" in why and "OwnMatrix" in why and "plan={'inner': Coded()}" in why
    assert "scale" not in why  # a vector is no matrix


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_an_explicit_plan_codes_a_custom_layers_own_matrix_and_it_trains_exactly(scheme):
    torch.manual_seed(5)
    model = assert_trains_as_plain(CustomNet().double(), scheme, plan={"inner": Coded(), "head": "coded"})
    assert {p.layer.weight_name for p in sazd.parallel.coded_parameters(model)} == {"inner.W", "head.weight"}


def test_an_explicit_plan_naming_a_module_without_a_matrix_is_refused_by_name():
    net = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Embedding(100, 64))
    for name, kind in (("1", "LayerNorm"), ("2", "Embedding")):
        with pytest.raises(ValueError, match=rf"layer '{name}' cannot be coded: it is a {kind}"):
            coded(copy.deepcopy(net), "deu", plan={name: "coded"})


def test_a_mixture_of_experts_stacked_weights_are_listed_with_the_reason():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, num_local_experts=4,
                           num_experts_per_tok=2, tie_word_embeddings=False)
    model = coded(MixtralForCausalLM(config), "deu", min_features=32)
    left = context(model).left_on_master
    for layer in (0, 1):
        why = left[f"model.layers.{layer}.mlp.experts"]
        assert "'gate_up_proj': (4, 256, 64)" in why and "stacks of matrices" in why
    coded_names = {p.layer.weight_name for p in sazd.parallel.coded_parameters(model)}
    assert "model.layers.0.self_attn.q_proj.weight" in coded_names and "lm_head.weight" in coded_names
    assert not any("embed" in name for name in left)  # a lookup table is no product's matrix


def falcon(seed: int = 0) -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    return FalconForCausalLM(config).double()


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_transformers_falcon_whose_linear_multiplies_by_w_t_trains_exactly(scheme):
    """transformers' FalconLinear computes ``input @ self.weight.T``: every such product is coded."""
    plain = falcon()
    model = coded(copy.deepcopy(plain), scheme, min_features=32)
    coded_names = {p.layer.weight_name for p in sazd.parallel.coded_parameters(model)}
    assert "transformer.h.0.self_attention.query_key_value.weight" in coded_names
    assert len(coded_names) == 9  # 4 per block and lm_head
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 12), generator=gen) for _ in range(3)]

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return logits.square().mean()

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids).logits

    before = rounds(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gaps = train_side_by_side(Logits(plain), Logits(model), scheme, batches, loss)
    assert max(gaps) <= TOL
    assert rounds(model) - before >= 3 * 9  # at least the forward product of every coded weight per step
    assert_same_state(model, plain)


# ------------------------------------------------------------------ a DEU weight's .grad
def mlp() -> nn.Module:
    torch.manual_seed(6)
    layers = (nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 64))
    return nn.Sequential(*layers).double()


def deu_pair() -> tuple[nn.Module, nn.Module, list[torch.optim.Optimizer]]:
    plain = mlp()
    model = coded(copy.deepcopy(plain), "deu", min_features=32)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) for m in (plain, model)]
    return plain, model, [opts[0], sazd.coded_optimizer(opts[1])]


def test_torchs_own_clip_grad_norm_clips_a_deu_model_as_the_plain_one():
    """DEU keeps a weight's gradient as factors; torch.nn.utils.clip_grad_norm_ reads ``.grad``, which
    forms it, and that step sends the clipped gradient encoded, whole."""
    plain, model, opts = deu_pair()
    for step in range(3):
        x = torch.randn(16, 64, dtype=F64, generator=torch.Generator().manual_seed(step))
        norms = []
        for m, opt in zip((plain, model), opts, strict=True):
            opt.zero_grad()
            m(x).square().mean().backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)))
            opt.step()
        assert norms[0] > 0.05 and abs(norms[1] - norms[0]) <= TOL * norms[0], step  # it did clip
        assert_same_state(model, plain)


def test_a_deu_weights_grad_reads_as_autograds_and_setting_it_none_skips_its_update():
    plain, model, opts = deu_pair()
    x = torch.randn(16, 64, dtype=F64)
    for m, opt in zip((plain, model), opts, strict=True):
        opt.zero_grad()
        m(x).square().mean().backward()
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        assert (q.grad - p.grad).abs().max() <= TOL * p.grad.abs().max()
    for m, opt in zip((plain, model), opts, strict=True):
        m[2].weight.grad = None  # this weight sits the step out, as torch's SGD skips it
        opt.step()
    assert_same_state(model, plain)
    assert torch.equal(model.state_dict()["2.weight"], mlp().state_dict()["2.weight"])


def test_an_optimizer_not_made_by_coded_optimizer_still_cannot_step_a_deu_weight_on_the_master():
    model = coded(mlp(), "deu", min_features=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # its step reads .grad: nothing is formed
    model(torch.randn(4, 64, dtype=F64)).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"left the coded weights of \['0', '2', '4'\] unchanged"):
        opt.step()


# ------------------------------------------------------------------ inference
@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_inference_mode_forward_and_generate_equal_plain_and_training_goes_on_exactly(scheme):
    """``torch.inference_mode()`` (evaluation, ``generate``) makes tensors without version counters;
    the coded rounds take them, and a training step after it stays exact."""
    from sazd.models import zoo

    entry = zoo.get("gpt2-hf")
    plain = entry.build(0, F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tied lm_head stays on the master: said
        model = coded(copy.deepcopy(plain), scheme)
    batch = entry.batch(2, seed=1, dtype=F64)
    with torch.inference_mode():
        want, got = entry.logits(plain, batch), entry.logits(model, batch)
        prompt = batch["input_ids"][:, :4]
        tokens = [m.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
                  for m in (plain, model)]
    assert (got - want).abs().max() <= TOL * want.abs().max()
    assert torch.equal(tokens[0], tokens[1])
    opts = [optimizer(plain, scheme), sazd.coded_optimizer(optimizer(model, scheme))]
    for m, opt in zip((plain, model), opts, strict=True):
        opt.zero_grad()
        entry.loss(m, batch).backward()
        opt.step()
    assert_same_state(model, plain)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_gradient_checkpointing_recomputes_coded_products_and_trains_exactly(scheme, reentrant):
    """``gradient_checkpointing_enable()`` reruns each block's forward inside backward: the rerun's
    products are coded rounds again, and the steps equal plain PyTorch's with checkpointing."""
    from sazd.models import zoo

    entry = zoo.get("gpt2-hf")
    plain = entry.build(0, F64)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tied lm_head stays on the master: said
        model = coded(copy.deepcopy(plain), scheme)
    assert model.is_gradient_checkpointing
    opts = [optimizer(plain, scheme), sazd.coded_optimizer(optimizer(model, scheme))]
    rounds_per_step = []
    for step in range(3):
        batch = entry.batch(2, seed=step + 1, dtype=F64)
        for m, opt in zip((plain, model), opts, strict=True):
            before = rounds(model)
            opt.zero_grad()
            entry.loss(m, batch).backward()
            opt.step()
            if m is model:
                rounds_per_step.append(rounds(model) - before)
    assert_same_state(model, plain)
    assert min(rounds_per_step) >= 3 * len(context(model).layers)  # forward, its rerun, input gradients


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_same_padding_codes_where_integers_say_it_and_is_refused_where_they_cannot(scheme):
    """``padding="same"`` (EfficientNet's convolutions) is half the kernel's dilated span on each side
    when that span is even: coded and trained as plain. An even span pads one side more: left on the
    master, with that reason."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(6, 12, 3, padding="same", dilation=2), nn.Tanh(),
                          nn.Conv2d(12, 12, 1, padding="same"),
                          nn.Tanh(), nn.Conv2d(12, 8, 2, padding="same")).double()
    model = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match="padding='same' with an even kernel span"):
        sazd.parallelize(model, get_code("sazd", n=6, k=4), InProcessCluster(6), scheme=scheme,
                         min_features=4)
    assert sorted(layer.name for layer in coded_layers(model)) == ["0", "2"]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, model)]
    optimizers[1] = sazd.coded_optimizer(optimizers[1])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 6, 7, 7, generator=gen, dtype=torch.float64)
        for m, optimizer in zip((plain, model), optimizers, strict=True):
            optimizer.zero_grad()
            m(x).square().mean().backward()
            optimizer.step()
    pairs = zip(model.parameters(), plain.parameters(), strict=True)
    assert max(float((a - b).abs().max()) for a, b in pairs) < 1e-12
