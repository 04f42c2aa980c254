"""What a certified decode promises: the bounds (when a decode warns, when it refuses), the
``Certificate`` of one straggler set, the reports ``Code.decode_report`` and ``Code.verify_report``
return, and the probes' data. How the probes are decoded and judged: ``sazd.codes.base``; why:
docs/certified-decoding.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

WARN_ERROR = 1e-3  # certified errors above this (or above 16 unit roundoffs of a half dtype) warn
REFUSE_ERROR = 1.0  # ... and from this one on the result would be noise: refused
HALF_ROUNDOFFS = 16  # a stable decode of half-precision products stays within 16 unit roundoffs
PROBE_KINDS = ("zero-mean", "large-mean", "ramp", "block-scaled")  # the data each probe holds
PROBE_MEAN = 1000.0  # the large-mean probe: mean / standard deviation
PROBE_BLOCK_SCALES = 1e3  # the block-scaled probe: blocks scaled from 1/this to 1
PROBE_VALUES = 4096  # each probe holds at least this many values (more columns for short blocks)
PROBE_INNER = 8  # inner dimension of the probes' products
# The certified bound is this multiple of the probes' amplification: the spread between probes and other
# data of the same kind (tiny results, rounding that happens to align; docs/certified-decoding.md).
PROBE_MARGIN = 8
# Where a code knows its decode's operator norm, the certified amplification is at least that norm times
# the results' own rounding per unit of their norm, as measured on the probes and never below this many
# float64 unit roundoffs (a float64 probe multiplies exactly as its float64 reference does, so it cannot
# see the rounding of a longer sum).
PRODUCT_ROUNDOFFS = 8
PROBE_SEED = 0


def warning_bound(dtype: torch.dtype) -> float:
    """Relative decode error above which a decode warns: ``max(1e-3, 16 u)`` for unit roundoff ``u``.

    For float32/float64 that is 1e-3; float16 gives 7.8e-3 and bfloat16 6.3e-2, whose products alone
    carry errors of a few u (bf16: u = 3.9e-3). Integer results (codes that decode them) must be exact.
    """
    if not dtype.is_floating_point:
        return 0.0
    return max(WARN_ERROR, HALF_ROUNDOFFS * torch.finfo(dtype).eps / 2)


@dataclass(frozen=True)
class Certificate:
    """The certified decode error of one straggler set: what ``Code.certify`` returns and ``decode`` checks.

    ``probe_errors``: the measured relative error of each probe (one per ``PROBE_KINDS``; ``inf`` when
    it came out NaN or Inf). ``amplification``: the certified absolute decode error per unit of the
    Frobenius norm of the results used: ``PROBE_MARGIN`` times the largest a probe measured, and at
    least the results' own rounding (per unit norm, at least ``PRODUCT_ROUNDOFFS`` float64 unit
    roundoffs) times the decode's operator norm where the code knows it (1 where not). ``noise``:
    that rounding of the probes' results, per unit of their norm -- the bound holds for results as
    accurate as that; a product that is less accurate by itself (a long inner dimension summing terms
    that cancel: an uncoded product carries that error too) carries it into the decode amplified.
    ``error = PROBE_MARGIN * max(probe_errors)`` is the certified error for data like the probes;
    ``bound_for`` the certified error of one decode, from its own norms. ``bound``: the warning bound
    for ``dtype``. A decode warns when its certified error exceeds ``bound`` and refuses from
    ``REFUSE_ERROR`` on.
    """

    code: str
    workers: tuple[int, ...]
    rows_per_block: int
    dtype: torch.dtype
    device_type: str
    probe_errors: tuple[float, ...]
    amplification: float
    noise: float
    bound: float

    @property
    def probe_error(self) -> float:
        """The largest relative error measured on a probe."""
        return max(self.probe_errors)

    @property
    def error(self) -> float:
        return PROBE_MARGIN * self.probe_error

    def bound_for(self, results_norm: float, product_norm: float) -> float:
        """Certified relative error of a decode whose used results have Frobenius norm ``results_norm``
        and whose decoded product has ``product_norm``: the absolute error is at most
        ``e = amplification * results_norm``, and against the exact product (whose norm is at least
        ``product_norm - e``) that is a relative error of ``e / (product_norm - e)``."""
        e = self.amplification * results_norm
        if e == 0:
            return 0.0
        return e / (product_norm - e) if e < product_norm else math.inf

    @property
    def status(self) -> str:
        """"certified", "unstable" (decodes with a warning) or "refused" (decode raises)."""
        return status_of(self.error, self.bound)

    @property
    def refused(self) -> bool:
        return not self.error < REFUSE_ERROR

    def describe(self, error: float | None = None) -> str:
        """The set, its certified error (``error``: one decode's; default: the probes') and the bounds."""
        if math.isinf(self.probe_error):
            kind = PROBE_KINDS[self.probe_errors.index(math.inf)]
            measured = f"an infinite relative error (its {kind} probe decoded to NaN/Inf)"
        elif error is None:
            worst = PROBE_KINDS[self.probe_errors.index(self.probe_error)]
            measured = (f"a relative error of about {self.error:.1e} ({PROBE_MARGIN} x the "
                        f"{self.probe_error:.1e} measured on its {worst} probe)")
        else:
            measured = (f"a certified relative error of {error:.1e} for these results (amplification "
                        f"{self.amplification:.1e} x the results' norm / the product's; its probes "
                        f"measured up to {self.probe_error:.1e})")
        return (
            f"decoding from workers {list(self.workers)} with {self.code} at r={self.rows_per_block} rows "
            f"per block in {self.dtype} has {measured}; warning bound {self.bound:.1e}, refusal from "
            f"{REFUSE_ERROR:g}"
        )


def status_of(error: float, bound: float) -> str:
    """"certified" (error <= bound), "unstable" (below ``REFUSE_ERROR``) or "refused"."""
    if error <= bound:
        return "certified"
    return "unstable" if error < REFUSE_ERROR else "refused"


@dataclass(frozen=True)
class DecodeReport:
    """What ``Code.decode_report`` returns: the decoded product and the certified bound on its relative
    error against the exact product (``nan`` and no certificate when decoded with ``certify=False``)."""

    product: Tensor
    error_bound: float
    certificate: Certificate | None

    @property
    def status(self) -> str:
        """"certified", "unstable", "refused" (returned only with ``allow_unstable``) or "uncertified"."""
        if self.certificate is None:
            return "uncertified"
        return status_of(self.error_bound, self.certificate.bound)


@dataclass(frozen=True)
class VerifyReport:
    """Result of ``Code.verify_report``: the worst straggler set and how many sets were tried.

    ``worst_error`` is ``inf`` when a set was refused (or overflowed); checking stops there."""

    worst_error: float
    worst_set: tuple[int, ...]
    sets_checked: int
    sets_total: int


def probe_blocks(k: int, r: int, gen: torch.Generator) -> Tensor:
    """Source blocks (k, r, kinds * PROBE_INNER) in float64: ``PROBE_INNER`` columns of each of
    ``PROBE_KINDS``, every kind of magnitude about 1 (so that half-precision products stay in range) --
    zero-mean normal; 1 plus a normal of standard deviation 1/PROBE_MEAN; a ramp along the k*r rows
    (random positive slope per column, 1 % noise); normal with block i scaled by a factor from
    1/PROBE_BLOCK_SCALES to 1 (geometric in i)."""
    shape = (k, r, PROBE_INNER)
    ramp = torch.linspace(0, 1, k * r, dtype=torch.float64).view(k, r, 1)
    scales = torch.logspace(-1, 0, k, base=PROBE_BLOCK_SCALES, dtype=torch.float64)
    # One draw serves every kind (drawing normals is most of a probe's cost; each kind is measured alone)
    normal = torch.randn(shape, generator=gen, dtype=torch.float64)
    slope = torch.randn(PROBE_INNER, generator=gen, dtype=torch.float64).abs()
    return torch.cat(
        [normal, 1 + normal / PROBE_MEAN, ramp * slope + 0.01 * normal, normal * scales.view(k, 1, 1)], dim=2
    )
