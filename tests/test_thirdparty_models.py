"""Third-party models (``sazd.models.zoo``: transformers GPT-2, Llama, BERT, ViT, ResNet, a timm-style ViT,
nn.TransformerEncoder, a peft LoRA model) coded with the automatic plan, against plain PyTorch.

The oracle is the same model trained in plain PyTorch in float64. For each model: which weight
matrices are coded, the forward, 3 training steps (naive + AdamW, DEU + SGD momentum, SAZD and cyclic
codes), the state_dict's keys/layout/bytes, save_pretrained -> from_pretrained of the plain class;
then one test per way a user's habit could leave a coded model silently wrong: each such path either works
exactly or is refused with a one-line error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sazd
import sazd.parallel
from sazd.codes import get_code
from sazd.models import zoo
from sazd.parallel import DEFAULT_MIN_FEATURES, context
from sazd.runtime import make_cluster
from sazd.runtime.inproc import InProcessCluster

pytest.importorskip("transformers", reason="the third-party models need transformers (requirements.lock)")
pytest.importorskip("peft", reason="the LoRA model needs peft (requirements.lock)")

N, K = 6, 4
F64 = torch.float64
TOL = 1e-10  # relative, float64
MODELS = list(zoo.ZOO_MODELS)
PRETRAINED = [name for name in MODELS if zoo.get(name).pretrained]


# ------------------------------------------------------------------ helpers
def coded(model: nn.Module, scheme: str = "deu", code: str = "sazd", cluster=None, dead: tuple[int, ...] = ()
          ) -> nn.Module:
    """``model`` parallelized with the automatic plan on an in-process cluster (``dead``: workers
    killed first, so rounds decode from parity blocks)."""
    cluster = InProcessCluster(N) if cluster is None else cluster
    for j in dead:
        cluster.kill(j)
    return sazd.parallelize(model, get_code(code, n=N, k=K), cluster, scheme=scheme)


def pair(name: str, seed: int = 0, dtype: torch.dtype = F64, **kw):
    """(plain model, the same model coded, its zoo entry)."""
    entry = zoo.get(name)
    plain = entry.build(seed, dtype)
    return plain, coded(copy.deepcopy(plain), **kw), entry


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """max |a - b| over max(max |b|, floor)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def assert_state_close(coded_model: nn.Module, plain: nn.Module, tol: float = TOL) -> None:
    """Every tensor of the state_dicts within ``tol`` of the plain one's largest entry (at least 0.01:
    a parameter whose gradient is zero in exact arithmetic, e.g. an attention key bias, moves by
    rounding noise alone, which relative to its own ~0 value means nothing)."""
    ours, ref = coded_model.state_dict(), plain.state_dict()
    assert list(ours) == list(ref)
    errors = {key: rel(ours[key], ref[key], 1e-2) for key in ref if ref[key].is_floating_point()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.2e}"


def train(model: nn.Module, entry: zoo.ZooModel, optimizer: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = entry.loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(trainable(model), lr=0.05, momentum=0.9, weight_decay=1e-4)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.01)


def batches(entry: zoo.ZooModel, steps: int, dtype: torch.dtype = F64) -> list[zoo.Batch]:
    return [entry.batch(2, seed=s, dtype=dtype) for s in range(steps)]


def coded_matrices(model: nn.Module) -> set[str]:
    """Parameter names (the plain model's) of the coded weight matrices."""
    layers = context(model).layers
    return {name if name.rpartition(".")[2].endswith("weight") else f"{name}.weight" for name in layers}


def widths(model: nn.Module, pname: str) -> tuple[int, int]:
    """(output, input x kernel) features of weight matrix ``pname`` (Conv1D stores (in, out))."""
    W = model.get_parameter(pname)
    owner = model.get_submodule(pname.rpartition(".")[0])
    if type(owner).__name__ == "Conv1D":
        return W.shape[1], W.shape[0]
    return W.shape[0], W[0].numel()


def tied(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


def exactly_or_refused(on_coded, on_plain, compare) -> str:
    """Run an action on the coded model: it either raises sazd's one-line error (refused: the message
    speaks of the coded weight, so torch's raw error from inside a worker does not count) or its
    result equals the plain model's (``compare``). Returns which."""
    try:
        ours = on_coded()
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        message = str(err).strip()
        assert message and "\n" not in message, f"refusal is not one line: {message!r}"
        assert "coded" in message.lower() or "sazd" in message.lower(), f"not sazd's refusal: {message!r}"
        return "refused"
    compare(ours, on_plain())
    return "works"


def logits_equal(entry: zoo.ZooModel, batch: zoo.Batch, tol: float = TOL):
    def compare(ours: nn.Module, plain: nn.Module) -> None:
        assert rel(entry.logits(ours, batch), entry.logits(plain, batch)) <= tol

    return compare


# ------------------------------------------------------------------ the zoo itself
def test_zoo_counts_each_weight_matrix_once():
    counts = {name: len(zoo.weight_matrices(zoo.build(name))) for name in MODELS}
    assert counts == {"gpt2-hf": 9, "llama-hf": 15, "bert-hf": 14, "vit-hf": 14, "resnet-hf": 8,
                      "vit-timm": 10, "transformer-encoder": 9,
                      "lora-llama": 23}  # 15 base + 8 adapters; peft's wrappers only forward their base's
    encoder = zoo.weight_matrices(zoo.build("transformer-encoder"))
    assert "encoder.layers.0.self_attn.in_proj_weight" in encoder


def test_zoo_builds_the_same_weights_from_a_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = zoo.build("vit-timm", seed=3), zoo.build("vit-timm", seed=3), zoo.build("vit-timm", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize(("call", "named"), [
    (lambda: zoo.get("gpt-5"), "gpt-5"),
    (lambda: zoo.build("resnet50"), "resnet50"),
    (lambda: zoo.get("vit-timm").batch(0), "batch_size"),
    (lambda: zoo.get("vit-timm").batch(2.5), "batch_size"),
    (lambda: zoo.build("vit-timm", size="huge"), "huge"),
    (lambda: zoo.get("gpt2-hf").batch(2, size="large"), "large"),
])
def test_zoo_refuses_bad_names_and_sizes_by_name(call, named):
    with pytest.raises(ValueError, match=named):
        call()


@pytest.mark.parametrize("name", MODELS)
def test_base_size_has_the_widths_users_bring_and_feeds_itself(name):
    entry = zoo.get(name)
    tiny, base = entry.build(), entry.build(size="base")
    assert len(zoo.weight_matrices(base)) == len(zoo.weight_matrices(tiny))  # the same architecture
    params = dict(base.named_parameters(remove_duplicate=False))  # GPT-2's tied lm_head included
    widest = max(min(params[m].shape[0], params[m][0].numel()) for m in zoo.weight_matrices(base))
    assert widest >= 512  # some weight matrix is at least 512 wide both ways
    batch = entry.batch(1, size="base")
    with torch.no_grad():
        assert entry.logits(base, batch).shape[0] == 1
    assert batch.keys() == entry.batch(1).keys()
    sample = next(iter(batch.values()))
    assert sample.shape[1:] != next(iter(entry.batch(1).values())).shape[1:]  # longer windows, larger images


# ------------------------------------------------------------------ coverage
@pytest.mark.parametrize("name", MODELS)
def test_every_wide_weight_matrix_is_coded(name):
    """Every weight matrix with both widths >= 64 is coded, whatever module holds it (Conv1D,
    in_proj_weight, peft's base layers); every other one is listed on the master with a reason."""
    plain = zoo.build(name, dtype=F64)
    matrices = zoo.weight_matrices(plain)
    shared = tied(plain)
    wide = {m for m in matrices if min(widths(plain, m)) >= DEFAULT_MIN_FEATURES}
    with pytest.warns(UserWarning) if any(m in shared for m in wide) else _no_warning_needed():
        model = coded(copy.deepcopy(plain))
    got = coded_matrices(model)
    assert got <= set(matrices), f"coded names not among the model's matrices: {got - set(matrices)}"
    assert wide - shared <= got, f"wide but not coded: {sorted(wide - shared - got)}"
    assert not got - wide, f"narrow but coded: {sorted(got - wide)}"
    left = context(model).left_on_master
    for m in set(matrices) - got:
        module = m.rpartition(".")[0]
        assert module in left or m in left, f"{m} is neither coded nor listed on the master"
        why = left.get(module, left.get(m))
        assert why, f"{m}: no reason given"
        if m in shared:
            assert "shared" in why or "tied" in why, why


def test_an_explicit_plan_takes_fnmatch_patterns_as_pytorch_tp_plans_do():
    plain = zoo.build("gpt2-hf", dtype=F64)
    model = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=N, k=K), InProcessCluster(N),
                             plan={"transformer.h.*.attn.c_attn": "coded"})
    assert coded_matrices(model) == {f"transformer.h.{i}.attn.c_attn.weight" for i in (0, 1)}
    entry = zoo.get("gpt2-hf")
    batch = entry.batch(2, dtype=F64)
    assert rel(entry.logits(model, batch), entry.logits(plain, batch)) <= TOL
    with pytest.raises(ValueError, match=r"c_atn.*matches no"):  # a typo is named, not silently empty
        sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=N, k=K), InProcessCluster(N),
                         plan={"transformer.h.*.attn.c_atn": "coded"})


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_gpt2s_tied_lm_head_coded_by_the_plan_trains_exactly(scheme):
    """The automatic plan leaves the tied lm_head on the master and says how to code it anyway; doing
    so trains exactly under both schemes (DEU: the embedding lookup's gradient, autograd's ``.grad``,
    and the head's products, kept as factors, go to the workers together as one encoded gradient)."""
    entry = zoo.get("gpt2-hf")
    plain = entry.build(0, F64)
    plan = {"lm_head": sazd.parallel.Coded(), "transformer.h.*.*.c_*": sazd.parallel.Coded()}
    model = sazd.parallelize(copy.deepcopy(plain), get_code("sazd", n=N, k=K), InProcessCluster(N),
                             scheme=scheme, plan=plan)
    assert "lm_head.weight" in coded_matrices(model) and len(coded_matrices(model)) == 9
    data = batches(entry, 3)
    opt = adamw if scheme == "naive" else sgd
    ref = train(plain, entry, opt(plain), data)
    got = train(model, entry, sazd.coded_optimizer(opt(model)), data)
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= TOL
    assert_state_close(model, plain, 1e-9)
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor, as in GPT-2


class _no_warning_needed:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_equals_plain_in_float64(name, scheme):
    plain, model, entry = pair(name, scheme=scheme, dead=(0,))  # worker 0 dead: parity blocks decode
    batch = entry.batch(3, seed=7, dtype=F64)
    assert rel(entry.logits(model, batch), entry.logits(plain, batch)) <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_three_naive_adamw_steps_equal_plain(name):
    plain, model, entry = pair(name, scheme="naive", dead=(1,))
    data = batches(entry, 3)
    ref = train(plain, entry, adamw(plain), data)
    got = train(model, entry, sazd.coded_optimizer(adamw(model)), data)
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= TOL
    assert_state_close(model, plain, 1e-9)  # Adam: 1/sqrt(v) amplifies


@pytest.mark.parametrize("code", ["sazd", "cyclic"])
@pytest.mark.parametrize("name", MODELS)
def test_three_deu_sgd_momentum_steps_equal_plain(name, code):
    plain, model, entry = pair(name, scheme="deu", code=code, dead=(2,))
    data = batches(entry, 3)
    ref = train(plain, entry, sgd(plain), data)
    got = train(model, entry, sazd.coded_optimizer(sgd(model)), data)
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= TOL
    assert ref[0] != ref[-1]  # the steps changed the model
    assert_state_close(model, plain, TOL)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("name", MODELS)
def test_state_dict_is_the_plain_models_byte_for_byte(name, scheme):
    plain, model, _ = pair(name, scheme=scheme)
    ours, ref = model.state_dict(), plain.state_dict()
    assert list(ours) == list(ref)
    for key, value in ref.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        assert ours[key].stride() == value.stride(), f"{key}: layout {ours[key].stride()} vs {value.stride()}"
        assert torch.equal(ours[key], value), key
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]


@pytest.mark.parametrize("name", PRETRAINED)
def test_save_pretrained_loads_in_the_plain_class(name, tmp_path):
    plain, model, entry = pair(name, scheme="deu")
    train(model, entry, sazd.coded_optimizer(sgd(model)), batches(entry, 1))  # weights now differ from init
    model.save_pretrained(tmp_path)
    loaded = type(plain).from_pretrained(tmp_path, dtype=F64).eval()
    model.eval()
    batch = entry.batch(2, seed=11, dtype=F64)
    with torch.no_grad():
        assert rel(entry.logits(loaded, batch), entry.logits(model, batch)) <= TOL
        assert rel(entry.logits(loaded, batch), entry.logits(plain, batch)) > 1e-6  # it did train
        if entry.causal_lm:
            prompt = batch["input_ids"][:, :4]
            ours = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            theirs = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ never silently wrong
def test_peft_merge_adapter_and_merge_and_unload():
    plain, model, entry = pair("lora-llama", scheme="deu")
    batch = entry.batch(2, seed=3, dtype=F64)
    before = entry.logits(plain, batch).detach()

    def merged(m):
        m.merge_adapter()
        return m

    outcome = exactly_or_refused(lambda: merged(model), lambda: merged(plain), logits_equal(entry, batch))
    if outcome == "works":
        assert rel(entry.logits(plain, batch), before) <= TOL  # merged: same function, weights moved
        model.unmerge_adapter()
        plain.unmerge_adapter()
        assert rel(entry.logits(model, batch), before) <= TOL
    plain2, model2, _ = pair("lora-llama", scheme="naive")
    exactly_or_refused(model2.merge_and_unload, plain2.merge_and_unload, logits_equal(entry, batch))


@pytest.mark.parametrize(("name", "layer", "scheme"), [
    ("llama-hf", "model.layers.0.mlp.up_proj", "deu"),
    ("llama-hf", "model.layers.1.self_attn.o_proj", "naive"),
    ("gpt2-hf", "transformer.h.0.mlp.c_fc", "deu"),
])
def test_in_place_write_to_a_coded_weight(name, layer, scheme):
    """``with torch.no_grad(): w.mul_()``, a custom init after parallelize: reaches the workers."""
    plain, model, entry = pair(name, scheme=scheme)
    batch = entry.batch(2, seed=5, dtype=F64)

    def write(m):
        with torch.no_grad():
            weight = m.get_submodule(layer).weight
            weight.mul_(0.5)
            nn.init.normal_(weight[:8], std=0.3, generator=torch.Generator().manual_seed(0))
        return m

    if exactly_or_refused(lambda: write(model), lambda: write(plain), logits_equal(entry, batch)) == "works":
        data = batches(entry, 2)
        opt = sgd if scheme == "deu" else adamw
        train(plain, entry, opt(plain), data)
        train(model, entry, sazd.coded_optimizer(opt(model)), data)
        assert_state_close(model, plain, 1e-9 if opt is adamw else TOL)


def test_a_second_sgd_optimizer_under_deu_starts_without_momentum():
    plain, model, entry = pair("llama-hf", scheme="deu")
    first, second = batches(entry, 2), [entry.batch(2, seed=10 + s, dtype=F64) for s in range(2)]
    train(plain, entry, sgd(plain), first)
    train(model, entry, sazd.coded_optimizer(sgd(model)), first)
    train(plain, entry, sgd(plain), second)  # a new fine-tuning phase: fresh momentum

    def second_phase():
        train(model, entry, sazd.coded_optimizer(sgd(model)), second)
        return model

    exactly_or_refused(second_phase, lambda: plain, lambda ours, ref: assert_state_close(ours, ref, 1e-6))


def test_transformer_encoder_eval_fast_path_is_coded():
    """In eval under no_grad, nn.TransformerEncoderLayer takes a fused path that reads its weights
    directly; the coded model must still run coded rounds (or refuse)."""
    plain, model, entry = pair("transformer-encoder")
    plain.eval()
    model.eval()
    batch = entry.batch(2, seed=4, dtype=F64)
    stats = context(model).stats
    rounds = stats.rounds

    def run(m):
        with torch.no_grad():
            return entry.logits(m, batch)

    def compare(ours, ref):
        assert rel(ours, ref) <= TOL
        assert stats.rounds > rounds, "the forward ran no coded round: the fast path bypassed the code"

    exactly_or_refused(lambda: run(model), lambda: run(plain), compare)


@pytest.mark.parametrize("name", MODELS)
def test_to_float64_after_parallelize(name):
    entry = zoo.get(name)
    plain = entry.build(0, torch.float32)
    model = coded(copy.deepcopy(plain))
    batch = entry.batch(2, seed=6, dtype=F64)

    def to64(m):
        return m.to(F64)

    def compare(ours, ref):
        out = entry.logits(ours, batch)
        assert out.dtype == F64
        assert rel(out, entry.logits(ref, batch)) <= TOL

    exactly_or_refused(lambda: to64(model), lambda: to64(plain), compare)


@pytest.mark.parametrize("name", MODELS)
def test_autocast_bf16_answers_like_plain(name):
    """Under torch.autocast(bf16) a coded product answers in bf16 as plain does; backward works."""
    entry = zoo.get(name)
    plain = entry.build(0, torch.float32)
    model = coded(copy.deepcopy(plain))
    batch = entry.batch(2, seed=8, dtype=torch.float32)

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, loss = entry.logits(m, batch), entry.loss(m, batch)
        loss.backward()
        return out

    def compare(ours, ref):
        assert ours.dtype == ref.dtype
        assert rel(ours, ref) <= 0.05  # bf16 rounding in a different order
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)

    exactly_or_refused(lambda: run(model), lambda: run(plain), compare)


def test_a_plain_models_adamw_state_loads_and_continues():
    """Parameter order is the plain model's, so a plain optimizer.state_dict() loads into the coded
    model's optimizer (naive + AdamW) and the next step equals plain's."""
    entry = zoo.get("gpt2-hf")
    plain = entry.build(0, F64)
    first, nxt = batches(entry, 2)
    plain_opt = adamw(plain)
    train(plain, entry, plain_opt, [first])
    model = coded(copy.deepcopy(plain), scheme="naive")
    opt = sazd.coded_optimizer(adamw(model))
    opt.load_state_dict(copy.deepcopy(plain_opt.state_dict()))
    train(plain, entry, plain_opt, [nxt])
    train(model, entry, opt, [nxt])
    assert_state_close(model, plain, 1e-9)


def test_a_plain_models_sgd_momentum_loads_under_deu_or_is_refused():
    entry = zoo.get("llama-hf")
    plain = entry.build(0, F64)
    first, nxt = batches(entry, 2)
    plain_opt = sgd(plain)
    train(plain, entry, plain_opt, [first])
    model = coded(copy.deepcopy(plain), scheme="deu")
    state = copy.deepcopy(plain_opt.state_dict())

    def load_and_step():
        opt = sazd.coded_optimizer(sgd(model))
        opt.load_state_dict(state)
        train(model, entry, opt, [nxt])
        return model

    def plain_step():
        train(plain, entry, plain_opt, [nxt])
        return plain

    exactly_or_refused(load_and_step, plain_step, lambda ours, ref: assert_state_close(ours, ref, 1e-6))


def test_two_models_with_the_same_layer_names_on_one_cluster():
    """Model B parallelized on model A's cluster (same layer names): both compute with their own
    weights, before and after training (or B is refused and A is untouched)."""
    cluster = InProcessCluster(N)
    entry = zoo.get("llama-hf")
    plain_a, plain_b = entry.build(0, F64), entry.build(1, F64)
    model_a = coded(copy.deepcopy(plain_a), cluster=cluster)
    batch = entry.batch(2, seed=9, dtype=F64)
    second: dict[str, nn.Module] = {}

    def parallelize_b():
        second["b"] = coded(copy.deepcopy(plain_b), cluster=cluster)
        return second["b"]

    exactly_or_refused(parallelize_b, lambda: plain_b, logits_equal(entry, batch))
    assert rel(entry.logits(model_a, batch), entry.logits(plain_a, batch)) <= TOL, "A uses B's blocks"
    data = batches(entry, 2)
    for plain, model in [(plain_a, model_a)] + ([(plain_b, second["b"])] if second else []):
        train(plain, entry, sgd(plain), data)
        train(model, entry, sazd.coded_optimizer(sgd(model)), data)
    assert_state_close(model_a, plain_a, 1e-6)
    if second:
        assert_state_close(second["b"], plain_b, 1e-6)


# ------------------------------------------------------------------ torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-hf"])  # Conv1D: addmm, the tied lm_head beside it
def test_torch_compile_traces_with_few_graph_breaks_and_trains_exactly(name):
    """Dynamo's tracing (backend "eager": inductor's code generation would add minutes, not breaks):
    at most 3 graph breaks per coded weight, the compiled forward and 3 DEU steps equal plain's."""
    plain, model, entry = pair(name, scheme="deu")
    batch = entry.batch(2, seed=2, dtype=F64)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(entry.logits)(model, batch)
    assert explained.graph_break_count <= 3 * len(context(model).layers), explained.break_reasons[:3]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert rel(entry.logits(compiled, batch), entry.logits(plain, batch)) <= TOL
    data = batches(entry, 3)
    ref = train(plain, entry, sgd(plain), data)
    got = train(compiled, entry, sazd.coded_optimizer(sgd(model)), data)
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= TOL
    assert_state_close(model, plain)


# ------------------------------------------------------------------ on Ray
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-hf", "lora-llama"])
def test_on_ray_forward_and_deu_steps_equal_plain(name, ray_session):
    cluster = make_cluster("ray", N, worker_timeout_s=60)
    try:
        plain, model, entry = pair(name, scheme="deu", cluster=cluster)
        batch = entry.batch(2, seed=1, dtype=F64)
        assert rel(entry.logits(model, batch), entry.logits(plain, batch)) <= TOL
        data = batches(entry, 2)
        ref = train(plain, entry, sgd(plain), data)
        got = train(model, entry, sazd.coded_optimizer(sgd(model)), data)
        assert max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True)) <= TOL
        assert_state_close(model, plain, TOL)
    finally:
        cluster.close()


# ------------------------------------------------------------------ sazd bench train --model
def test_bench_train_model_times_the_coded_step_beside_plain(capsys):
    import json

    from sazd.cli import main

    flags = ["--model", "vit-timm", "--iterations", "2", "--warmup", "0", "--batch-size", "2"]
    assert main(["bench", "train", *flags, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["zoo"]
    assert [r["scheme"] for r in rows] == ["naive", "deu"]
    for r in rows:
        assert (r["coded"], r["total"]) == (8, 10)  # patch_embed.proj and head are narrower than 64
        assert r["float64_error"] <= TOL
        assert r["plain_step_s"] > 0 and r["coded_step_s"] > 0
        assert sum(r["phases_s"].values()) == pytest.approx(r["coded_mean_s"], rel=1e-6)
        assert r["phases_s"]["worker_s"] > 0


@pytest.mark.parametrize(("flags", "named"), [
    (["--model", "gpt3"], "gpt3"),
    (["--model", ","], "--model"),
    (["--model", "vit-timm", "--iterations", "0"], "--iterations"),
    (["--model", "vit-timm", "--batch-size", "0"], "--batch-size"),
    (["--model", "vit-timm", "--size", "huge"], "--size"),
    (["--size", "base"], "--size"),
])
def test_bench_train_model_refuses_bad_flags_in_one_line(flags, named, capsys):
    from sazd.cli import main

    assert main(["bench", "train", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err
