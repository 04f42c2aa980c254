"""Every code decodes every straggler set to the exact float64 product, and refuses bad input clearly.

Tolerances (relative Frobenius error against the exact float64 product ``W @ X``):

- LC codes solve ``G_S A = Y_S``. Each worker's product carries a relative rounding error of a few
  ``eps(dtype)`` (input rounding, encode rounding, a short dot product), and solving amplifies relative
  error by at most ``cond(G_S)``. So ``tol = 64 * eps * cond(G_S)``; measured ratios err/(eps*cond) are
  <= ~1 for well-conditioned generators and ~20 for integer-node Vandermonde at cond ~1e10 in float64
  (the float64 explicit inverse starts to contribute there), which is why integer-node Poly is tested
  in float64 with k <= 6 only: in float32 its tolerance would exceed 1 and prove nothing (its
  instability is shown by ``test_poly_integer_nodes_are_unstable``).
- SAZD decodes with additions along zigzag chains of at most r rows, each link adding one rounding of a
  value the size of the data. With r <= 8 systematic SAZD measured <= ~50 eps (worst: 5 missing
  blocks), so ``tol = 256 * eps``. The non-systematic form solves the full k x k ring system whose
  error grows fast with r and with k: worst err/eps over n <= 12 measured, for r = 1 / 2,
  k=6: 3 / 25, k=8: 28 / 264, k=9: 401 / 1032, k=11: 2576 / 9660. So it is tested with r <= 2 and
  k <= 8 under ``tol = 2048 * eps`` (2.4e-4 in float32); beyond that it is not a usable code in float32.
Every tolerance is checked to be < 1e-2, far below the O(1) error of a wrong decode.
"""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sazd.codes import (
    CODE_NAMES,
    SAZD,
    Code,
    DecodeError,
    GaussianMDS,
    Poly,
    Replication,
    Uncoded,
    UnstableDecodeWarning,
    get_code,
)
from sazd.codes.base import NonFiniteResultWarning, empty_in_layout, relative_error, straggler_sets
from sazd.codes.checks import check_subset

F64, F32 = torch.float64, torch.float32

# (label, name, options, allowed dtypes, max k, max rows per block)
SPECS = [
    ("sazd-systematic", "sazd", {}, (F64, F32), 11, 8),
    ("sazd-nonsystematic", "sazd", {"systematic": False}, (F64, F32), 8, 2),
    ("sazd-shift2", "sazd", {"shift_unit": 2}, (F64, F32), 11, 8),
    ("poly-integer", "poly", {}, (F64,), 6, 8),
    ("poly-chebyshev", "poly", {"nodes": "chebyshev"}, (F64, F32), 11, 8),
    ("poly-chebyshev-systematic", "poly", {"nodes": "chebyshev", "systematic": True}, (F64, F32), 11, 8),
    ("poly-integer-systematic", "poly", {"systematic": True}, (F64,), 6, 8),
    ("gaussian", "gaussian", {}, (F64, F32), 11, 8),
    ("gaussian-systematic", "gaussian", {"systematic": True}, (F64, F32), 11, 8),
    ("replication", "replication", {}, (F64, F32), 11, 8),
]


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tolerance(code: Code, subset: tuple[int, ...], dtype: torch.dtype) -> float:
    """The error budget explained in the module docstring."""
    if isinstance(code, SAZD):
        return (256 if code.is_systematic else 2048) * eps(dtype)
    return 64 * eps(dtype) * code.condition_number(subset)


def problem(rows: int, trailing: tuple[int, ...], seed: int):
    """Random W (rows, *trailing) in float64 and a row-wise linear map ``apply`` standing for ``@ X``.

    No trailing dims: the map is the identity (decode the coded blocks themselves); otherwise
    ``C @ X`` over the last dim, which acts on each row separately, as a worker's product does.
    """
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, *trailing, generator=gen, dtype=F64)
    if not trailing:
        return W, lambda C: C
    X = torch.randn(trailing[-1], 3, generator=gen, dtype=F64)
    return W, lambda C: C @ X.to(C.dtype)


def decodable_sets(code: Code, seed: int, samples: int = 24) -> list[tuple[int, ...]]:
    total = math.comb(code.n, code.k)
    sets, _ = straggler_sets(code.n, code.k, None if total <= 64 else samples, seed)
    return [s for s in sets if code.can_decode(s)]


@st.composite
def cases(draw, dtypes=None):
    label, name, opts, allowed, kmax, rmax = draw(st.sampled_from(SPECS))
    n = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(n - 1, kmax)))
    r = draw(st.integers(1, rmax))
    trailing = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    dtype = draw(st.sampled_from(dtypes or allowed))
    seed = draw(st.integers(0, 2**16))
    return label, get_code(name, n, k, **opts), r, trailing, dtype, seed


@settings(max_examples=60, deadline=None)
@given(cases())
def test_every_straggler_set_decodes_to_the_exact_product(case):
    label, code, r, trailing, dtype, seed = case
    W, apply = problem(code.k * r, trailing, seed)
    exact = apply(W)
    products = {dtype: [apply(c) for c in code.encode(W.to(dtype))]}
    for subset in decodable_sets(code, seed):
        check = dtype
        if tolerance(code, subset, dtype) >= 1e-2:
            # This set is so ill-conditioned (e.g. adjacent Chebyshev nodes) that float32 cannot tell a
            # right decode from a wrong one: check it in float64, where the same bound is informative.
            check = F64
            products.setdefault(F64, [apply(c) for c in code.encode(W)])
        decoded = code.decode({j: products[check][j] for j in subset})
        tol = tolerance(code, subset, check)
        assert tol < 1e-2, f"{label}: tolerance {tol:.1e} too loose to prove anything"
        assert decoded.dtype == check and decoded.shape == exact.shape
        err = relative_error(decoded, exact)
        assert err <= tol, f"{code!r} ({label}) r={r} {check} set {subset}: error {err:.2e} > {tol:.2e}"


HALF_SPECS = [
    ("sazd", {}),
    ("gaussian", {}),
    ("poly", {"nodes": "chebyshev"}),
    ("poly", {"nodes": "chebyshev", "systematic": True}),
    ("replication", {}),
]


@settings(max_examples=30, deadline=None)
@given(
    spec=st.sampled_from(HALF_SPECS),
    k=st.integers(1, 8),
    m=st.integers(1, 2),
    r=st.integers(1, 8),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_half_precision_decodes_within_a_few_half_eps(spec, k, m, r, dtype, seed):
    # Half-precision blocks and products, float32 encode/decode arithmetic. With m <= 2 parity blocks and
    # well-conditioned generators the measured error is <= ~2 eps(half) * cond; allow 8 eps * cond
    # (bf16: 6e-2 for cond 1), still far below a wrong decode. A set so ill-conditioned that its
    # certified error reaches 1 (8 eps * cond >= 1 here: nothing to check) is refused instead.
    name, opts = spec
    code = get_code(name, k + m, k, **opts)
    W, apply = problem(k * r, (5,), seed)
    exact = apply(W)
    products = [apply(c) for c in code.encode(W.to(dtype))]
    for subset in decodable_sets(code, seed):
        results = {j: products[j] for j in subset}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnstableDecodeWarning)
            certified = code.decode_report(results, allow_unstable=True).error_bound
            if certified >= 1:
                with pytest.raises(DecodeError, match="refusing to decode"):
                    code.decode(results)
                continue
            decoded = code.decode(results)
        cond = 1.0 if isinstance(code, SAZD) else code.condition_number(subset)
        tol = 8 * eps(dtype) * cond
        assert decoded.dtype == dtype
        err = relative_error(decoded, exact)
        assert err <= tol, f"{code!r} {dtype} r={r} set {subset}: error {err:.2e} > {tol:.2e}"


# --------------------------------------------------------------------------- must show
@pytest.mark.parametrize(("n", "k"), [(10, 8), (6, 4)])
def test_systematic_sazd_fp32_long_blocks_within_1e_5(n, k):
    report = SAZD(n, k).verify_report(rows=k * 8192, samples=None, dtype=F32)
    assert report.sets_checked == report.sets_total == math.comb(n, k)
    assert report.worst_error <= 1e-5, f"worst set {report.worst_set}: {report.worst_error:.2e}"


def test_poly_integer_nodes_are_unstable_and_chebyshev_is_not():
    integer = Poly(10, 8).verify(rows=8 * 64, dtype=F32)
    chebyshev = Poly(10, 8, nodes="chebyshev").verify(rows=8 * 64, dtype=F32)
    assert integer > 1e-2
    assert chebyshev < 1e-3
    assert chebyshev * 100 < integer


# ----------------------------------------------------------------- generators and repr
def test_generators():
    G = Poly(5, 3).generator
    x = torch.arange(1, 6, dtype=F64)
    assert torch.equal(G, torch.stack([x**0, x, x**2], dim=1))
    cheb = Poly(5, 3, nodes="chebyshev").generator
    nodes = torch.cos((2 * torch.arange(5, dtype=F64) + 1) * math.pi / 10)
    assert torch.allclose(cheb[:, 1], nodes)
    for code in (Poly(7, 4, systematic=True), GaussianMDS(7, 4, systematic=True)):
        G = code.generator
        assert G.dtype == F64 and G.shape == (7, 4)
        assert torch.equal(G[:4], torch.eye(4, dtype=F64))
        assert code.is_systematic
    # the systematic form spans the same code: G_sys = G @ inv(G[:k])
    plain = Poly(7, 4).generator
    assert torch.allclose(Poly(7, 4, systematic=True).generator @ plain[:4], plain, rtol=1e-10)
    gauss = GaussianMDS(7, 4, seed=3).generator
    assert torch.allclose(torch.linalg.vector_norm(gauss, dim=0), torch.ones(4, dtype=F64))
    assert torch.equal(gauss, GaussianMDS(7, 4, seed=3).generator)
    assert not torch.equal(gauss, GaussianMDS(7, 4, seed=4).generator)
    assert torch.equal(Uncoded(3).generator, torch.eye(3, dtype=F64))
    rep = Replication(5, 2).generator
    assert torch.equal(rep, torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0]], dtype=F64))
    # the generator is a copy: mutating it does not change the code
    code = GaussianMDS(4, 2)
    code.generator.zero_()
    assert code.generator.abs().sum() > 0


def test_names_systematic_flags_and_repr():
    expected = {
        "poly": (Poly(4, 2), False),
        "gaussian": (GaussianMDS(4, 2), False),
        "uncoded": (Uncoded(2), True),
        "replication": (Replication(4, 2), True),
        "sazd": (SAZD(4, 2), True),
    }
    for name, (code, systematic) in expected.items():
        assert code.name == name
        assert code.is_systematic is systematic
    assert SAZD(4, 2, systematic=False).is_systematic is False
    assert repr(Poly(10, 8, nodes="chebyshev", systematic=True)) == (
        "Poly(n=10, k=8, nodes='chebyshev', systematic=True)"
    )
    assert repr(GaussianMDS(5, 3, seed=2)) == "GaussianMDS(n=5, k=3, seed=2, systematic=False)"
    assert repr(Uncoded(3)) == "Uncoded(k=3)"
    assert repr(Replication(5, 3)) == "Replication(n=5, k=3)"


def test_get_code_builds_each_code_by_name():
    assert set(CODE_NAMES) == {"sazd", "cyclic", "poly", "gaussian", "uncoded", "replication"}
    assert isinstance(get_code("sazd", 6, 4, shift_unit=2), SAZD)
    assert get_code("sazd", 6, 4, shift_unit=2).shift_unit == 2
    assert get_code("poly", 6, 4, nodes="chebyshev").nodes == "chebyshev"
    assert get_code("gaussian", 6, 4, seed=5).seed == 5
    assert isinstance(get_code("uncoded", 4, 4), Uncoded)
    assert isinstance(get_code("replication", 6, 4), Replication)
    assert isinstance(get_code("POLY", 6, 4), Poly)


# --------------------------------------------------------------------- dtype, device, shape
@pytest.mark.parametrize("name", CODE_NAMES)
@pytest.mark.parametrize("dtype", [F64, F32, torch.float16, torch.bfloat16])
def test_encode_decode_keep_dtype_device_and_trailing_shape(name, dtype):
    n, k = (4, 4) if name == "uncoded" else (6, 4)
    code = get_code(name, n, k, **({"nodes": "chebyshev"} if name == "poly" else {}))
    W = torch.randn(4 * 3, 2, 5, dtype=F64)
    coded = code.encode(W.to(dtype))
    assert len(coded) == n
    for j, c in enumerate(coded):
        assert c.dtype == dtype and c.device == W.device
        assert c.shape[1:] == (2, 5) and c.shape[0] == code.block_rows(3)[j]
    subset = next(s for s in straggler_sets(n, k)[0][::-1] if code.can_decode(s))
    decoded = code.decode({j: coded[j] for j in subset})
    assert decoded.dtype == dtype and decoded.device == W.device and decoded.shape == W.shape
    tol = 0.1 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    assert relative_error(decoded, W) < tol


@pytest.mark.parametrize("name", CODE_NAMES)
def test_coded_blocks_own_their_storage(name):
    # A view would share (and, when pickled to a remote worker, send) the storage of every block.
    code = get_code(name, 4, 4) if name == "uncoded" else get_code(name, 6, 4)
    W = torch.randn(4 * 64, 32)
    for c in code.encode(W):
        assert c.untyped_storage().nbytes() == c.numel() * c.element_size()
        assert len(pickle.dumps(c)) < c.numel() * c.element_size() + 4096
    assert W.untyped_storage().data_ptr() not in {c.untyped_storage().data_ptr() for c in code.encode(W)}
    # copy=False: the same blocks, those that are W's rows unchanged as views of W (a caller that
    # sends them at once saves a copy of W); a transposed W (DEU's dY^T) too
    for source in (W, torch.randn(32, 4 * 64).T):
        copies, views = code.encode(source), code.encode(source, copy=False)
        assert all(torch.equal(a, b) for a, b in zip(copies, views, strict=True))
        storage = source.untyped_storage().data_ptr()
        shared = [j for j, c in enumerate(views) if c.untyped_storage().data_ptr() == storage]
        rows = source.reshape(code.k, -1, source.shape[1])
        assert shared == [j for j, c in enumerate(views) if any(torch.equal(c, block) for block in rows)]
        assert len(shared) >= (code.k if code.is_systematic else 0)


@pytest.mark.parametrize("name", ["sazd", "poly", "gaussian", "replication"])
def test_decode_uses_more_than_k_results(name):
    code = get_code(name, 7, 4)
    W = torch.randn(4 * 5, 3, dtype=F64)
    coded = code.encode(W)
    for drop in ([], [0], [2, 5], [6]):  # replication keeps a copy of each block
        got = {j: coded[j] for j in range(7) if j not in drop}
        assert len(got) > code.k
        assert relative_error(code.decode(got), W) < 1e-9


def test_decode_does_not_modify_results():
    for code in (Poly(6, 4, systematic=True), GaussianMDS(6, 4), SAZD(6, 4)):
        coded = code.encode(torch.randn(8, 3, dtype=F64))
        got = {j: coded[j].clone() for j in (1, 3, 4, 5)}
        code.decode(got)
        for j, t in got.items():
            assert torch.equal(t, coded[j])


def test_lc_decode_repeated_sets_give_identical_results():
    code = GaussianMDS(8, 5, systematic=True)
    coded = code.encode(torch.randn(5 * 4, 6))
    got = {j: coded[j] for j in (0, 2, 5, 6, 7)}
    assert torch.equal(code.decode(got), code.decode(got))
    assert code.condition_number([0, 1, 2, 3, 4]) == pytest.approx(1.0)
    assert code.condition_number(got) > 1.0


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "build",
    [
        lambda: SAZD(4, 4),
        lambda: SAZD(3, 4),
        lambda: Poly(4, 4),
        lambda: Poly(3, 5),
        lambda: GaussianMDS(4, 4),
        lambda: Replication(3, 4),
        lambda: get_code("sazd", 5, 5),
        lambda: get_code("poly", 2, 2),
    ],
)
def test_too_few_workers_is_refused(build):
    with pytest.raises(ValueError, match=r"n=\d+, k=\d+"):
        build()


def test_replication_and_uncoded_allow_n_equal_k():
    assert Replication(3, 3).can_decode([0, 1, 2])
    assert Uncoded(3).n == 3


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k_is_refused(k):
    for build in (lambda: SAZD(5, k), lambda: Poly(5, k), lambda: GaussianMDS(5, k),
                  lambda: Replication(5, k), lambda: Uncoded(k)):
        with pytest.raises(ValueError, match="k must be"):
            build()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"nodes must be one of .*'legendre'"):
        Poly(5, 3, nodes="legendre")
    with pytest.raises(ValueError, match="seed"):
        GaussianMDS(5, 3, seed="x")
    with pytest.raises(ValueError, match="shift_unit"):
        SAZD(5, 3, shift_unit=0)
    with pytest.raises(ValueError, match=r"unknown code 'rs'.*'sazd'.*'replication'"):
        get_code("rs", 5, 3)
    with pytest.raises(ValueError, match="unknown option 'nodes' for code 'gaussian'"):
        get_code("gaussian", 5, 3, nodes="chebyshev")
    with pytest.raises(ValueError, match=r"unknown option 'shift' for code 'sazd'.*shift_unit"):
        get_code("sazd", 5, 3, shift=2)
    with pytest.raises(ValueError, match="n must equal k"):
        get_code("uncoded", 5, 3)


@pytest.mark.parametrize("name", ["sazd", "poly", "replication"])
def test_rows_not_divisible_by_k_suggest_padding(name):
    code = get_code(name, 6, 4)
    with pytest.raises(ValueError, match=r"W.shape\[0\]=10 must be a positive multiple of k=4.*pad to 12"):
        code.encode(torch.randn(10, 3))
    with pytest.raises(ValueError, match="rows=10"):
        code.overhead_rows(10)


@pytest.mark.parametrize("name", ["sazd", "poly", "gaussian", "replication"])
def test_decode_input_errors(name):
    code = get_code(name, 6, 4)
    coded = code.encode(torch.randn(4 * 5, 3))
    with pytest.raises(DecodeError, match="need results from at least k=4"):
        code.decode({j: coded[j] for j in (0, 4, 5)})
    with pytest.raises(ValueError, match="unknown worker id 6"):
        code.decode({j: coded[j % 6] for j in (0, 1, 2, 6)})
    with pytest.raises(ValueError, match="unknown worker id -1"):
        code.decode({-1: coded[0], 1: coded[1], 2: coded[2], 3: coded[3]})
    wrong = {j: coded[j] for j in (0, 1, 2, 3)}
    wrong[2] = coded[2][:-1]
    with pytest.raises(ValueError, match="result of worker 2 has shape"):
        code.decode(wrong)
    wrong[2] = coded[2][..., :2]
    with pytest.raises(ValueError, match="result of worker 2 has shape"):
        code.decode(wrong)
    with pytest.raises(ValueError, match="results must be a mapping"):
        code.decode([coded[j] for j in range(4)])


@pytest.mark.parametrize("name", ["sazd", "poly", "gaussian", "replication"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_result_is_an_erasure_when_k_others_remain(name, bad):
    code = get_code(name, 6, 4)
    W = torch.randn(4 * 5, 3, dtype=F64)
    coded = code.encode(W)
    got = {j: coded[j].clone() for j in range(6)}
    got[1][2, 1] = bad
    with pytest.warns(NonFiniteResultWarning, match=r"workers \[1\]"):
        decoded = code.decode(got)
    assert relative_error(decoded, W) < 1e-9
    got = {j: got[j] for j in (0, 1, 2, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DecodeError, match=r"workers \[1\] returned NaN or Inf"):
            code.decode(got)


def test_replication_needs_a_copy_of_every_block():
    code = Replication(6, 3)  # block i on workers i and i + 3
    assert code.can_decode([0, 4, 2])
    assert not code.can_decode([0, 3, 1, 4])
    W = torch.randn(3 * 2, 4)
    coded = code.encode(W)
    assert torch.equal(code.decode({j: coded[j] for j in (3, 1, 5)}), W)
    with pytest.raises(DecodeError, match=r"source blocks \[2\]"):
        code.decode({j: coded[j] for j in (0, 3, 1, 4)})


def test_uncoded_needs_every_worker():
    code = Uncoded(3)
    W = torch.randn(6, 2)
    coded = code.encode(W)
    assert torch.equal(code.decode(dict(enumerate(coded))), W)
    with pytest.raises(DecodeError):
        code.decode({0: coded[0], 1: coded[1]})


def test_check_subset_refuses_duplicates_and_unknown_ids():
    code = Poly(6, 4)
    check_subset(code, [0, 5, 2])
    with pytest.raises(ValueError, match=r"duplicate worker id 2 in \[0, 2, 2\]"):
        check_subset(code, [0, 2, 2])
    with pytest.raises(ValueError, match="unknown worker id 6"):
        check_subset(code, [0, 6])


def test_unstable_peeling_is_flagged_and_hopeless_peeling_refused():
    """Peeling can amplify rounding exponentially; a data-independent probe flags it (warning above
    1e-3 relative error, DecodeError from 1 on) instead of returning numbers nobody should trust."""
    from sazd.codes.base import relative_error

    torch.manual_seed(0)
    # four parity workers, irregular missing blocks {0, 2, 3} and parities {0, 1, 3}: hopeless in fp32
    code = get_code("sazd", n=8, k=4, shift_unit=1)
    coded = code.encode(torch.randn(4 * 256, 16))
    with pytest.raises(DecodeError, match="refusing to decode"):
        code.decode({j: coded[j] for j in (1, 4, 5, 7)})
    # non-systematic k=8 at r=64 in fp32: about 1e-2, usable with care -> a warning, an honest result
    code = get_code("sazd", n=10, k=8, systematic=False, shift_unit=1)
    W = torch.randn(8 * 64, 32, dtype=torch.float64)
    coded = code.encode(W.float())
    with pytest.warns(UnstableDecodeWarning, match="certified relative error of"):
        decoded = code.decode({j: coded[j] for j in range(2, 10)})
    assert 1e-4 < relative_error(decoded, W) < 1.0
    # the same set in float64 is accurate and silent
    coded = code.encode(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecodeWarning)
        assert relative_error(code.decode({j: coded[j] for j in range(2, 10)}), W) < 1e-9


def test_overflowing_decode_names_the_fix_for_that_code():
    """Finite results whose decode overflows: a DecodeError with the code's own remedy."""
    gen = torch.Generator().manual_seed(0)
    huge = {j: torch.randn(4, 3, generator=gen) * 1e36 for j in range(2, 14)}
    with pytest.raises(DecodeError, match=r"overflowed although every result was finite.*chebyshev"):
        get_code("poly", n=14, k=12).decode(huge)
    assert "shift_unit" in get_code("sazd", n=6, k=4).stability_hint


@pytest.mark.parametrize("name", CODE_NAMES)
def test_encoding_a_transposed_matrix_equals_encoding_its_copy(name):
    # DEU encodes activations' transposes (dY^T, X^T) as views; the blocks must not depend on the layout
    code = get_code(name, 4, 4) if name == "uncoded" else get_code(name, 6, 4)
    Y = torch.randn(24, 4 * 16, dtype=torch.float64)
    from_view, from_copy = code.encode(Y.T), code.encode(Y.T.contiguous())
    for j, (a, b) in enumerate(zip(from_view, from_copy, strict=True)):
        assert torch.equal(a, b), f"block {j}"
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()  # its own storage
    subset = next(s for s in straggler_sets(code.n, code.k)[0][::-1] if code.can_decode(s))
    decoded = code.decode({j: from_view[j] @ torch.eye(24, dtype=torch.float64) for j in subset})
    assert torch.allclose(decoded, Y.T, atol=1e-10)


def test_a_transposed_block_layout_is_kept_by_empty_in_layout():
    rows_major = torch.zeros(5, 7)
    assert empty_in_layout(rows_major, 9).shape == (9, 7) and empty_in_layout(rows_major, 9).is_contiguous()
    column_major = torch.zeros(7, 5).T
    out = empty_in_layout(column_major, 9)
    assert out.shape == (9, 7) and out.stride() == (1, 9) and out.T.is_contiguous()
