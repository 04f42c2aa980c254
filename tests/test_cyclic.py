"""The cyclic shift-and-add code: exact decoding of every straggler set (float64 oracle), float32
error bounds with four redundant workers, its geometry and plans, device independence, bad input,
and coded training equal to plain PyTorch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _support import digits_config
from sazd.codes import Cyclic, DecodeError, get_code
from sazd.codes.base import relative_error
from sazd.codes.cyclic import is_prime, searched_rows
from sazd.measure.decode import Problem, measure_worst, pick_sets
from sazd.parallel import plain_state_dict
from sazd.train.optim import OptimConfig
from sazd.train.reference import reference_run, relative_weight_error
from sazd.train.trainer import Trainer

F64, F32 = torch.float64, torch.float32


def products(code: Cyclic, W: torch.Tensor, X: torch.Tensor) -> list[torch.Tensor]:
    return [c @ X for c in code.encode(W)]


# ------------------------------------------------------------------ exactness (float64 oracle)
@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 6),
    m=st.integers(1, 4),
    r=st.integers(1, 23),
    systematic=st.booleans(),
    next_prime=st.booleans(),
    consecutive=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_design_decodes_every_straggler_set_to_the_exact_product(
    k, m, r, systematic, next_prime, consecutive, seed
):
    auto = Cyclic(k + m, k, systematic=systematic)
    q = auto.q if not next_prime else next(p for p in range(auto.q + 1, 4 * auto.q) if is_prime(p))
    code = Cyclic(k + m, k, q=q, systematic=systematic, rows="consecutive" if consecutive else "auto")
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(k * r, 5, generator=gen, dtype=F64)
    X = torch.randn(5, 3, generator=gen, dtype=F64)
    exact = W @ X
    P = products(code, W, X)
    assert [p.shape[0] for p in P] == code.block_rows(r)
    for received in itertools.combinations(range(code.n), k):
        decoded = code.decode({j: P[j] for j in received})  # rows inferred from the results alone
        assert decoded.dtype == F64
        assert relative_error(decoded, exact) < 1e-12 * max(1.0, code.condition(received))
    extra = {j: P[j] for j in range(code.n)}  # more than k results: the best-conditioned k are used
    assert relative_error(code.decode(extra, rows=k * r), exact) < 1e-12


def test_systematic_decode_is_a_copy_and_multidim_blocks_keep_their_shape():
    code = Cyclic(7, 4)
    W = torch.randn(4 * 10, 3, 2, dtype=F32)
    coded = code.encode(W)
    assert all(torch.equal(coded[i], W[10 * i : 10 * (i + 1)]) for i in range(4))
    assert torch.equal(code.decode({j: coded[j] for j in range(4)}), W)
    decoded = code.decode({j: coded[j] for j in (0, 4, 5, 6)})
    assert decoded.shape == W.shape and decoded.dtype == F32
    assert relative_error(decoded, W) < 1e-6


def test_geometry_storage_and_rows_from_lengths():
    code = Cyclic(12, 8)  # q = 11: 10 sub-blocks per block, parities hold 11 (plus padding rows)
    assert code.q == 11 and code.is_systematic and code.parity_rows[:2] == (0, 1)
    assert code.block_rows(100) == [100] * 8 + [110] * 4
    assert code.overhead_rows(800) == 4 * 10
    assert code.block_rows(97) == [97] * 8 + [110 + 3] * 4  # 3 padding rows, stored as zero rows
    assert all(code._source_rows(j, rows) == 97 for j, rows in enumerate(code.block_rows(97)))
    assert Cyclic(12, 8, systematic=False).q == 13  # nodes p*i for p < n must be distinct
    # encoding adds shifted sub-blocks only: a block of ones gives integer sums
    coded = code.encode(torch.ones(800, 1))
    assert all(torch.equal(c, c.round()) for c in coded)


def test_searched_parity_rows_amplify_less_than_consecutive_rows():
    searched, consecutive = Cyclic(16, 12), Cyclic(16, 12, rows="consecutive")
    assert searched.parity_rows == searched_rows(12, 4, 13) != consecutive.parity_rows
    sets = pick_sets(searched, 64, 0)[0]
    worst = {code: max(code.condition(s) for s in sets) for code in (searched, consecutive)}
    assert worst[searched] < 0.5 * worst[consecutive]
    assert all(code.condition(range(12)) == 1.0 for code in (searched, consecutive))


@pytest.mark.parametrize("k", [8, 12])
def test_float32_worst_error_with_four_redundant_workers_is_below_1e5(k):
    code = get_code("cyclic", n=k + 4, k=k)
    sets = pick_sets(code, samples=40, seed=1)[0]
    for r in (30, 256):
        worst = measure_worst(code, Problem.random(k * r, 8, seed=r), sets, F32)
        assert worst.status == "ok" and worst.worst_error < 1e-5, (r, worst)
    # the same sets with the consecutive parity rows are worse but decode (no singular set)
    plain = measure_worst(Cyclic(k + 4, k, rows="consecutive"), Problem.random(k * 30, 8), sets, F32)
    assert plain.worst_error < 1e-4


def test_device_and_dtype_follow_the_inputs():
    code = Cyclic(9, 5)
    W = torch.randn(5 * 23, 3, dtype=F64)
    received = (1, 2, 5, 7, 8)
    code.decode({j: c for j, c in enumerate(code.encode(W)) if j in received})  # certified once here
    with torch.device("meta"):  # a tensor made without the inputs' device would land on meta and fail
        coded = code.encode(W)
        decoded = code.decode({j: coded[j] for j in received})
    assert decoded.device == W.device and relative_error(decoded, W) < 1e-13
    half = code.decode({j: c.to(torch.bfloat16) for j, c in enumerate(coded) if j in (0, 5, 6, 7, 8)})
    assert half.dtype == torch.bfloat16 and relative_error(half, W) < 2e-2


def test_refuses_bad_designs_and_results():
    with pytest.raises(ValueError, match="prime"):
        Cyclic(10, 8, q=12)
    with pytest.raises(ValueError, match="q must be a prime >= 8"):
        Cyclic(10, 8, q=7)
    with pytest.raises(ValueError, match="q must be a prime >= 10"):
        Cyclic(10, 8, q=7, systematic=False)
    with pytest.raises(TypeError, match="q must be"):
        Cyclic(10, 8, q=11.0)
    with pytest.raises(ValueError, match="rows must be one of"):
        Cyclic(10, 8, rows="sidon")
    with pytest.raises(ValueError, match="n > k"):
        Cyclic(8, 8)
    with pytest.raises(ValueError, match="unknown option"):
        get_code("cyclic", n=10, k=8, shift_unit=2)
    code = Cyclic(6, 4)
    coded = code.encode(torch.randn(4 * 10, 2))
    assert code.block_rows(10) == [10] * 4 + [5 * 3 + 2] * 2  # q = 5: s = 3 rows, 2 padding rows
    longer = torch.cat([coded[4], coded[4][:2]])  # 19 = 3 * 5 + 4 rows: 4 padding rows are impossible
    with pytest.raises(ValueError, match="which no coded block"):
        code.decode({4: longer, 5: coded[5], 0: coded[0], 1: coded[1]})
    with pytest.raises(DecodeError, match="at least k=4"):
        code.decode({0: coded[0], 4: coded[4]})


def test_non_finite_result_is_an_erasure():
    code = Cyclic(7, 4)
    W = torch.randn(4 * 9, 2, dtype=F64)
    coded = code.encode(W)
    for j, others in ((0, (1, 2, 3)), (4, (0, 1, 2))):  # a copied block, then the parity used first
        bad = coded[j].clone()
        bad[3, 0] = math.nan
        results = {j: bad, **{i: coded[i] for i in others}, 5: coded[5]}
        with pytest.warns(UserWarning, match=rf"workers \[{j}\]"):
            decoded = code.decode(results, rows=4 * 9)
        assert relative_error(decoded, W) < 1e-12


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_training_with_the_cyclic_code_matches_plain_pytorch(scheme, digits):
    optim = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    cfg = digits_config(code="cyclic", n=7, k=4, scheme=scheme, stragglers=3, latency="shiftexp:1.0",
                        max_steps=12, epochs=1, optim=optim)
    with Trainer(cfg, data=digits) as tr:
        tr.train()
        err = relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 12))
    assert err < 1e-9
