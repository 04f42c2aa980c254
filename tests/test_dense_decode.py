"""SAZD's dense decode plans: the same decode as zigzag, certified for both paths, built once per set."""

from __future__ import annotations

import itertools

import pytest
import torch

import sazd.codes.sazd as sazd_code
from sazd.codes import SAZD
from sazd.codes.base import relative_error

F64 = torch.float64


def products(code: SAZD, rows: int, cols: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, 32, generator=gen, dtype=F64)
    X = torch.randn(32, cols, generator=gen, dtype=F64)
    return [c @ X for c in code.encode(W)], W @ X


@pytest.mark.parametrize("r", [4, 16])
def test_dense_and_zigzag_decode_every_set_to_the_exact_product(r):
    code = SAZD(6, 4)
    got, exact = products(code, 4 * r, 8)
    for subset in itertools.combinations(range(6), 4):
        results = {j: got[j] for j in subset}
        plan = code._dense_plan(results, r, got[0].new_empty(4, r, 8))
        missing = sum(1 for i in range(4) if i not in subset)
        assert (plan is None) == (missing == 0)  # a copy needs no plan
        if plan is not None:
            assert torch.equal(plan.matrix, plan.matrix.round())  # integer entries: exact in float32
        ways = code._decode_ways(results, r, got[0].new_empty(4, r, 8))
        assert len(ways) == (2 if missing else 1)  # zigzag and the plan, each certified
        for decoded in ways:
            assert relative_error(decoded.reshape(4 * r, 8), exact) < 1e-13
        assert relative_error(code.decode(results), exact) < 1e-13


def test_a_plan_is_used_only_while_its_product_is_small():
    code = SAZD(6, 4)
    r = 16
    got, _ = products(code, 4 * r, 8)
    plan = code._dense_plan({j: got[j] for j in (2, 3, 4, 5)}, r, got[0].new_empty(4, r, 8))
    assert plan.work_limit == sazd_code.DENSE_WORK
    assert plan.matrix.numel() * 8 <= plan.work_limit  # these 8 columns: the plan decodes
    one = code._dense_plan({j: got[j] for j in (0, 1, 2, 4)}, r, got[0].new_empty(4, r, 8))
    assert one.work_limit == sazd_code.DENSE_WORK_ONE < sazd_code.DENSE_WORK  # one missing: cheap anyway
    big = 4096  # rows per block whose plan would exceed DENSE_ENTRIES
    assert 2 * big * 4 * big > sazd_code.DENSE_ENTRIES
    wide = {j: torch.zeros(rows, 1, dtype=F64) for j, rows in enumerate(code.block_rows(big)) if j >= 2}
    assert code._dense_plan(wide, big, torch.empty(4, big, 1, dtype=F64)) is None


def test_the_certificate_measures_both_paths_once_per_set():
    code = SAZD(6, 4)
    got, _ = products(code, 64, 8)
    subset = (2, 3, 4, 5)
    results = {j: got[j].float() for j in subset}
    out = torch.empty(4, 16, 8)
    decoded = code._decode_ways(results, 16, out)
    assert len(decoded) == 2  # zigzag and the dense plan
    assert relative_error(decoded[0], decoded[1]) < 1e-6
    first = code.decode_report(results)
    again = code.decode_report(results)
    assert first.certificate is again.certificate  # measured once for the set
    assert first.status == "certified" and first.error_bound < 1e-3
    systematic = {j: got[j].float() for j in range(4)}
    assert len(code._decode_ways(systematic, 16, out)) == 1  # a copy is one way


def test_nan_in_a_result_is_still_an_erasure_with_the_dense_plan():
    code = SAZD(6, 4)
    got, exact = products(code, 64, 8)
    results = {j: got[j].clone() for j in (0, 2, 3, 4, 5)}
    results[0][3, 1] = float("nan")
    with pytest.warns(UserWarning, match=r"workers \[0\]"):
        decoded = code.decode(results)
    assert relative_error(decoded, exact) < 1e-13
