"""The interface every code implements, and the checks every code shares.

A code splits a matrix ``W`` (rows on dim 0, any trailing shape) into ``k`` row blocks of ``r``
rows each and encodes them into ``n`` coded blocks. Because coding acts on rows only, a worker's
product ``coded[j] @ X`` is the coded version of ``W @ X``; ``decode`` turns the products of any
``k`` workers back into ``W @ X``.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_WORKERS = 32
HALF_DTYPES = (torch.float16, torch.bfloat16)


class DecodeError(ValueError):
    """Raised when a set of worker results cannot be decoded (too few usable results)."""


class NonFiniteResultWarning(UserWarning):
    """A worker returned NaN or Inf; its result was treated as an erasure."""


class UnstableDecodeWarning(UserWarning):
    """This straggler set decodes with a large error amplification (measured on a probe)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are decoded in float32 and cast back; others decode in place."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


@dataclass(frozen=True)
class VerifyReport:
    """Result of ``Code.verify_report``: the worst straggler set and how many sets were tried."""

    worst_error: float
    worst_set: tuple[int, ...]
    sets_checked: int
    sets_total: int


class Code(ABC):
    """An (n, k) erasure code over the reals acting on row blocks.

    Subclasses fill three hooks: ``block_rows`` (rows of each coded block for ``r`` source rows per
    block), ``_encode_blocks`` and ``_decode_blocks``. Validation lives here so every code refuses bad
    input with the same clear messages.
    """

    name: str = "code"
    is_systematic: bool = False
    # what to change when a straggler set decodes unstably (named in the DecodeError)
    stability_hint: str = "use a better-conditioned code or fewer workers"

    def __init__(self, n: int, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (the number of source blocks), got k={k!r}")
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError(f"n must be an integer (the number of workers), got n={n!r}")
        if n < k:
            raise ValueError(f"n must be >= k (n workers hold k source blocks), got n={n}, k={k}")
        if n > MAX_WORKERS:
            raise ValueError(f"n must be <= {MAX_WORKERS}, got n={n}")
        self.n = n
        self.k = k

    # ----------------------------------------------------------------- hooks
    def block_rows(self, r: int) -> list[int]:
        """Rows of each of the n coded blocks when each source block has ``r`` rows."""
        return [r] * self.n

    @abstractmethod
    def _encode_blocks(self, blocks: Tensor) -> list[Tensor]:
        """``blocks`` has shape (k, r, *trailing); return n coded blocks."""

    @abstractmethod
    def _decode_blocks(self, results: dict[int, Tensor], r: int, out: Tensor) -> Sequence[int] | None:
        """Write the k source blocks into ``out`` (shape (k, r, *trailing)) from >= k results.

        Return the blocks whose finiteness certifies every result used (blocks computed from all of
        them), or None to have every block checked: NaN/Inf checks then cost no extra pass.
        """

    def _source_rows(self, worker: int, rows: int) -> int:
        """Invert ``block_rows``: source rows per block given worker's coded rows."""
        return rows

    # ------------------------------------------------------------ public API
    @property
    def m(self) -> int:
        """Number of redundant workers (stragglers tolerated)."""
        return self.n - self.k

    def can_decode(self, workers: Collection[int]) -> bool:
        """Whether the results of these workers suffice to decode (any k for an MDS code)."""
        return len(set(workers)) >= self.k

    def overhead_rows(self, rows: int) -> int:
        """Extra rows over an ideal MDS code, summed over all coded blocks, for ``rows`` source rows."""
        r = self._rows_per_block(rows, "rows")
        return sum(self.block_rows(r)) - self.n * r

    def encode(self, W: Tensor) -> list[Tensor]:
        """Split ``W`` (dim 0 divisible by k) into k row blocks and encode them into n coded blocks."""
        if not isinstance(W, Tensor):
            raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
        if W.dim() < 1:
            raise ValueError("W must have at least one dimension (rows on dim 0), got a scalar")
        if not W.is_floating_point():
            raise ValueError(f"W must be a floating-point tensor, got dtype={W.dtype}")
        r = self._rows_per_block(W.shape[0], "W.shape[0]")
        blocks = W.reshape(self.k, r, *W.shape[1:])
        coded = self._encode_blocks(blocks)
        assert len(coded) == self.n
        return coded

    def decode(self, results: Mapping[int, Tensor], rows: int | None = None) -> Tensor:
        """Recover ``W @ X`` (shape (k*r, *trailing)) from the products of any k (or more) workers.

        ``results`` maps worker index -> that worker's ``coded[j] @ X``. A result holding NaN or Inf
        is treated as an erasure (with a ``NonFiniteResultWarning`` naming the worker) when k other
        results remain; otherwise a ``DecodeError`` names the bad workers.
        """
        if not isinstance(results, Mapping):
            raise ValueError(f"results must be a mapping worker -> tensor, got {type(results).__name__}")
        self._check_workers(results)
        ref_worker, ref = next(iter(results.items()))
        trailing = tuple(ref.shape[1:])
        if rows is None:
            r = self._source_rows(ref_worker, ref.shape[0])
        else:
            r = self._rows_per_block(rows, "rows")
        expected = self.block_rows(r)
        for j, res in results.items():
            if tuple(res.shape[1:]) != trailing or res.shape[0] != expected[j]:
                raise ValueError(
                    f"result of worker {j} has shape {tuple(res.shape)}, expected "
                    f"{(expected[j], *trailing)} (coded block rows for r={r} rows per block); "
                    "pass each worker's product coded[j] @ X unchanged"
                )
            if res.dtype != ref.dtype or res.device != ref.device:
                raise ValueError(
                    f"results must share dtype and device: worker {ref_worker} has {ref.dtype} on "
                    f"{ref.device}, worker {j} has {res.dtype} on {res.device}"
                )
        cdtype = compute_dtype(ref.dtype)
        usable = {j: t.detach().to(cdtype) for j, t in results.items()}
        out = torch.empty((self.k, r, *trailing), dtype=cdtype, device=ref.device)
        with torch.no_grad():  # decoding is not differentiated through (coded layers have own backward)
            certify = self._decode_blocks(usable, r, out)
        blocks = range(self.k) if certify is None else certify
        if not all(_all_finite(out[i]) for i in blocks):
            bad = [j for j, t in usable.items() if not _all_finite(t)]
            if not bad:
                raise DecodeError(
                    f"decoding from workers {sorted(results)} overflowed although every result was "
                    f"finite: this straggler set is numerically unstable for {self!r} at r={r} rows per "
                    f"block; {self.stability_hint}"
                )
            return self.decode(self._drop_non_finite(results, bad), rows=r * self.k)
        return out.reshape(self.k * r, *trailing).to(ref.dtype)

    def verify(self, rows: int, samples: int | None = None, **kwargs) -> float:
        """Worst relative decode error over every k-subset of workers (or ``samples`` random ones)."""
        return self.verify_report(rows, samples, **kwargs).worst_error

    def verify_report(
        self,
        rows: int,
        samples: int | None = None,
        cols: int = 16,
        inner: int = 64,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> VerifyReport:
        """Encode a random W (float64 -> ``dtype``), let every worker multiply in ``dtype``, decode each
        straggler set and compare with the exact float64 product ``W @ X``."""
        self._rows_per_block(rows, "rows")
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(rows, inner, generator=gen, dtype=torch.float64)
        X = torch.randn(inner, cols, generator=gen, dtype=torch.float64)
        exact = W @ X
        coded = self.encode(W.to(device=device, dtype=dtype))
        Xd = X.to(device=device, dtype=dtype)
        products = [c @ Xd for c in coded]
        sets, total = straggler_sets(self.n, self.k, samples, seed)
        sets = [subset for subset in sets if self.can_decode(subset)]  # e.g. replication: not every k-set
        worst, worst_set = -1.0, ()
        for subset in sets:
            try:
                decoded = self.decode({j: products[j] for j in subset}).to("cpu", torch.float64)
                err = relative_error(decoded, exact)
            except DecodeError:  # decoding overflowed: an infinite error, reported as such
                err = math.inf
            if not err <= worst:  # also catches NaN
                worst, worst_set = err, subset
                if not math.isfinite(err):
                    break
        return VerifyReport(worst, worst_set, len(sets), total)

    # --------------------------------------------------------------- helpers
    def _rows_per_block(self, rows: int, what: str) -> int:
        if rows < self.k or rows % self.k:
            raise ValueError(
                f"{what}={rows} must be a positive multiple of k={self.k} (each worker gets rows/k rows); "
                f"pad to {max(self.k, -(-rows // self.k) * self.k)} rows"
            )
        return rows // self.k

    def _check_workers(self, results: Mapping[int, Tensor]) -> None:
        for j, res in results.items():
            if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < self.n:
                raise ValueError(f"unknown worker id {j!r}: worker ids are integers 0..{self.n - 1}")
            if not isinstance(res, Tensor) or res.dim() < 1:
                raise ValueError(f"result of worker {j} must be a tensor with rows on dim 0")
        if len(results) < self.k:
            raise DecodeError(
                f"need results from at least k={self.k} of n={self.n} workers, got {len(results)} "
                f"(workers {sorted(results)}); wait for more workers"
            )

    def _drop_non_finite(self, results: Mapping[int, Tensor], bad: list[int]) -> dict[int, Tensor]:
        good = {j: t for j, t in results.items() if j not in bad}
        if len(good) < self.k:
            raise DecodeError(
                f"workers {bad} returned NaN or Inf and only {len(good)} finite results remain, fewer "
                f"than k={self.k}; check those workers' inputs and weights, or wait for more workers"
            )
        warnings.warn(
            f"workers {bad} returned NaN or Inf; treating them as erasures",
            NonFiniteResultWarning,
            stacklevel=3,
        )
        return good

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, k={self.k})"


def _all_finite(t: Tensor) -> bool:
    # One fused reduction first; the elementwise pass only when the sum is not finite (it may overflow).
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=compute_dtype(t.dtype)))):
        return True
    return bool(torch.isfinite(t).all())


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (Frobenius norm)."""
    exact = exact.double()
    return float(torch.linalg.vector_norm(approx.double() - exact) / torch.linalg.vector_norm(exact))


def straggler_sets(
    n: int, k: int, samples: int | None = None, seed: int = 0, limit: int = 2000
) -> tuple[list[tuple[int, ...]], int]:
    """Every k-subset of range(n), or a random sample of ``samples`` (default: all up to ``limit``)."""
    total = math.comb(n, k)
    want = total if samples is None else min(samples, total)
    want = min(want, limit) if samples is None else want
    if want >= total:
        return list(itertools.combinations(range(n), k)), total
    rng = random.Random(seed)
    picked: set[tuple[int, ...]] = set()
    while len(picked) < want:
        picked.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(picked), total


def check_subset(code: Code, workers: Sequence[int]) -> None:
    """Validate a list of worker ids (no duplicates, in range) for APIs that take a sequence."""
    seen: set[int] = set()
    for j in workers:
        if not isinstance(j, int) or not 0 <= j < code.n:
            raise ValueError(f"unknown worker id {j!r}: worker ids are integers 0..{code.n - 1}")
        if j in seen:
            raise ValueError(f"duplicate worker id {j} in {list(workers)}")
        seen.add(j)
