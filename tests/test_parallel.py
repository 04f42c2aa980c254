"""Coded layers against the oracle: plain PyTorch training of the same network, same seed and batches."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sazd.codes import get_code
from sazd.parallel import (
    Coded,
    coded_layers,
    context,
    parallelize,
    plain_model,
    plain_state_dict,
    plain_weights,
    predicted_traffic,
    repair,
    resolve_plan,
)
from sazd.parallel.context import pad_rows
from sazd.runtime.cluster import ClusterError
from sazd.runtime.inproc import InProcessCluster
from sazd.train.optim import CodedOptimizer, OptimConfig
from sazd.train.reference import relative_weight_error, train_reference

F64 = torch.float64


def mlp(dtype=F64, seed=0) -> nn.Module:
    """Widths 22-13-10-3: only 3 divides by k=3 and none by k=4, so layers are padded."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(22, 13), relu1=nn.ReLU(), fc2=nn.Linear(13, 10), relu2=nn.ReLU(), fc3=nn.Linear(10, 3),
    )).to(dtype)


def cnn(dtype=F64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 5, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(5, 6, 3, stride=2, dilation=1), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc=nn.Linear(6 * 3 * 3, 3),
    )).to(dtype)


MLP_PLAN = {"fc1": "coded", "fc2": "coded", "fc3": "coded"}
CNN_PLAN = {"conv1": "coded", "conv2": "coded", "fc": "coded"}
SGD = OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, clip_norm=1.0,
                  schedule="cosine", total_steps=25)


def data(shape, steps=25, batch=10, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(steps, batch, *shape, generator=gen, dtype=dtype)
    ys = torch.randint(0, 3, (steps, batch), generator=gen)
    return list(zip(xs, ys, strict=True))


class RecordingCluster(InProcessCluster):
    """Remembers which workers each first_k decoded from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded_sets: list[tuple[int, ...]] = []

    def first_k(self, round_, k, enough=None, patience_s=0.0):
        got = super().first_k(round_, k, enough, patience_s)
        self.decoded_sets.append(tuple(sorted(got)))
        return got


def run_coded(make, plan, code, scheme, batches, cfg=SGD, latency="shiftexp:1.0", dtype=F64):
    """Train a coded copy and a plain copy of ``make()`` on ``batches``; returns both and the cluster."""
    ref, model = make(dtype), make(dtype)
    cluster = RecordingCluster(code.n, latency=latency if code.n > code.k else None, base_time_s=1e-3)
    parallelize(model, code, cluster, plan=plan, scheme=scheme)
    opt = CodedOptimizer(model, cfg)
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    train_reference(ref, batches, cfg)
    return model, ref, cluster


CODES = {
    "sazd": dict(name="sazd", n=6, k=4),
    "sazd-nonsys": dict(name="sazd", n=5, k=3, systematic=False),
    "poly": dict(name="poly", n=6, k=4),
    "uncoded": dict(name="uncoded", n=4, k=4),
}


def make_code(spec):
    spec = dict(spec)
    return get_code(spec.pop("name"), **spec)


@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("code_name", list(CODES))
def test_mlp_matches_plain_pytorch_float64(code_name, scheme):
    code = make_code(CODES[code_name])
    model, ref, cluster = run_coded(mlp, MLP_PLAN, code, scheme, data((22,)))
    assert relative_weight_error(plain_state_dict(model), ref) < 1e-9
    if code.n > code.k:  # the latency model really made different workers answer first
        assert len(set(cluster.decoded_sets)) >= 3
        assert cluster.counters.late_results_discarded > 0


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_clipping_that_binds_matches_plain_pytorch(scheme):
    """Clipping binds (norm 0.02 << the gradient's): DEU scales both coded copies' gradients."""
    cfg = OptimConfig(lr=0.5, momentum=0.9, clip_norm=0.02)
    batches = data((22,), steps=15)
    model, ref, _ = run_coded(mlp, MLP_PLAN, get_code("sazd", n=6, k=4), scheme, batches, cfg=cfg)
    assert relative_weight_error(plain_state_dict(model), ref) < 1e-9
    untrained = mlp()
    F.cross_entropy(untrained(batches[0][0]), batches[0][1]).backward()
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in untrained.parameters()])) > 10 * 0.02


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_cnn_matches_plain_pytorch_float64(scheme):
    code = get_code("sazd", n=5, k=3)
    model, ref, cluster = run_coded(cnn, CNN_PLAN, code, scheme, data((1, 8, 8), steps=20))
    assert relative_weight_error(plain_state_dict(model), ref) < 1e-9
    assert len(set(cluster.decoded_sets)) >= 3


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_float32_training_stays_close(scheme):
    code = get_code("sazd", n=6, k=4)
    batches = data((22,), dtype=torch.float32)
    model, ref, _ = run_coded(mlp, MLP_PLAN, code, scheme, batches, dtype=torch.float32)
    err = relative_weight_error(plain_state_dict(model), ref)
    assert err < 1e-4
    # and the float32 run tracks the exact float64 one about as well as plain float32 training does
    ref64 = mlp(F64)
    train_reference(ref64, [(x.double(), y) for x, y in batches], SGD)
    assert relative_weight_error(plain_state_dict(model), ref64) < 1e-4


def test_adam_in_naive_matches_plain_pytorch():
    cfg = OptimConfig(name="adam", lr=0.01, weight_decay=1e-2, schedule="step", step_size=7, gamma=0.5)
    model, ref, _ = run_coded(mlp, MLP_PLAN, get_code("sazd", n=6, k=4), "naive", data((22,)), cfg=cfg)
    assert relative_weight_error(plain_state_dict(model), ref) < 1e-9


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_default_plan_keeps_narrow_layers_on_master(scheme):
    # 22-13-10-3 with min_features=11: only fc1 (13 x 22) has both widths >= 11
    model = mlp()
    parallelize(model, get_code("sazd", n=6, k=4), InProcessCluster(6), scheme=scheme, min_features=11)
    assert [layer.name for layer in coded_layers(model)] == ["fc1"]
    assert type(model.fc2) is nn.Linear and type(model.fc3) is nn.Linear


def close(got, want, tol=1e-12):
    return got.shape == want.shape and bool((got - want).abs().max() <= tol * want.abs().max())


@pytest.mark.parametrize("code_name", ["sazd-nonsys", "poly"])
def test_deu_keeps_the_code_structure(code_name):
    """The paper's theorem: after T DEU steps every worker's coded weights (and momentum) are the
    encoding of the decoded plain weights."""
    code = make_code(CODES[code_name])
    # Which workers answer first depends on measured master time, so the decoded sets vary by run:
    # SAZD's zigzag stays within 2e-14 relative, Poly's Vandermonde solve reaches 5e-12 at n=6.
    tol = 1e-12 if code_name.startswith("sazd") else 1e-10
    for make, plan, shape in ((mlp, MLP_PLAN, (22,)), (cnn, CNN_PLAN, (1, 8, 8))):
        model, _, cluster = run_coded(make, plan, code, "deu", data(shape, steps=20))
        weights, buffers = plain_weights(model, momentum=True)
        checked = 0
        for layer in coded_layers(model):
            W = weights[f"{layer.name}.weight"]
            M = buffers[f"{layer.name}.weight"]
            (row, col), (mrow, mcol) = layer.encode_plain(W), layer.encode_plain(M)
            # The first layer's input needs no gradient: its column copy is neither used nor kept.
            assert layer.col_stale == (layer is coded_layers(model)[0])
            maintained = 1 if layer.col_stale else 2
            for j in cluster.alive():
                worker = cluster.workers[j]
                for key, want in list(zip(layer.keys, (row[j], col[j]), strict=True))[:maintained]:
                    assert close(worker.weights[key], want, tol), (layer.name, key, j)
                for key, want in list(zip(layer.keys, (mrow[j], mcol[j]), strict=True))[:maintained]:
                    assert close(worker.momentum[key], want, tol), (layer.name, key, j)
                checked += maintained
        assert checked == (2 * len(coded_layers(model)) - 1) * code.n


def test_deu_step_is_one_message_per_worker():
    model, cluster = mlp(), InProcessCluster(6)
    parallelize(model, get_code("sazd", n=6, k=4), cluster, plan=MLP_PLAN, scheme="deu")
    opt = CodedOptimizer(model, OptimConfig(lr=0.1, momentum=0.9))
    xb, yb = data((22,), steps=1)[0]
    F.cross_entropy(model(xb), yb).backward()
    calls = cluster.counters.calls
    opt.step()
    assert cluster.counters.calls - calls == 6  # fc1 row, fc2 and fc3 row + col: 5 updates, 1 call each
    assert [w.updates_applied for w in cluster.workers] == [5] * 6
    with pytest.raises(ValueError, match="not a public Worker method"):
        cluster.workers[0].batch([("_timed", (print,))])


def test_deu_ships_the_encoded_gradient_when_it_is_narrower():
    """Convolutions: N = batch x positions can exceed a copy's fan (in or out), and then DEU sends the
    encoded gradient C_j(dW) (fan columns per coded row) instead of C_j(dY^T) (N columns): its update
    never moves more bytes than naive's. The master computes that gradient between rounds (where its
    workers share its cores, with every core). Exactness of both paths: the CNN oracle tests."""

    class Recording(InProcessCluster):
        products_between_rounds = 0

        def between_rounds(self):
            self.products_between_rounds += 1
            return super().between_rounds()

    code = get_code("sazd", n=5, k=3)
    model, cluster = cnn(), Recording(5, base_time_s=0.0)  # every worker idle at each round
    parallelize(model, code, cluster, plan=CNN_PLAN, scheme="deu")
    opt = CodedOptimizer(model, OptimConfig(lr=0.05, momentum=0.9))
    xb, yb = data((1, 8, 8), steps=1)[0]
    F.cross_entropy(model(xb), yb).backward()
    before = cluster.counters.bytes_to_workers
    opt.step()
    want = naive = gradients = 0
    paths = []
    for layer in coded_layers(model):
        N, fans = layer.last_rows, (layer.in_features, layer.out_features)
        rows = [sum(code.block_rows(layer.out_pad // 3)), sum(code.block_rows(layer.in_pad // 3))]
        if layer.col_stale:  # the first layer keeps no column copy
            rows[1] = 0
        gradients += sum(R > 0 and fan < N for R, fan in zip(rows, fans, strict=True))
        want += sum(R * min(N, fan) for R, fan in zip(rows, fans, strict=True)) * 8
        naive += sum(R * fan for R, fan in zip(rows, fans, strict=True)) * 8
        paths.append(layer.in_features < N)
    assert cluster.counters.bytes_to_workers - before == want <= naive
    assert paths == [True, True, False]  # conv1 (N=640, in=9), conv2 (N=90, in=45); fc (N=10, in=54)
    assert cluster.products_between_rounds == gradients > 0


def test_padding_never_leaks():
    code = get_code("sazd", n=6, k=4)  # systematic: worker k-1 holds the last rows, padding included
    model, ref, cluster = run_coded(mlp, MLP_PLAN, code, "deu", data((22,)))
    for layer in coded_layers(model):
        assert layer.out_pad > layer.out_features and layer.in_pad > layer.in_features
        last = cluster.workers[code.k - 1]
        r_out, r_in = layer.out_pad // code.k, layer.in_pad // code.k
        pad_out, pad_in = layer.out_pad - layer.out_features, layer.in_pad - layer.in_features
        assert r_out >= pad_out and r_in >= pad_in
        assert torch.all(last.weights[layer.keys[0]][r_out - pad_out:] == 0)
        assert torch.all(last.weights[layer.keys[1]][r_in - pad_in:] == 0)
        assert torch.all(last.momentum[layer.keys[0]][r_out - pad_out:] == 0)
    x = torch.randn(7, 22, dtype=F64)
    out = model(x)
    assert out.shape == (7, 3)
    assert torch.allclose(out, ref(x), rtol=1e-9, atol=1e-12)
    assert torch.allclose(plain_model(model)(x), ref(x), rtol=1e-9, atol=1e-12)


def test_pad_rows():
    t = torch.arange(6.0).reshape(3, 2)
    assert pad_rows(t, 3) is t
    assert torch.equal(pad_rows(t, 4), torch.cat([t, torch.zeros(1, 2)]))


def test_deu_clip_norm_equals_torch_without_forming_dW():
    """||dY^T X||_F from the B x B Gram matrices (and from dW for wide batches) == torch's norm."""
    for batch in (4, 40):  # 4*4 <= 13*22: Gram path; 40*40 > 13*22: direct path
        model, ref = mlp(), mlp()
        parallelize(model, get_code("sazd", n=6, k=4), InProcessCluster(6), plan=MLP_PLAN, scheme="deu")
        opt = CodedOptimizer(model, SGD)
        x, y = torch.randn(batch, 22, dtype=F64), torch.randint(0, 3, (batch,))
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        assert torch.allclose(opt.grad_norm(), want, rtol=1e-12)


def test_repair_reloads_respawned_workers_from_one_read_and_training_goes_on_exactly():
    """Two workers (n - k) die together: both come back from one decode of the four others."""
    code = get_code("sazd", n=6, k=4, systematic=False)
    cfg = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3)
    batches = data((22,), steps=20)
    ref, model = mlp(), mlp()
    cluster = RecordingCluster(6, latency="shiftexp:1.0", base_time_s=1e-3)
    parallelize(model, code, cluster, plan=MLP_PLAN, scheme="deu")
    opt = CodedOptimizer(model, cfg)
    for step, (xb, yb) in enumerate(batches):
        if step == 10:
            cluster.kill(2)
            cluster.kill(5)
            cluster.respawn(2, 5)
            assert cluster.workers[2].weights == {} and cluster.workers[5].weights == {}
            with pytest.raises(ClusterError, match=r"cannot repair workers \[0, 2, 5\]"):
                repair(model, 0, 2, 5)  # three of six: the other three cannot decode
            reads = len(cluster.decoded_sets)
            info = repair(model, 2, 5)
            assert info["workers"] == [2, 5] and info["momentum"]
            assert cluster.decoded_sets[reads:] == [(0, 1, 3, 4)]  # one read, never from a replacement
            weights, buffers = plain_weights(model, momentum=True)
            for layer, j in itertools.product(coded_layers(model), (2, 5)):
                row, col = layer.encode_plain(weights[f"{layer.name}.weight"])
                mrow, _ = layer.encode_plain(buffers[f"{layer.name}.weight"])
                assert torch.allclose(cluster.workers[j].weights[layer.keys[0]], row[j], atol=1e-12)
                assert torch.allclose(cluster.workers[j].weights[layer.keys[1]], col[j], atol=1e-12)
                assert torch.allclose(cluster.workers[j].momentum[layer.keys[0]], mrow[j], atol=1e-12)
            used_before = len(cluster.decoded_sets)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    assert any(2 in s for s in cluster.decoded_sets[used_before:])  # the repaired workers answered
    assert any(5 in s for s in cluster.decoded_sets[used_before:])
    train_reference(ref, batches, cfg)
    assert relative_weight_error(plain_state_dict(model), ref) < 1e-9


# ------------------------------------------------------------------ errors
def test_bad_plans_are_refused_before_training():
    model = nn.Sequential(OrderedDict(
        fc=nn.Linear(8, 8), norm=nn.LayerNorm(8), emb=nn.Embedding(4, 8), conv=nn.Conv2d(4, 8, 3, groups=2),
        conv_same=nn.Conv2d(4, 8, 4, padding="same"),  # an even span: torch pads one side more
        conv_reflect=nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
    ))
    with pytest.raises(ValueError, match=r"'fc9', which matches no module"):
        resolve_plan(model, {"fc9": "coded"}, 1)
    with pytest.raises(ValueError, match=r"'conv\?', which matches no module"):
        resolve_plan(model, {"conv?": "coded"}, 1)
    with pytest.raises(ValueError, match=r"LayerNorm, which holds no weight matrix a product reads"):
        resolve_plan(model, {"norm": "coded"}, 1)
    with pytest.raises(ValueError, match="Embedding"):
        resolve_plan(model, {"emb": "coded"}, 1)
    with pytest.raises(ValueError, match="groups=2"):
        resolve_plan(model, {"conv": "coded"}, 1)
    with pytest.raises(ValueError, match="padding='same'"):
        resolve_plan(model, {"conv_same": "coded"}, 1)
    assert list(resolve_plan(model, {"conv_reflect": "coded"}, 1)) == ["conv_reflect"]  # F.pad, then conv2d
    assert list(resolve_plan(model, {"conv_*": "master", "f*": Coded()}, 1)) == ["fc"]  # fnmatch patterns
    with pytest.raises(ValueError, match="a style is Coded"):
        resolve_plan(model, {"fc": "rowwise"}, 1)
    with pytest.raises(ValueError, match="min_features=64"):
        resolve_plan(model, None, 64)
    assert list(resolve_plan(model, {"fc": "coded", "norm": "master"}, 1)) == ["fc"]


def test_parallelize_argument_errors():
    code = get_code("sazd", n=6, k=4)
    with pytest.raises(ValueError, match="scheme must be one of"):
        parallelize(mlp(), code, InProcessCluster(6), plan=MLP_PLAN, scheme="fast")
    with pytest.raises(ValueError, match="n=5 workers but the code needs n=6"):
        parallelize(mlp(), code, InProcessCluster(5), plan=MLP_PLAN)
    model = parallelize(mlp(), code, InProcessCluster(6), plan=MLP_PLAN)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(model, code, InProcessCluster(6), plan=MLP_PLAN)
    dead = InProcessCluster(6)
    for j in range(3):
        dead.kill(j)
    with pytest.raises(ClusterError, match="k=4"):
        parallelize(mlp(), code, dead, plan=MLP_PLAN)


def test_adam_with_deu_is_refused_with_the_reason():
    model = parallelize(mlp(), get_code("sazd", n=6, k=4), InProcessCluster(6), plan=MLP_PLAN, scheme="deu")
    for name in ("adam", "adamw"):
        with pytest.raises(ValueError, match=f"optimizer '{name}' cannot run with scheme 'deu'.*linear"):
            CodedOptimizer(model, OptimConfig(name=name))


def test_half_precision_answers_halve_the_bytes_from_workers_in_the_formula_too():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), relu=nn.ReLU(), fc2=nn.Linear(64, 64)))
    cluster = InProcessCluster(6, compute_dtype="bfloat16", base_time_s=0.01)  # workers 0..3 answer first
    parallelize(model, get_code("sazd", n=6, k=4), cluster, scheme="deu")
    model(torch.randn(8, 64, requires_grad=True)).sum().backward()
    predicted = predicted_traffic(model)["bytes_from_workers"]
    assert predicted == 2 * 2 * 64 * 8 * 2  # two layers, forward and input gradient, bf16 answers
    assert cluster.counters.bytes_from_workers == predicted


def test_predicted_traffic_scales_as_design_says():
    """Naive ships both coded copies, O(n*out*in) per layer; DEU sends encoded factors, O(n*N*(out+in)),
    and workers reuse this step's X^T and dY^T instead of receiving them again."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(256, 256), relu=nn.ReLU(), fc2=nn.Linear(256, 256)))
    code = get_code("sazd", n=6, k=4)
    parallelize(model, code, InProcessCluster(6), scheme="deu")
    model(torch.randn(8, 256, requires_grad=True)).sum().backward()
    naive, deu = predicted_traffic(model, "naive"), predicted_traffic(model, "deu")
    n, s, N, R = 6, 4, 8, sum(code.block_rows(64))  # R: coded rows of one copy over all n workers
    rounds = 2 * (n * 256 * N) * s  # forward X and backward dY to every worker, per layer
    assert naive["bytes_to_workers"] == 2 * (rounds + R * 512 * s)
    assert deu["bytes_to_workers"] == 2 * (rounds + 2 * R * N * s)
    assert naive["bytes_to_workers"] > 3 * deu["bytes_to_workers"]
    assert naive["bytes_from_workers"] == deu["bytes_from_workers"] == 2 * 2 * 256 * N * s


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_a_model_that_is_gone_is_freed_and_its_blocks_leave_the_workers(scheme):
    """Nothing of a trained model outlives it (its activations' graphs included), and the workers
    drop its blocks when the next model is coded on the cluster."""
    import gc
    import weakref

    import sazd

    cluster = InProcessCluster(6)
    first = nn.Sequential(OrderedDict(a=nn.Linear(32, 32), act=nn.ReLU(), b=nn.Linear(32, 32)))
    sazd.parallelize(first, get_code("sazd", 6, 4), cluster, scheme=scheme, min_features=8)
    opt = sazd.coded_optimizer(torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9))
    for _ in range(2):
        opt.zero_grad()
        first(torch.randn(4, 32)).square().mean().backward()
        opt.step()
    gone = weakref.ref(context(first))
    del first, opt
    gc.collect()
    assert gone() is None
    second = nn.Sequential(OrderedDict(c=nn.Linear(32, 32)))
    sazd.parallelize(second, get_code("sazd", 6, 4), cluster, scheme=scheme, min_features=8)
    held = cluster.wait_all(cluster.submit("state", (None,)))
    assert all(set(state["weights"]) == context(second).block_keys for state in held.values())
    assert context(second).block_keys == {"c.row", "c.col"}  # the gone model's prefix is free again
