"""Certified decoding: every decode of every code is either accurate, or warned about, or refused.

The sweep below decodes real worker products (``coded[j] @ X`` in the results' dtype) of every code
for many (n, k), straggler sets and block lengths up to 8192 rows, and checks each decode against the
exact float64 product: a returned result is within the warning bound (1e-3; for bf16 the bound
derived from its unit roundoff) unless an ``UnstableDecodeWarning`` was raised, no returned result is
off by 1 or more (those sets raise ``DecodeError``), and none is off by more than the bound its
``decode_report`` certifies. The straggler sets always include the worst set certification finds for
that code and r, so the sample cannot miss the hard cases. tests/test_decode_fuzz.py adds data of
other shapes (large-mean, ramp, block-scaled).
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from sazd.codes import (
    SAZD,
    Certificate,
    DecodeError,
    UnstableDecodeWarning,
    get_code,
    warning_bound,
)
from sazd.codes.base import relative_error, straggler_sets
from sazd.codes.certificate import PROBE_KINDS, PROBE_MARGIN, REFUSE_ERROR, DecodeReport
from test_decode_fuzz import own_noise

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16

CODES = [
    ("sazd", {}),
    ("sazd", {"shift_unit": 1}),
    ("sazd", {"systematic": False}),
    ("poly", {}),
    ("poly", {"nodes": "chebyshev"}),
    ("poly", {"nodes": "chebyshev", "systematic": True}),
    ("gaussian", {}),
    ("gaussian", {"systematic": True}),
    ("replication", {}),
]
# (n, k): k = 1, k = n-1 .. n-4, n up to 16; rows per block 1 and 64 for each, 8192 for the first few
SHAPES = [(6, 5), (12, 8), (10, 8), (2, 1), (5, 1), (6, 4), (8, 4), (11, 8), (16, 12), (16, 15)]
LONG_SHAPES = 3
SETS_PER_CASE = 3  # sampled sets besides the worst one; all sets when there are at most 6
SCOUT_ROWS = 64  # the worst set is searched at this block length (certifying every set is cheap there)


def sets_for(code, r: int, dtype: torch.dtype, rng: random.Random) -> list[tuple[int, ...]]:
    """All decodable k-sets when few, else a seeded sample plus the worst set certification finds."""
    every, _ = straggler_sets(code.n, code.k, None if math.comb(code.n, code.k) <= 64 else 64)
    every = [s for s in every if code.can_decode(s)]
    if len(every) <= 6:
        return every
    scout = get_code(code.name, code.n, code.k, **options(code))  # certificates of its own
    rows = code.k * min(r, SCOUT_ROWS)
    worst = max(every, key=lambda s: scout.certify(s, rows, dtype).error)
    return [worst, *rng.sample([s for s in every if s != worst], SETS_PER_CASE)]


def options(code) -> dict:
    if isinstance(code, SAZD):
        return {"systematic": code.is_systematic, "shift_unit": code.shift_unit}
    return {k: getattr(code, k) for k in ("nodes",) if hasattr(code, k)} | (
        {"systematic": code.is_systematic} if code.name in ("poly", "gaussian") else {}
    )


def cases():
    rng = random.Random(0)
    for name, opts in CODES:
        for i, (n, k) in enumerate(SHAPES):
            if name == "sazd" and not opts.get("systematic", True) and k > 8:
                continue  # non-systematic SAZD at k = 12/15 is refused outright; k <= 8 shows that
            for r in (1, 64, 8192) if i < LONG_SHAPES else (1, 64):
                dtype = rng.choice([F32, F64, BF16])
                yield pytest.param(name, opts, n, k, r, dtype, id=f"{name}{opts}-{n}-{k}-r{r}-{dtype}")


@pytest.mark.parametrize(("name", "opts", "n", "k", "r", "dtype"), list(cases()))
def test_every_decode_is_accurate_or_warned_or_refused(name, opts, n, k, r, dtype):
    code = get_code(name, n, k, **opts)
    gen = torch.Generator().manual_seed(n * 1000 + k * 10 + r)
    cols, inner = 2, 48
    W = torch.randn(k * r, inner, generator=gen, dtype=F64)
    X = torch.randn(inner, cols, generator=gen, dtype=F64)
    exact = W @ X
    products = [c @ X.to(dtype) for c in code.encode(W.to(dtype))]
    bound = warning_bound(dtype)
    for subset in sets_for(code, r, dtype, random.Random(r + n)):
        results = {j: products[j] for j in subset}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                report = code.decode_report(results)
            except DecodeError as err:
                assert "refusing to decode" in str(err) and code.stability_hint in str(err)
                if "overflowed" not in str(err):  # else nothing to return, even when asked to
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UnstableDecodeWarning)
                        assert code.decode_report(results, allow_unstable=True).error_bound >= REFUSE_ERROR
                continue
        err = relative_error(report.product, exact)
        warned = any(issubclass(w.category, UnstableDecodeWarning) for w in caught)
        where = f"{code!r} r={r} {dtype} set {subset}"
        assert err < REFUSE_ERROR, f"{where}: returned a result with error {err:.2e}"
        assert err <= bound or warned, f"{where}: error {err:.2e} > {bound:.1e} without a warning"
        # the bound holds for results as accurate as the probes' (its precondition): scale it where not
        allowed = report.error_bound * max(1.0, own_noise(code, W, X, results) / report.certificate.noise)
        assert err <= allowed, f"{where}: error {err:.2e} > its bound {allowed:.1e}"
        assert warned == (report.status == "unstable")
        assert report.product.dtype == dtype and report.product.shape == exact.shape


def test_the_certificate_holds_every_probe_and_is_cached():
    code = SAZD(12, 8, shift_unit=1)  # four parity workers: some sets peel with a large amplification
    workers = (0, 2, 4, 6, 8, 9, 10, 11)  # blocks 1, 3, 5, 7 missing, parities 0..3
    cert = code.certify(workers, 8 * 64, F32)
    assert isinstance(cert, Certificate)
    assert cert.workers == workers and cert.rows_per_block == 64 and cert.dtype == F32
    assert cert.device_type == "cpu" and cert.bound == 1e-3
    assert len(cert.probe_errors) == len(PROBE_KINDS) and all(e > 0 for e in cert.probe_errors)
    assert cert.error == PROBE_MARGIN * cert.probe_error == PROBE_MARGIN * max(cert.probe_errors)
    assert cert.amplification > 0
    assert code.certify(list(reversed(workers)), 8 * 64, F32) is cert  # cached, order-free
    assert code.certify(workers, 8 * 64, F64) is not cert  # one per dtype
    assert code.certify(workers, 8 * 64, F64).error < cert.error
    # the error grows with the block length for this set (longer zigzag chains)
    assert code.certify(workers, 8 * 1024, F32).error > cert.error


def test_the_bound_follows_the_data_a_large_mean_gets_a_larger_bound_that_still_holds():
    code = SAZD(10, 8)
    workers = (0, 1, 2, 3, 4, 5, 8, 9)  # blocks 6 and 7 from both parities
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(32, 4, generator=gen, dtype=F64)
    bounds = []
    for mean in (0.0, 1e2, 1e4):
        W = mean + torch.randn(8 * 256, 32, generator=gen, dtype=F64)
        coded = code.encode(W.float())
        report = code.decode_report({j: coded[j] @ X.float() for j in workers})
        assert isinstance(report, DecodeReport) and report.certificate is code.certify(workers, 8 * 256)
        results = {j: coded[j] @ X.float() for j in workers}
        err = relative_error(report.product, W @ X)
        assert err <= report.error_bound * max(1.0, own_noise(code, W, X, results) / report.certificate.noise)
        bounds.append(report.error_bound)
    assert bounds[0] < bounds[1] < bounds[2] < 1e-3  # coded blocks grow with the mean faster than W @ X


def test_decode_report_bound_is_zero_for_zero_results_and_certify_false_skips_the_probe():
    code = SAZD(6, 4)
    zeros = {j: torch.zeros(code.block_rows(8)[j], 3) for j in (0, 1, 4, 5)}
    report = code.decode_report(zeros)
    assert report.error_bound == 0.0 and report.status == "certified" and not report.product.any()
    fresh = SAZD(6, 4)
    coded = fresh.encode(torch.randn(32, 5))
    got = {j: coded[j] for j in (0, 2, 4, 5)}
    plain = fresh.decode_report(got, certify=False)
    assert plain.certificate is None and math.isnan(plain.error_bound) and plain.status == "uncertified"
    assert "_certificates" not in fresh.__dict__  # no probe was decoded
    assert torch.equal(plain.product, fresh.decode(got))  # certification never changes the result
    with pytest.raises(TypeError, match="certify must be True or False"):
        fresh.decode(got, certify="no")


def test_unstable_sets_warn_once_per_key_and_name_the_set_the_error_and_the_fix():
    code = get_code("sazd", 10, 8, systematic=False, shift_unit=1)
    W = torch.randn(8 * 64, 16, dtype=F64)
    coded = code.encode(W.float())
    got = {j: coded[j] for j in range(2, 10)}
    assert code.certify(got, 8 * 64, F32).status == "unstable"
    with pytest.warns(UnstableDecodeWarning) as record:
        report = code.decode_report(got)
    (message,) = [str(w.message) for w in record if issubclass(w.category, UnstableDecodeWarning)]
    assert "[2, 3, 4, 5, 6, 7, 8, 9]" in message and f"{report.error_bound:.1e}" in message
    assert code.stability_hint in message and report.status == "unstable"
    assert 1e-4 < relative_error(report.product, W) <= report.error_bound < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecodeWarning)
        code.decode(got)  # already warned for this key: silent, and as fast as any other decode


def test_refused_sets_raise_every_time_and_allow_unstable_is_an_explicit_opt_out():
    code = get_code("poly", 10, 8)  # integer nodes: useless in float32
    coded = code.encode(torch.randn(8 * 32, 4))
    got = {j: coded[j] for j in range(2, 10)}
    for _ in range(2):
        with pytest.raises(DecodeError, match=r"refusing to decode.*\[2, 3, 4, 5, 6, 7, 8, 9\].*chebyshev"):
            code.decode(got)
    with pytest.warns(UnstableDecodeWarning, match="certified relative error of"):
        report = code.decode_report(got, allow_unstable=True)
    assert report.product.shape == (8 * 32, 4) and report.status == "refused"


def test_verify_report_agrees_with_certification():
    code = get_code("poly", 10, 8)
    report = code.verify_report(8 * 16, dtype=F32, samples=3)
    assert report.worst_error == math.inf  # refused sets are infinite errors
    assert code.certify(report.worst_set, 8 * 16, F32).refused
    good = get_code("sazd", 10, 8)
    report = good.verify_report(8 * 16, dtype=F32)
    assert 0 < report.worst_error < 1e-5
    assert all(good.certify(s, 8 * 16, F32).status == "certified" for s in straggler_sets(10, 8)[0])


def test_bf16_bound_comes_from_its_unit_roundoff():
    assert warning_bound(F32) == warning_bound(F64) == 1e-3
    assert warning_bound(BF16) == 16 * 2**-8 and warning_bound(torch.float16) == 16 * 2**-11
    # a plain copy in bf16 is certified although its rounding alone exceeds 1e-3
    cert = SAZD(6, 4).certify([0, 1, 2, 3], 4 * 64, BF16)
    assert 1e-3 < cert.error <= cert.bound and cert.status == "certified"
