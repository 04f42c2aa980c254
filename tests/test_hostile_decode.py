"""Hostile input a user can hit: each case ends in a correct result, a warning, or a clear refusal
(TypeError for a wrong type, ValueError for a wrong value, DecodeError for an undecodable set)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from sazd.codes import (
    SAZD,
    DecodeError,
    GaussianMDS,
    Poly,
    Replication,
    Uncoded,
    UnstableDecodeWarning,
    code_options,
    get_code,
    straggler_sets,
)
from sazd.codes.base import NonFiniteResultWarning, relative_error

F64, F32 = torch.float64, torch.float32


def products(code, r: int = 16, cols: int = 6, dtype=F64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(code.k * r, 24, generator=gen, dtype=F64)
    X = torch.randn(24, cols, generator=gen, dtype=F64)
    return W @ X, [c @ X.to(dtype) for c in code.encode(W.to(dtype))]


# ------------------------------------------------------------------- unstable decodes are never silent
def test_non_systematic_sazd_on_long_blocks_is_refused_not_returned_as_noise():
    code = SAZD(10, 8, systematic=False)
    _, got = products(code, r=1024, dtype=F32)
    with pytest.raises(DecodeError, match=r"refusing to decode.*\[0, 1, 2, 3, 4, 5, 6, 7\].*shift_unit"):
        code.decode({j: got[j] for j in range(8)})
    assert code.certify(range(8), 8 * 1024, F32).refused


def test_systematic_sazd_with_four_parity_workers_warns_or_refuses_its_hard_sets():
    code = SAZD(12, 8)  # default shift unit
    exact, got = products(code, r=1024, dtype=F32)
    received = (0, 2, 4, 6, 8, 9, 10, 11)  # blocks 1, 3, 5, 7 missing: solved by peeling
    cert = code.certify(received, 8 * 1024, F32)
    assert cert.status != "certified"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            err = relative_error(code.decode({j: got[j] for j in received}), exact)
        except DecodeError:
            err = math.inf
    if math.isfinite(err):
        assert any(issubclass(w.category, UnstableDecodeWarning) for w in caught) and err < 1
    # the easy sets of the same code stay silent and accurate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert relative_error(code.decode({j: got[j] for j in (0, 1, 2, 3, 4, 5, 6, 8)}), exact) < 1e-5


def test_integer_node_poly_is_refused_in_float32_and_certified_in_float64_at_k_8():
    code = Poly(10, 8)
    _, got = products(code, dtype=F32)
    with pytest.raises(DecodeError, match=r"chebyshev"):
        code.decode({j: got[j] for j in range(2, 10)})
    exact, got = products(code, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecodeWarning)
        decoded = code.decode({j: got[j] for j in range(2, 10)})  # float64: certified
    assert relative_error(decoded, exact) <= code.certify(range(2, 10), 8 * 16, F64).error < 1e-3


# ------------------------------------------------------------------- result dtypes and layouts
@pytest.mark.parametrize("name", ["sazd", "poly", "gaussian", "replication"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_results_are_refused_naming_the_worker_and_dtype(name, dtype):
    code = get_code(name, 6, 4)
    _, got = products(code)
    bad = {j: got[j] for j in (0, 1, 2, 5)}
    bad[5] = bad[5].to(dtype)
    with pytest.raises(TypeError, match=rf"worker 5 has dtype {dtype}.*floating-point"):
        code.decode(bad)


@pytest.mark.parametrize("name", ["sazd", "poly", "gaussian", "replication"])
def test_transposed_and_strided_results_decode_correctly(name):
    code = get_code(name, 7, 4)
    exact, got = products(code, cols=6)
    received = (1, 3, 4, 6) if name != "replication" else (4, 1, 6, 3)
    column_major = {j: got[j].T.contiguous().T for j in received}  # a transposed view
    strided = {j: got[j].repeat_interleave(2, dim=1)[:, ::2] for j in received}  # every other column
    for results in (column_major, strided):
        assert not any(t.is_contiguous() for t in results.values())
        assert relative_error(code.decode(results), exact) < 1e-10


def test_integer_results_decode_exactly_once_a_code_turns_on_the_switch():
    class ExactReplication(Replication):
        accepts_integer_results = True

    code = ExactReplication(6, 3)
    W = torch.arange(3 * 4 * 5).reshape(12, 5)
    coded = code.encode(W.double())
    got = {j: coded[j].long() for j in (3, 1, 5)}
    assert torch.equal(code.decode(got), W)
    assert code.certify((3, 1, 5), 12, torch.int64).error == 0
    with pytest.raises(TypeError, match=r"complex"):
        code.decode({j: t.to(torch.complex64) for j, t in got.items()})


# ------------------------------------------------------------------- bad results
def test_nan_and_inf_results_are_erasures_or_a_clear_refusal():
    code = GaussianMDS(7, 4)
    exact, got = products(code)
    got = [t.clone() for t in got]
    got[2][0, 0], got[5][3, 1] = math.nan, math.inf
    with pytest.warns(NonFiniteResultWarning, match=r"workers \[2, 5\]"):
        assert relative_error(code.decode(dict(enumerate(got))), exact) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteResultWarning)
        with pytest.raises(DecodeError, match=r"workers \[2, 5\] returned NaN or Inf"):
            code.decode({j: got[j] for j in (0, 2, 5, 6)})


def test_finite_results_whose_decode_overflows_are_refused():
    huge = {j: torch.full((4, 3), 3e38, dtype=F32) * (1 - 2 * (j % 2)) for j in range(2, 8)}
    with pytest.raises(DecodeError, match=r"refusing to decode.*overflowed"):
        GaussianMDS(8, 6).decode(huge)


def test_wrong_shapes_scalars_and_non_tensors_are_refused():
    code = SAZD(6, 4)
    _, got = products(code)
    results = {j: got[j] for j in (0, 1, 4, 5)}
    with pytest.raises(ValueError, match=r"result of worker 5 has shape"):
        code.decode({**results, 5: got[5][:-1]})
    with pytest.raises(ValueError, match=r"result of worker 4 has shape"):
        code.decode({**results, 4: got[4][:, :2]})
    with pytest.raises(ValueError, match=r"worker 1 must be a tensor with rows on dim 0"):
        code.decode({**results, 1: torch.tensor(1.0)})
    with pytest.raises(TypeError, match=r"worker 1 must be a torch.Tensor, got ndarray"):
        code.decode({**results, 1: got[1].numpy()})
    with pytest.raises(TypeError, match=r"results must be a mapping"):
        code.decode([got[j] for j in (0, 1, 4, 5)])


def test_mixed_dtypes_and_devices_are_refused():
    code = Poly(6, 4, nodes="chebyshev")
    _, got = products(code)
    results = {j: got[j] for j in (0, 1, 4, 5)}
    with pytest.raises(ValueError, match=r"results must share dtype and device.*float32"):
        code.decode({**results, 4: got[4].float()})
    with pytest.raises(ValueError, match=r"results must share dtype and device.*meta"):
        code.decode({**results, 4: torch.empty_like(got[4], device="meta")})


def test_results_that_require_grad_decode_without_a_graph():
    code = SAZD(6, 4)
    exact, got = products(code)
    decoded = code.decode({j: got[j].requires_grad_() for j in (0, 2, 4, 5)})
    assert not decoded.requires_grad and relative_error(decoded, exact) < 1e-12


# ------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("workers", [[0, 1, 6], [-1, 2, 3, 4], [0, 1, 1, 2]])
def test_worker_ids_out_of_range_or_duplicated_are_value_errors(workers):
    code = Poly(6, 4)
    for call in (code.can_decode, code.condition_number, lambda w: code.certify(w, 8)):
        with pytest.raises(ValueError, match=r"unknown worker id|duplicate worker id"):
            call(workers)
    with pytest.raises(ValueError, match=r"unknown worker id|duplicate"):
        Replication(6, 3).can_decode(workers)


@pytest.mark.parametrize("workers", [["0", 1, 2, 3], [True, 1, 2, 3], [0.0, 1, 2, 3], "0123", 5])
def test_worker_ids_of_the_wrong_type_are_type_errors(workers):
    with pytest.raises(TypeError, match=r"worker id|collection of worker ids"):
        SAZD(6, 4).can_decode(workers)


def test_numpy_integer_worker_ids_are_fine():
    code = SAZD(6, 4)
    exact, got = products(code)
    assert code.can_decode(np.array([0, 1, 4, 5]).tolist()) and code.can_decode(list(np.arange(4)))
    assert relative_error(code.decode({np.int64(j): got[j] for j in (0, 1, 4, 5)}), exact) < 1e-12


def test_verify_needs_at_least_one_sample_and_reports_refused_sets_as_infinite():
    code = SAZD(6, 4)
    with pytest.raises(ValueError, match=r"samples must be an integer >= 1.*samples=0"):
        code.verify(rows=8, samples=0)
    with pytest.raises(TypeError, match=r"samples must be an integer"):
        code.verify(rows=8, samples=True)
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype"):
        code.verify(rows=8, dtype="float32")
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device"):
        code.verify(rows=8, device="gpu0")
    assert SAZD(10, 8, systematic=False).verify(rows=8 * 2048, samples=2) == math.inf
    assert 0 < code.verify(rows=8, samples=1) < 1e-6


def test_bools_strings_and_floats_are_not_accepted_for_ints_and_bools():
    with pytest.raises(TypeError, match=r"systematic must be True or False.*'no'"):
        SAZD(6, 4, systematic="no")
    with pytest.raises(TypeError, match=r"systematic must be True or False"):
        Poly(6, 4, systematic=1)
    with pytest.raises(TypeError, match=r"systematic must be True or False"):
        get_code("gaussian", 6, 4, systematic="false")
    with pytest.raises(TypeError, match=r"n must be an integer.*n=True"):
        SAZD(True, 1)
    with pytest.raises(TypeError, match=r"k must be an integer.*k=4.0"):
        GaussianMDS(6, 4.0)
    with pytest.raises(TypeError, match=r"k must be an integer"):
        Uncoded("3")
    with pytest.raises(TypeError, match=r"shift_unit must be an integer.*2.0"):
        SAZD(6, 4, shift_unit=2.0)
    with pytest.raises(ValueError, match=r"shift_unit must be an integer >= 1 or 'auto'.*'big'"):
        SAZD(6, 4, shift_unit="big")
    with pytest.raises(TypeError, match=r"nodes must be one of"):
        Poly(6, 4, nodes=None)
    with pytest.raises(TypeError, match=r"seed must be an integer"):
        GaussianMDS(6, 4, seed=1.5)
    with pytest.raises(TypeError, match=r"allow_unstable must be True or False"):
        SAZD(6, 4).decode({}, allow_unstable="yes")
    with pytest.raises(TypeError, match=r"copy must be True or False.*copy=0"):  # a view is not a number
        SAZD(6, 4).encode(torch.ones(8, 2), copy=0)


def test_huge_shift_units_are_refused_before_any_allocation():
    with pytest.raises(ValueError, match=r"shift_unit=1000000000 is too large.*<= 65536"):
        SAZD(10, 8, shift_unit=10**9)
    assert SAZD(10, 8, shift_unit=2**16).block_rows(1)[-1] == 1 + 7 * 2**16


def test_rows_arguments_are_checked_everywhere():
    code = SAZD(6, 4)
    _, got = products(code)
    results = {j: got[j] for j in (0, 1, 4, 5)}
    with pytest.raises(ValueError, match=r"rows=10 must be a positive multiple of k=4.*pad to 12"):
        code.decode(results, rows=10)
    with pytest.raises(TypeError, match=r"rows must be an integer"):
        code.decode(results, rows="64")
    with pytest.raises(TypeError, match=r"rows must be an integer"):
        code.overhead_rows(True)
    with pytest.raises(ValueError, match=r"rows=0 must be a positive multiple"):
        code.certify((0, 1, 2, 3), 0)
    for c in (code, Poly(6, 4)):
        with pytest.raises(ValueError, match=r"r must be an integer >= 1.*r=0"):
            c.block_rows(0)
        with pytest.raises(TypeError, match=r"r must be an integer"):
            c.block_rows(1.5)
    with pytest.raises(TypeError, match=r"W must be a floating-point tensor.*int64"):
        code.encode(torch.arange(8).reshape(8, 1))
    with pytest.raises(TypeError, match=r"W must be a torch.Tensor, got list"):
        code.encode([[1.0]] * 8)


def test_registry_functions_check_their_arguments():
    with pytest.raises(TypeError, match=r"code name must be a string"):
        get_code(5, 6, 4)
    with pytest.raises(TypeError, match=r"code name must be a string"):
        code_options(None)
    with pytest.raises(ValueError, match=r"unknown code 'rs'"):
        code_options("rs")
    with pytest.raises(TypeError, match=r"n must be an integer"):
        get_code("uncoded", "4", 4)
    with pytest.raises(TypeError, match=r"n must be an integer"):
        get_code("sazd", 6.0, 4)
    with pytest.raises(ValueError, match=r"samples must be an integer >= 1.*samples=0"):
        straggler_sets(6, 4, samples=0)
    with pytest.raises(ValueError, match=r"n must be an integer >= 5"):
        straggler_sets(3, 5)
    with pytest.raises(TypeError, match=r"seed must be an integer"):
        straggler_sets(6, 4, samples=2, seed="0")


def test_certify_refuses_bad_dtypes_devices_and_undecodable_sets():
    code = Replication(6, 3)
    with pytest.raises(TypeError, match=r"floating-point dtype.*torch.int32"):
        code.certify((0, 1, 2), 3, torch.int32)
    with pytest.raises(TypeError, match=r"device must be a string"):
        code.certify((0, 1, 2), 3, F32, device=0.5)
    with pytest.raises(DecodeError, match=r"workers \[0, 1, 3\] cannot decode"):
        code.certify((0, 3, 1), 3)


# ------------------------------------------------------------------- overflow when encoding
@pytest.mark.parametrize(("n", "k"), [(32, 31), (32, 27), (30, 29)])
def test_integer_node_poly_that_would_overflow_float32_is_refused_at_construction(n, k):
    with pytest.raises(ValueError, match=rf"Poly\(n={n}, k={k}\).*overflow to inf.*chebyshev"):
        Poly(n, k)
    # the systematic form's generator is in range (its hopeless decodes are refused by certification)
    for code in (Poly(n, k, nodes="chebyshev"), get_code("poly", n, k, systematic=True)):
        assert all(bool(torch.isfinite(c).all()) for c in code.encode(torch.randn(k * 2, 3)))


def test_the_largest_integer_node_poly_that_fits_float32_still_encodes_finite_weights():
    code = Poly(32, 26)  # 32**25 = 4e37: in range
    coded = code.encode(torch.rand(26 * 2, 3) * 0.5)
    assert all(bool(torch.isfinite(c).all()) for c in coded)


def test_encode_refuses_results_that_overflow_instead_of_returning_inf():
    W = torch.full((8 * 2, 3), 1e38)
    for code in (SAZD(10, 8), SAZD(10, 8, systematic=False), get_code("cyclic", 10, 8), Poly(10, 8)):
        with pytest.raises(ValueError, match=r"W \(largest entry 1.0e\+38.*overflowed torch\.float32"):
            code.encode(W)
        assert all(bool(torch.isfinite(c).all()) for c in code.encode(W.double()))
    with pytest.raises(ValueError, match=r"overflowed torch\.float16.*encode in float64"):
        Poly(10, 8).encode(torch.ones(8 * 2, 3, dtype=torch.float16))  # 10**7 > 65504
    nan = torch.randn(8 * 2, 3)
    nan[0, 0] = math.nan  # non-finite weights are the caller's: passed through, decoded as erasures
    assert not bool(torch.isfinite(SAZD(10, 8).encode(nan)[8]).all())


def test_decode_report_and_certify_flag_check_their_arguments():
    code = SAZD(6, 4)
    coded = code.encode(torch.randn(16, 3))
    got = {j: coded[j] for j in (0, 1, 2, 3)}
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="certify must be True or False"):
            code.decode_report(got, certify=bad)
    with pytest.raises(DecodeError, match="need results from at least k=4"):
        code.decode_report({0: coded[0]})
    # NaN results: an erasure here too, and the bound is that of the remaining set
    got = {j: coded[j].clone() for j in range(6)}
    got[1][0, 0] = math.nan
    with pytest.warns(NonFiniteResultWarning, match=r"workers \[1\]"):
        report = code.decode_report(got)
    assert report.certificate.workers == (0, 2, 3, 4, 5) and 0 < report.error_bound < 1e-5


def test_uncertified_decodes_still_treat_nan_results_as_erasures_and_refuse_overflow():
    code = SAZD(6, 4)
    exact, got = products(code, dtype=F32)
    got = [t.clone() for t in got]
    got[0][1, 2] = math.inf
    with pytest.warns(NonFiniteResultWarning, match=r"workers \[0\]"):
        assert relative_error(code.decode(dict(enumerate(got)), certify=False), exact) < 1e-5
    huge = {j: torch.full((4, 3), 3e38, dtype=F32) * (1 - 2 * (j % 2)) for j in range(2, 8)}
    with pytest.raises(DecodeError, match=r"refusing to decode.*overflowed"):
        GaussianMDS(8, 6).decode(huge, certify=False)
