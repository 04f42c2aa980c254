"""The nn.Module contract of a parallelized model, in both schemes: ``layer.weight`` reads the plain
weight, ``state_dict`` / ``load_state_dict`` speak the plain model, frozen weights stay put and cost
no update traffic, tied weights and unsupported layers stay on the master (said, never split), and
torch optimizers and LR schedulers step the coded weights. Oracle: plain PyTorch in float64."""

from __future__ import annotations

import copy
import runpy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.parallel import coded_layers, context, parallelize, plain_model
from sazd.runtime import FixedStragglers
from sazd.runtime.inproc import InProcessCluster
from sazd.train.reference import relative_weight_error

SCHEMES = ("naive", "deu")
ROOT = Path(__file__).resolve().parents[1]


class Tied(nn.Module):
    """A tied pair (one Parameter in two modules), a frozen layer and a module used twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 16)  # called twice
        self.frozen = nn.Linear(16, 16)
        self.frozen.weight.requires_grad_(False)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight  # tied
        self.head = nn.Linear(16, 4)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.frozen(h))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        return self.head(h)


def batches(steps: int = 5, batch: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 12, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (batch,), generator=gen)) for _ in range(steps)]


def coded_pair(scheme: str, model: nn.Module | None = None, n: int = 5, k: int = 3):
    plain = model if model is not None else Tied()
    coded = copy.deepcopy(plain)
    # constant task time: every worker is idle at each round, so traffic is deterministic
    parallelize(coded, get_code("sazd", n=n, k=k), InProcessCluster(n, base_time_s=0.0), scheme=scheme,
                min_features=8)
    return plain, coded


def train(model: nn.Module, opt: torch.optim.Optimizer, data, scheduler=None) -> None:
    for xb, yb in data:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize(("scheme", "make_opt"), [
    ("naive", lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)),
    ("deu", lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)),
])
def test_float64_matches_plain_pytorch_with_tied_frozen_and_reused_modules(scheme, make_opt):
    plain, coded = coded_pair(scheme)
    assert sorted(layer.name for layer in coded_layers(coded)) == ["a", "fc1", "frozen", "mid"]  # a is b
    assert list(context(coded).left_on_master) == ["head"]
    frozen_before = plain.frozen.weight.detach().clone()
    train(plain, make_opt(plain.parameters()), batches())
    train(coded, sazd.coded_optimizer(make_opt(coded.parameters())), batches())
    assert relative_weight_error(coded, plain) < 1e-9
    assert torch.equal(coded.frozen.weight, frozen_before)  # frozen: never updated
    assert coded.b.weight is coded.a.weight  # the tie survives


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_is_readable_and_not_assignable(scheme):
    plain, coded = coded_pair(scheme)
    assert torch.equal(coded.fc1.weight, plain.fc1.weight)
    with pytest.raises(AttributeError, match="load_state_dict"):
        coded.fc1.weight = nn.Parameter(torch.zeros(16, 12, dtype=torch.float64))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_has_the_plain_keys_and_round_trips(scheme):
    plain, coded = coded_pair(scheme)
    want, got = plain.state_dict(), coded.state_dict()
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape and torch.equal(got[k], want[k]) for k in want)
    other = Tied()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    coded.load_state_dict(other.state_dict())  # encodes and ships
    assert relative_weight_error(coded.state_dict(), other.state_dict()) == 0
    x = batches(1)[0][0]
    assert torch.allclose(coded(x), other(x), rtol=1e-12, atol=1e-12)  # the workers hold the new weights
    with pytest.raises(RuntimeError, match="size mismatch"):
        coded.load_state_dict({**other.state_dict(), "fc1.weight": torch.zeros(3, 3)})


def test_deu_state_dict_is_one_round_of_the_workers():
    _, coded = coded_pair("deu")
    cluster = context(coded).cluster
    rounds = cluster.counters.rounds
    coded.state_dict()  # the master's copy is current until the workers update the weights
    assert cluster.counters.rounds == rounds
    train(coded, sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1)), batches(1))
    rounds = cluster.counters.rounds
    coded.state_dict()
    assert cluster.counters.rounds == rounds + 1
    coded.state_dict()  # cached until the next update
    assert cluster.counters.rounds == rounds + 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_frozen_weight_costs_no_update_traffic(scheme):
    data = batches(2)
    costs = {}
    for frozen in (False, True):
        model = Tied()
        model.frozen.weight.requires_grad_(not frozen)
        _, coded = coded_pair(scheme, model)
        opt = sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1))
        train(coded, opt, data[:1])
        cluster = context(coded).cluster
        before = cluster.counters.bytes_to_workers
        train(coded, opt, data[1:])
        costs[frozen] = cluster.counters.bytes_to_workers - before
    layer = context(coded).layers["frozen"]
    code = context(coded).code
    rows = sum(code.block_rows(layer.out_pad // code.k)) + sum(code.block_rows(layer.in_pad // code.k))
    columns = 16 if scheme == "naive" else min(16, 10)
    assert costs[False] - costs[True] == rows * columns * 8  # exactly the frozen layer's update


class TiedEmbedding(nn.Module):
    """A language-model head tied to its embedding (as GPT-2's lm_head is to wte)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(16, 12)
        self.body = nn.Linear(12, 12)
        self.head = nn.Linear(12, 16, bias=False)
        self.head.weight = self.wte.weight
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.wte(ids))))


def test_auto_plan_leaves_a_weight_tied_to_an_embedding_on_the_master_and_says_how_to_code_it():
    tied = r"head: its weight is tied to \['wte.weight'\].*plan=\{'head': Coded"
    with pytest.warns(UserWarning, match=tied):
        coded = parallelize(TiedEmbedding(), get_code("sazd", n=5, k=3), InProcessCluster(5), min_features=8)
    assert [layer.name for layer in coded_layers(coded)] == ["body"]


class Mixed(nn.Module):
    """Attention on (batch, time, channels), a subclass of Linear, one that overrides forward (its
    weight is still read by F.linear, so it codes) and a grouped convolution."""

    class Sub(nn.Linear):
        pass

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = self.Sub(16, 16)
        self.scaled = self.Scaled(16, 16)
        self.gconv = nn.Conv2d(4, 16, 3, groups=2)
        self.conv = nn.Conv2d(4, 16, 3)
        self.double()

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(tokens, tokens, tokens)
        h = self.scaled(torch.tanh(self.proj(h)))  # 3-D activations through a coded Linear
        c = self.gconv(image) + self.conv(image)
        return h.mean() + c.mean()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_auto_plan_leaves_what_it_cannot_code_on_the_master_and_says_why(scheme):
    plain = Mixed()
    coded = copy.deepcopy(plain)
    with pytest.warns(UserWarning) as caught:
        parallelize(coded, get_code("sazd", n=5, k=3), InProcessCluster(5), scheme=scheme, min_features=8)
    message = str(caught[0].message)
    assert message == "left on the master: gconv: it is a grouped Conv2d (groups=2); only groups=1 codes"
    names = sorted(layer.name for layer in coded_layers(coded))
    assert names == ["attn.in_proj_weight", "attn.out_proj", "conv", "proj", "scaled"]
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    out, ref = coded(tokens, image), plain(tokens, image)
    assert torch.allclose(out, ref, rtol=1e-12)
    (grad,) = torch.autograd.grad(out, tokens)
    (want,) = torch.autograd.grad(ref, tokens)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="'gconv' cannot be coded: it is a grouped Conv2d"):
        parallelize(Mixed(), get_code("sazd", n=5, k=3), InProcessCluster(5), plan={"gconv": "coded"})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_replacing_a_coded_module_is_said_and_trains_as_plain(scheme):
    """``model.layer = nn.Linear(...)`` after ``parallelize``: the replacement computes on the master
    (exactly as the plain model's), which is said once and listed in ``left_on_master``; wrapping the
    coded module in a new one that holds it (as peft's LoRA wrapper does) keeps it coded, quietly."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    plain = plain.double()
    coded = parallelize(copy.deepcopy(plain), get_code("sazd", n=5, k=3), InProcessCluster(5),
                        scheme=scheme, min_features=4)
    head = nn.Linear(16, 4).double()
    plain[4] = copy.deepcopy(head)
    said = (r"^4 was replaced after sazd.parallelize \(by Linear\): the module that held the coded weight "
            r"4.weight left the model.*sazd.parallel.plain_model\(model\)")
    with pytest.warns(UserWarning, match=said):
        coded[4] = copy.deepcopy(head)
    assert "4" in context(coded).left_on_master
    wrapper = nn.Sequential(coded[2])  # holds the coded module: it stays coded
    plain[2] = nn.Sequential(plain[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coded[2] = wrapper
    assert isinstance(coded[2][0].weight, sazd.parallel.CodedParameter)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, coded)]
    optimizers[1] = sazd.coded_optimizer(optimizers[1])
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 12, generator=gen, dtype=torch.float64), torch.randn(8, 4, generator=gen)
        for model, optimizer in zip((plain, coded), optimizers, strict=True):
            optimizer.zero_grad()
            F.mse_loss(model(x), y.double()).backward()
            optimizer.step()
    pairs = zip(coded.parameters(), plain.parameters(), strict=True)
    assert max(float((a - b).abs().max()) for a, b in pairs) < 1e-12


def test_deu_refuses_an_optimizer_that_cannot_keep_the_code():
    _, coded = coded_pair("deu")
    with pytest.raises(TypeError, match=r"Adam cannot step the DEU-coded weight of 'fc1'.*torch.optim.SGD"):
        sazd.coded_optimizer(torch.optim.Adam(coded.parameters()))
    opt = torch.optim.SGD(coded.parameters(), lr=0.1)  # not passed through coded_optimizer
    xb, yb = batches(1)[0]
    F.cross_entropy(coded(xb), yb).backward()
    with pytest.raises(RuntimeError, match=r"left the coded weights of \['a', 'fc1', 'mid'\] unchanged"):
        opt.step()


def test_deu_follows_per_group_settings_and_an_lr_scheduler():
    plain, coded = coded_pair("deu")

    def make(model):
        opt = torch.optim.SGD([
            {"params": list(model.fc1.parameters()), "lr": 0.2, "momentum": 0.5, "dampening": 0.1},
            {"params": list(model.mid.parameters()), "nesterov": True, "momentum": 0.9},
            {"params": [p for name, p in model.named_parameters() if not name.startswith(("fc1", "mid"))]},
        ], lr=0.05, weight_decay=1e-3)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    opt, scheduler = make(plain)
    train(plain, opt, batches(), scheduler)
    opt, scheduler = make(coded)
    train(coded, sazd.coded_optimizer(opt), batches(), scheduler)
    assert relative_weight_error(coded, plain) < 1e-9


def test_plain_model_is_a_plain_copy():
    plain, coded = coded_pair("deu")
    copy_ = plain_model(coded)
    assert not coded_layers(copy_) and coded_layers(coded)
    x = batches(1)[0][0]
    assert torch.allclose(copy_(x), plain(x), rtol=1e-12)


def test_custom_loop_example_runs_and_repairs_a_killed_worker(capsys):
    result = runpy.run_path(str(ROOT / "examples" / "custom_loop.py"), run_name="__test__")["main"](steps=12)
    assert result["repairs"] == [3]
    assert result["final_loss"] < result["first_loss"]
    assert result["max_weight_error"] < 1e-9


@pytest.mark.parametrize("scheme", SCHEMES)
def test_clip_grad_norm_in_your_own_loop_matches_torch(scheme):
    plain, coded = coded_pair(scheme)
    for model, clip in ((plain, torch.nn.utils.clip_grad_norm_), (coded, sazd.parallel.clip_grad_norm_)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = opt if model is plain else sazd.coded_optimizer(opt)
        for xb, yb in batches(3):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            norm = clip(model.parameters() if model is plain else model, 0.05)
            assert norm > 0.05  # the clip binds
            opt.step()
    assert relative_weight_error(coded, plain) < 1e-9


def test_deu_update_is_exact_after_a_forward_between_backward_and_step():
    """Workers reuse a round's inputs only while it is the block's latest round: an evaluation forward
    before the step makes the update send them again."""
    plain, coded = coded_pair("deu")
    data, probe = batches(3), batches(1, batch=7)[0][0]
    for model, opt in ((plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)),
                       (coded, sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1,
                                                                    momentum=0.9)))):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            with torch.no_grad():
                model(probe)
            opt.step()
    assert relative_weight_error(coded, plain) < 1e-9


def test_deu_optimizer_without_the_coded_weights_is_an_error_at_its_first_step():
    _, coded = coded_pair("deu")
    opt = torch.optim.SGD([p for name, p in coded.named_parameters() if "coded_weight" not in name], lr=0.1)
    xb, yb = batches(1)[0]
    F.cross_entropy(coded(xb), yb).backward()
    with pytest.raises(RuntimeError, match=r"left the coded weights of \['a', 'fc1', 'mid'\] unchanged"):
        opt.step()


def test_maintainer_checkpoint_resumes_your_own_loop_exactly(tmp_path):
    """save() after 3 steps, load() into a fresh model, cluster and optimizer, 2 more steps: the same
    weights as 5 uninterrupted steps (DEU momentum on the workers, SGD momentum of the master's)."""
    data = batches(5)

    def fresh():
        _, coded = coded_pair("deu")
        opt = sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1, momentum=0.9))
        return coded, opt, sazd.Maintainer(coded)

    straight, opt, _ = fresh()
    train(straight, opt, data)
    first, opt, keeper = fresh()
    train(first, opt, data[:3])
    keeper.save(tmp_path / "ckpt.pt", opt)
    second, opt, keeper = fresh()
    keeper.load(tmp_path / "ckpt.pt", opt)
    assert relative_weight_error(second, first) == 0
    train(second, opt, data[3:])
    assert relative_weight_error(second, straight) < 1e-12
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a checkpoint sazd\.Maintainer\.save wrote"):
        keeper.load(tmp_path / "bad.pt", opt)


def test_maintainer_names_the_stragglers():
    model = Tied()
    coded = copy.deepcopy(model)
    cluster = InProcessCluster(5, latency=FixedStragglers([0], factor=50), base_time_s=0.01)
    parallelize(coded, get_code("sazd", n=5, k=3), cluster, min_features=8)
    keeper = sazd.Maintainer(coded)
    train(coded, sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1)), batches(1))
    assert keeper.stragglers() == [0] and keeper.spare == 2
    assert keeper.step() == [] and keeper.steps == 1


def test_deu_state_with_blocks_is_one_round_answered_by_the_first_k_workers():
    """A checkpoint's state needs k answers: a frozen worker cannot hold it up."""
    _, coded = coded_pair("deu")
    train(coded, sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1, momentum=0.9)), batches(1))
    keeper, cluster = sazd.Maintainer(coded), context(coded).cluster
    rounds = cluster.counters.rounds
    state = keeper.state(blocks=True)
    assert cluster.counters.rounds == rounds + 1
    assert sorted({key.split("/")[0] for key in state.blocks}) == ["0", "1", "2"]  # k = 3 of n = 5
    assert torch.equal(state.blocks["2/mid.row"], cluster.workers[2].weights["mid.row"])
    assert relative_weight_error(state.model, keeper.state().model) == 0


def test_decode_device_is_checked_and_decoding_there_returns_to_the_activations_device(digits):
    """The master decodes where it is told (its GPU when it has one) and hands the product back on
    the activations' device; a device this machine lacks is refused before any round."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    model = copy.deepcopy(plain)
    cluster = InProcessCluster(6)
    code = get_code("sazd", 6, 4)
    sazd.parallelize(model, code, cluster, plan={"0": "coded", "2": "coded"}, decode_device="cpu")
    x = digits.train_x[:16].reshape(16, -1)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    absent = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match="decode_device"):
        sazd.parallelize(copy.deepcopy(plain), code, InProcessCluster(6), decode_device=f"cuda:{absent}")
    with pytest.raises(ValueError, match="decode_device"):
        sazd.parallelize(copy.deepcopy(plain), code, InProcessCluster(6), decode_device="tpu")
    with pytest.raises(TypeError, match="decode_device"):
        sazd.parallelize(copy.deepcopy(plain), code, InProcessCluster(6), decode_device=3)
