"""The interface every code implements, and what every code shares: argument checks and certified decoding.

A code splits a matrix ``W`` (rows on dim 0, any trailing shape) into ``k`` row blocks of ``r``
rows each and encodes them into ``n`` coded blocks. Because coding acts on rows only, a worker's
product ``coded[j] @ X`` is the coded version of ``W @ X``; ``decode`` turns the products of any
``k`` workers back into ``W @ X``.

Certified decoding: every decode returns with a bound on its own relative error against the exact
product, ``margin x amplification x ||results|| / ||product||``. The amplification (absolute decode
error per unit of the results' norm) depends on the code, the set of workers used, the rows per block
``r``, the results' dtype and the device, and on the shape of the data only within what the probes
span; so the first decode of each such key decodes probes of four kinds of data at once (zero-mean,
large-mean, ramp and block-scaled blocks; exact float64 coded blocks rounded to the results' dtype
and multiplied in it, as a worker's product is), and keeps the largest ratio in the key's
``Certificate``. Every decode then scales it by the norms of its own results and product (data whose
coded blocks are large next to the product, e.g. a large mean, get a larger bound). Above
``warning_bound(dtype)`` the decode warns once per key (``UnstableDecodeWarning``); from
``REFUSE_ERROR`` on, or when a probe comes out NaN/Inf, it refuses (``DecodeError``), so noise is
never returned as a result. See docs/certified-decoding.md.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sazd.codes.certificate import (
    PROBE_INNER,
    PROBE_KINDS,
    PROBE_MARGIN,
    PROBE_SEED,
    PROBE_VALUES,
    PRODUCT_ROUNDOFFS,
    Certificate,
    DecodeReport,
    VerifyReport,
    probe_blocks,
    status_of,
    warning_bound,
)
from sazd.codes.checks import (
    ArgumentTypeError,
    check_bool,
    check_device,
    check_dtype,
    check_int,
    check_workers,
)

MAX_WORKERS = 32
HALF_DTYPES = (torch.float16, torch.bfloat16)

CERTIFICATE_LIMIT = 4096  # certificates kept per code (one per worker set, r, dtype and device type)


class DecodeError(ValueError):
    """Raised when a set of worker results cannot be decoded (too few usable results, or a straggler
    set whose certified decode error is too large to return anything)."""


class NonFiniteResultWarning(UserWarning):
    """A worker returned NaN or Inf; its result was treated as an erasure."""


class UnstableDecodeWarning(UserWarning):
    """This straggler set decodes with a large error amplification (measured on a probe)."""


def empty_in_layout(like: Tensor, rows: int) -> Tensor:
    """An uninitialised tensor shaped ``(rows, *like.shape[1:])``, laid out in memory in ``like``'s
    order of dimensions.

    A block of a transposed activation (a column slab of Y, read as rows of Y^T) keeps that layout:
    sums and shifted adds into it then read and write memory in order (about 10x faster than writing
    it row by row), and BLAS multiplies it as a transposed operand."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # outermost dimension first
    shape = (rows, *like.shape[1:])
    return like.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(like.dim())])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are decoded in float32 and cast back; others decode in place."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


class Code(ABC):
    """An (n, k) erasure code over the reals acting on row blocks.

    Subclasses fill the hooks ``block_rows`` (rows of each coded block for ``r`` source rows per
    block), ``_encode_blocks``, ``_decode_blocks`` and ``_source_rows``. Validation and certification
    live here so every code refuses bad input with the same clear messages and never returns an
    uncertified decode. A subclass that overrides the public ``block_rows`` or ``can_decode`` gets the
    argument checks wrapped around its method (``__init_subclass__``).
    """

    name: str = "code"
    is_systematic: bool = False
    # what to change when a straggler set decodes unstably (named in warnings and DecodeErrors)
    stability_hint: str = "use a better-conditioned code or fewer workers"
    # integer/bool results are refused unless a code decodes them exactly and says so here
    accepts_integer_results: bool = False

    def _coded_row(self, worker: int) -> int | None:
        """Row of the code's table for this worker (parity p of a systematic code is row p), or None
        for a plain systematic block."""
        if self.is_systematic:
            return None if worker < self.k else worker - self.k
        return worker

    def __init__(self, n: int, k: int) -> None:
        check_int(k, "k", 1, "the number of source blocks")
        check_int(n, "n", 1, "the number of workers")
        if n < k:
            raise ValueError(f"n must be >= k (n workers hold k source blocks), got n={n}, k={k}")
        if n > MAX_WORKERS:
            raise ValueError(f"n must be <= {MAX_WORKERS}, got n={n}; use fewer workers")
        self.n = n
        self.k = k

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method, check in (("block_rows", _checked_block_rows), ("can_decode", _checked_can_decode)):
            if method in cls.__dict__:
                setattr(cls, method, check(cls.__dict__[method]))

    # ----------------------------------------------------------------- hooks
    def block_rows(self, r: int) -> list[int]:
        """Rows of each of the n coded blocks when each source block has ``r`` rows."""
        check_int(r, "r", 1, "rows per source block")
        return [r] * self.n

    @abstractmethod
    def _encode_blocks(self, blocks: Tensor) -> list[Tensor]:
        """``blocks`` has shape (k, r, *trailing); return n coded blocks (a block that is a source
        block unchanged may be a view of it)."""

    @abstractmethod
    def _decode_blocks(self, results: dict[int, Tensor], r: int, out: Tensor) -> None:
        """Write the k source blocks into ``out`` (shape (k, r, *trailing)) from >= k results.

        Results are contiguous, in ``out``'s dtype, and must not be modified. A result may hold NaN or
        Inf: ``decode_report`` then discards the output and decodes again without that result.
        """

    def _rows_of(self, r: int) -> tuple[int, ...]:
        """``block_rows(r)``, computed once per r (every decode checks its results against it)."""
        known = self.__dict__.setdefault("_block_rows", {})
        rows = known.get(r)
        if rows is None:
            rows = known[r] = tuple(self.block_rows(r))
        return rows

    def _decode_ways(self, results: dict[int, Tensor], r: int, out: Tensor) -> list[Tensor]:
        """The outputs of every way ``_decode_blocks`` may decode these results (a code that picks its
        method by the results' width returns one per method; the first is written into ``out``).
        Certification measures them all, so the certificate holds whichever a decode takes."""
        self._decode_blocks(results, r, out)
        return [out]

    def _source_rows(self, worker: int, rows: int) -> int:
        """Invert ``block_rows``: source rows per block given worker's coded rows."""
        return rows

    def _copied_blocks(self, workers: Collection[int]) -> dict[int, int]:
        """The results ``_decode_blocks`` copies unchanged into the product: worker -> source block.
        Certification reads their norms off the product instead of reading them twice."""
        if not self.is_systematic:
            return {}
        return {j: j for j in workers if j < self.k}

    def _decode_into(self, results: dict[int, Tensor], r: int, out: Tensor) -> None:
        """``_decode_blocks`` into ``out`` of any layout: a product whose every block is a copied result
        is stacked straight into it; any other decode runs in a contiguous buffer, copied over."""
        if out.is_contiguous():
            self._decode_blocks(results, r, out)
            return
        by_block = {i: j for j, i in self._copied_blocks(results).items()}
        rows_first = out.permute(*range(2, out.dim()), 0, 1)  # (N, k, r): the transposed layout's memory
        if len(by_block) == self.k and rows_first.is_contiguous():  # side by side, a row at a time
            torch.stack([results[by_block[i]].movedim(0, -1) for i in range(self.k)], dim=-2, out=rows_first)
            return
        buffer = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        self._decode_blocks({j: t.contiguous() for j, t in results.items()}, r, buffer)  # row-wise solvers
        out.copy_(buffer)

    # ------------------------------------------------------------ public API
    @property
    def m(self) -> int:
        """Number of redundant workers (stragglers tolerated)."""
        return self.n - self.k

    def can_decode(self, workers: Collection[int]) -> bool:
        """Whether the results of these workers suffice to decode (any k for an MDS code)."""
        return len(check_workers(self, workers)) >= self.k

    def overhead_rows(self, rows: int) -> int:
        """Extra rows over an ideal MDS code, summed over all coded blocks, for ``rows`` source rows."""
        r = self._rows_per_block(rows, "rows")
        return sum(self.block_rows(r)) - self.n * r

    def encode(self, W: Tensor, *, copy: bool = True) -> list[Tensor]:
        """Split ``W`` (dim 0 divisible by k) into k row blocks and encode them into n coded blocks.
        ``copy=False``: the blocks that are W's own rows unchanged (a systematic code's) are views of
        W, for a caller that sends them on before W changes (saves copying W once)."""
        if not isinstance(W, Tensor):
            raise ArgumentTypeError(f"W must be a torch.Tensor, got {type(W).__name__}; pass the weights")
        check_bool(copy, "copy")
        if W.dim() < 1:
            raise ValueError("W must have at least one dimension (rows on dim 0), got a scalar")
        if not W.is_floating_point():
            raise ArgumentTypeError(
                f"W must be a floating-point tensor, got dtype={W.dtype}; convert it with W.float()"
            )
        r = self._rows_per_block(W.shape[0], "W.shape[0]")
        blocks = W.reshape(self.k, r, *W.shape[1:])
        coded = self._encode_blocks(blocks)
        assert len(coded) == self.n
        if copy:
            storage = W.untyped_storage().data_ptr()
            coded = [c.clone() if c.untyped_storage().data_ptr() == storage else c for c in coded]
        # Blocks that are copies of W's own are finite when W is: only the others can overflow
        copies = self._copied_blocks(range(self.n))
        finite = all(map(math.isfinite, frobenius_norms([c for j, c in enumerate(coded) if j not in copies])))
        if not finite and all(map(math.isfinite, frobenius_norms([W]))):
            largest = float(W.abs().max())
            raise ValueError(
                f"encoding W (largest entry {largest:.1e} in magnitude) with {self!r} overflowed {W.dtype}: "
                f"a coded block is Inf or NaN although W is finite; scale W down, encode in float64, or "
                f"{self.stability_hint}"
            )
        return coded

    def decode(
        self, results: Mapping[int, Tensor], rows: int | None = None, *, allow_unstable: bool = False,
        out_dtype: torch.dtype | None = None, certify: bool = True, transposed: bool = False,
    ) -> Tensor:
        """Recover ``W @ X`` (shape (k*r, *trailing)) from the products of any k (or more) workers.

        ``results`` maps worker index -> that worker's ``coded[j] @ X`` (floating point, any strides).
        A result holding NaN or Inf is treated as an erasure (with a ``NonFiniteResultWarning`` naming
        the worker) when k other results remain; otherwise a ``DecodeError`` names the bad workers.
        Every decode is certified (see the module docstring): one whose certified error exceeds the
        warning bound warns once per straggler set with an ``UnstableDecodeWarning``, one whose
        certified error is 1 or more raises ``DecodeError`` -- unless ``allow_unstable`` (for benchmarks
        that time a code whatever its accuracy): then it too returns, with the warning.
        ``out_dtype``: the dtype of the decoded product (default: the results'); half-precision results
        decode in float32, so ``out_dtype=torch.float32`` keeps that precision. ``certify=False`` skips
        certification (no probe, no bound, no warning, no refusal); ``decode_report`` returns the bound.
        ``transposed`` (2-D results (r, N)): the product is laid out as its transpose's row-major tensor
        (the transpose of a contiguous (N, k*r) tensor: W X^T as the view of F.linear's X W^T).
        """
        return self.decode_report(
            results, rows, allow_unstable=allow_unstable, out_dtype=out_dtype, certify=certify,
            transposed=transposed,
        ).product

    def decode_report(
        self, results: Mapping[int, Tensor], rows: int | None = None, *, allow_unstable: bool = False,
        out_dtype: torch.dtype | None = None, certify: bool = True, transposed: bool = False,
    ) -> DecodeReport:
        """``decode``, returning the product with its certified error bound (see ``DecodeReport``)."""
        check_bool(allow_unstable, "allow_unstable")
        check_bool(certify, "certify")
        check_bool(transposed, "transposed")
        if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise TypeError(f"out_dtype must be a floating torch.dtype (or None), got {out_dtype!r}")
        ref, r = self._check_results(results, rows)
        cdtype = compute_dtype(ref.dtype)
        usable = {j: _usable(t, cdtype, any_layout=transposed) for j, t in results.items()}
        # Certifying needs the norm of every result: those copied into the product are read off the
        # product's block norms, the others read with them after the decode (which also shows their
        # NaN/Inf: a decode from them is discarded). Results not read are searched for NaN/Inf only
        # when the product is not finite.
        copied = self._copied_blocks(usable) if certify else {}
        others = [j for j in usable if j not in copied] if certify else []
        trailing = tuple(ref.shape[1:])
        if transposed and len(trailing) != 1:
            raise ValueError(f"transposed=True lays out 2-D results (rows, N), got shape {tuple(ref.shape)}; "
                             "decode with transposed=False")
        if transposed:  # (k, r, N) viewed on a contiguous (N, k*r)
            rows_of = torch.empty((*trailing, self.k * r), dtype=cdtype, device=ref.device)
            out = rows_of.view(*trailing, self.k, r).permute(1, 2, 0)
        else:
            out = torch.empty((self.k, r, *trailing), dtype=cdtype, device=ref.device)
        if torch.is_grad_enabled():  # not differentiated through (coded layers have their own backward)
            with torch.no_grad():
                self._decode_into(usable, r, out)
        else:
            self._decode_into(usable, r, out)
        values = frobenius_norms([usable[j] for j in others], blocks_of=out)
        norms, blocks = dict(zip(others, values, strict=False)), values[len(others):]
        bad = [j for j, v in norms.items() if not math.isfinite(v)]
        product_norm = math.sqrt(sum(v * v for v in blocks))
        if not bad and not math.isfinite(product_norm) and len(others) < len(usable):
            bad = [j for j, t in usable.items() if j not in norms and not bool(torch.isfinite(t).all())]
        if bad:
            good = self._drop_non_finite(results, bad)
            return self.decode_report(
                good, rows=r * self.k, allow_unstable=allow_unstable, out_dtype=out_dtype, certify=certify,
                transposed=transposed,
            )
        workers = tuple(sorted(results))
        if not math.isfinite(product_norm):
            raise DecodeError(
                f"refusing to decode: decoding from workers {list(workers)} overflowed although every "
                f"result was finite: this straggler set is numerically unstable for {self!r} at r={r} rows "
                f"per block, or the results are too large for {ref.dtype}; {self.stability_hint}"
            )
        product = out.reshape(self.k * r, *trailing).to(ref.dtype if out_dtype is None else out_dtype)
        if not certify:
            return DecodeReport(product, math.nan, None)
        cert = self._certificate(workers, r, ref.dtype, ref.device)
        squares = sum(v * v for v in norms.values()) + sum(blocks[i] ** 2 for i in copied.values())
        error = cert.bound_for(math.sqrt(squares), product_norm)
        self._judge(cert, error, allow_unstable)
        return DecodeReport(product, error, cert)

    def certify(
        self,
        workers: Collection[int],
        rows: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Certificate:
        """The certified relative decode error of these workers' results (``rows`` source rows in all,
        results in ``dtype`` on ``device``): the certificate ``decode`` checks, computed on first use
        and cached; it decodes nothing and warns about nothing. Raises ``DecodeError`` when these
        workers cannot decode at all."""
        chosen = check_workers(self, workers)
        r = self._rows_per_block(rows, "rows")
        check_dtype(dtype, "dtype", self.accepts_integer_results)
        dev = check_device(device)
        if not self.can_decode(chosen):
            raise DecodeError(
                f"workers {sorted(chosen)} cannot decode {self!r} (need k={self.k} that determine every "
                "source block); choose more workers"
            )
        return self._certificate(tuple(sorted(chosen)), r, dtype, dev)

    def verify(self, rows: int, samples: int | None = None, **kwargs: Any) -> float:
        """Worst relative decode error over every k-subset of workers (or ``samples`` random ones);
        ``inf`` when some set is refused."""
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
        straggler set and compare with the exact float64 product ``W @ X``. A refused set (or one whose
        decode overflows) is an infinite error; NaN never counts as small."""
        self._rows_per_block(rows, "rows")
        if samples is not None:
            check_int(samples, "samples", 1, "the number of straggler sets to try; None tries all")
        check_int(cols, "cols", 1, "columns of X")
        check_int(inner, "inner", 1, "the inner dimension of W @ X")
        check_dtype(dtype, "dtype", False)
        dev = check_device(device)
        check_int(seed, "seed", None, "the random seed")
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(rows, inner, generator=gen, dtype=torch.float64)
        X = torch.randn(inner, cols, generator=gen, dtype=torch.float64)
        exact = W @ X
        sets, total = straggler_sets(self.n, self.k, samples, seed)
        sets = [subset for subset in sets if self.can_decode(subset)]  # e.g. replication: not every k-set
        if not sets:
            raise ValueError(
                f"none of the {samples} sampled straggler sets can decode {self!r}; raise samples"
            )
        coded = self.encode(W.to(device=dev, dtype=dtype))
        Xd = X.to(device=dev, dtype=dtype)
        products = [c @ Xd for c in coded]
        worst, worst_set = -math.inf, sets[0]
        for subset in sets:
            try:
                with warnings.catch_warnings():  # the report carries the error itself
                    warnings.simplefilter("ignore", UnstableDecodeWarning)
                    decoded = self.decode({j: products[j] for j in subset})
                err = relative_error(decoded.to("cpu", torch.float64), exact)
            except DecodeError:  # refused or overflowed: an infinite error, reported as such
                err = math.inf
            if not err <= worst:  # also catches NaN
                worst, worst_set = (err if err == err else math.inf), subset
                if math.isinf(worst):
                    break
        return VerifyReport(worst, worst_set, len(sets), total)

    # --------------------------------------------------------- certification
    def _certificate(
        self, workers: tuple[int, ...], r: int, dtype: torch.dtype, device: torch.device
    ) -> Certificate:
        cache = self.__dict__.setdefault("_certificates", {})
        key = (workers, r, dtype, device.type)
        cert = cache.get(key)
        if cert is None:
            if len(cache) >= CERTIFICATE_LIMIT:
                cache.clear()
            errors, amplification, noise = self._probe(workers, r, dtype, device)
            cert = cache[key] = Certificate(
                repr(self), workers, r, dtype, device.type, errors, amplification, noise, warning_bound(dtype)
            )
        return cert

    def _judge(self, cert: Certificate, error: float, allow: bool) -> None:
        """Apply the bounds to one decode's certified ``error``: nothing when within the warning bound,
        a warning once per key when above it, a ``DecodeError`` every time from ``REFUSE_ERROR`` on
        (unless ``allow``: then the warning)."""
        status = status_of(error, cert.bound)
        if status == "certified":
            return
        if status == "refused" and not allow:
            raise DecodeError(f"refusing to decode: {cert.describe(error)}; {self.stability_hint}")
        warned = self.__dict__.setdefault("_warned", set())
        key = (cert.workers, cert.rows_per_block, cert.dtype, cert.device_type)
        if key not in warned:
            warned.add(key)
            warnings.warn(
                f"{cert.describe(error)}; the result is returned but may be inaccurate: "
                f"{self.stability_hint}",
                UnstableDecodeWarning,
                stacklevel=4,
            )

    def _probe(
        self, workers: tuple[int, ...], r: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[float, ...], float, float]:
        """Decode one probe of each of ``PROBE_KINDS`` from these workers, as the workers' products are
        computed: source blocks A (float64) encoded exactly, each coded block rounded to ``dtype`` and
        multiplied on ``device`` in ``dtype`` by a random X (inner dimension ``PROBE_INNER``). The kinds
        sit side by side in one decode (their source columns and X are block-diagonal, so each kind's
        output columns depend on its own data only). Returns each kind's relative error against its
        exact float64 answer ``A @ X``, the certified amplification (the absolute decode error per
        unit of the norm of the results used) and the results' own rounding per unit of their norm
        (see ``Certificate``). Not finite: ``inf``.
        """
        kinds = len(PROBE_KINDS)
        cols = -(-PROBE_VALUES // (self.k * r))  # columns per kind: short blocks get more
        gen = torch.Generator().manual_seed(PROBE_SEED)
        if dtype.is_floating_point:
            source = probe_blocks(self.k, r, gen)
            X = torch.randn(kinds, PROBE_INNER, cols, generator=gen, dtype=torch.float64)
            X[1:3].abs_()  # large-mean and ramp: no cancellation in the product itself (that is W @ X's
            X = torch.block_diag(*X)  # own conditioning, which an uncoded product carries as well)
        else:  # small integers: exactly representable, so an exact decoder must return them exactly
            source = torch.randint(-4, 5, (self.k, r, kinds * PROBE_INNER), generator=gen).double()
            X = torch.block_diag(*torch.randint(-4, 5, (kinds, PROBE_INNER, cols), generator=gen).double())
        Xd = X.to(device=device, dtype=dtype)
        cdtype = compute_dtype(dtype)
        coded = self._encode_blocks(source)
        probe = {j: (coded[j].to(device=device, dtype=dtype) @ Xd).to(cdtype).contiguous() for j in workers}
        out = torch.empty((self.k, r, kinds * cols), dtype=cdtype, device=device)
        with torch.no_grad():
            decoded = self._decode_ways(probe, r, out)
        exact = (source @ X).view(-1, kinds, cols)
        error = torch.stack([torch.linalg.vector_norm(d.to("cpu", torch.float64).view(-1, kinds, cols)
                                                      - exact, dim=(0, 2)) for d in decoded]).amax(0)
        got = torch.cat([t.to("cpu", torch.float64).view(-1, kinds, cols) for t in probe.values()])
        wanted = torch.cat([(coded[j] @ X).view(-1, kinds, cols) for j in workers])
        results = torch.linalg.vector_norm(got, dim=(0, 2))
        relative = (error / torch.linalg.vector_norm(exact, dim=(0, 2))).tolist()
        # How far the results themselves are off, per unit of their norm (at least PRODUCT_ROUNDOFFS)
        floor = PRODUCT_ROUNDOFFS * torch.finfo(torch.float64).eps / 2 if dtype.is_floating_point else 0.0
        noise = max(float((torch.linalg.vector_norm(got - wanted, dim=(0, 2)) / results).max()), floor)
        # The certified error per unit of the results' norm: the measured one with its margin, and
        # never below what the decode's operator norm does to the results' own error in the worst
        # direction.
        measured = float((error / results).max())
        amplification = max(PROBE_MARGIN * measured, noise * self._operator_norm(workers))
        if not (math.isfinite(amplification) and all(map(math.isfinite, relative))):
            return tuple(e if math.isfinite(e) else math.inf for e in relative), math.inf, noise
        return tuple(relative), amplification, noise

    def _operator_norm(self, workers: tuple[int, ...]) -> float:
        """A lower bound on the 2-norm of the decode from these workers as a linear map of their results
        (1: every decode copies or reproduces a result); codes that know it exactly override this."""
        return 1.0

    # --------------------------------------------------------------- helpers
    def _rows_per_block(self, rows: int, what: str) -> int:
        check_int(rows, what, None, f"a positive multiple of k={self.k}")
        if rows < self.k or rows % self.k:
            raise ValueError(
                f"{what}={rows} must be a positive multiple of k={self.k} (each worker gets rows/k rows); "
                f"pad to {max(self.k, -(-rows // self.k) * self.k)} rows"
            )
        return rows // self.k

    def _check_results(self, results: Mapping[int, Tensor], rows: int | None) -> tuple[Tensor, int]:
        """Validate ``decode``'s arguments; return the first result and the rows per block."""
        if type(results) is not dict and not isinstance(results, Mapping):
            raise ArgumentTypeError(
                f"results must be a mapping worker -> tensor, got {type(results).__name__}; "
                "pass e.g. {j: coded[j] @ X for j in workers}"
            )
        check_workers(self, list(results), "results")
        for j, res in results.items():
            if not isinstance(res, Tensor):
                raise ArgumentTypeError(
                    f"result of worker {j} must be a torch.Tensor, got {type(res).__name__}"
                )
            if res.dim() < 1:
                raise ValueError(f"result of worker {j} must be a tensor with rows on dim 0, got a scalar")
            if not (res.is_floating_point() or (self.accepts_integer_results and not res.is_complex())):
                raise ArgumentTypeError(
                    f"result of worker {j} has dtype {res.dtype}; {self!r} decodes floating-point "
                    "results only: compute the products in float32/float64 (e.g. coded[j].float() @ X)"
                )
        if len(results) < self.k:
            raise DecodeError(
                f"need results from at least k={self.k} of n={self.n} workers, got {len(results)} "
                f"(workers {sorted(results)}); wait for more workers"
            )
        ref_worker, ref = next(iter(results.items()))
        if rows is None:
            r = self._source_rows(ref_worker, ref.shape[0])
        else:
            r = self._rows_per_block(rows, "rows")
        expected = self._rows_of(r)
        trailing = tuple(ref.shape[1:])
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
                    f"{ref.device}, worker {j} has {res.dtype} on {res.device}; convert them with .to()"
                )
        return ref, r

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


def _checked_block_rows(method: Callable[[Code, int], list[int]]) -> Callable[[Code, int], list[int]]:
    @functools.wraps(method)
    def block_rows(self: Code, r: int) -> list[int]:
        check_int(r, "r", 1, "rows per source block")
        return method(self, r)

    return block_rows


def _checked_can_decode(
    method: Callable[[Code, Collection[int]], bool],
) -> Callable[[Code, Collection[int]], bool]:
    @functools.wraps(method)
    def can_decode(self: Code, workers: Collection[int]) -> bool:
        check_workers(self, workers)
        return method(self, workers)

    return can_decode


def frobenius_norms(tensors: Sequence[Tensor], blocks_of: Tensor | None = None) -> list[float]:
    """The Frobenius norm of each tensor as a float (one synchronisation for all); ``inf`` or ``nan``
    only when the tensor holds Inf or NaN (a norm that overflowed its dtype is taken in float64).
    ``blocks_of``: a tensor whose blocks along dim 0 follow, one norm each, after those of ``tensors``."""
    parts = []
    if tensors:
        # one fused kernel for all (torch's clip_grad_norm_ uses it too); a norm per tensor costs a dispatch
        parts.append(torch.stack(torch._foreach_norm([_floating(t) for t in tensors])))
    if blocks_of is not None:
        count = blocks_of.shape[0]
        if blocks_of.is_contiguous():
            flat = blocks_of.view(count, blocks_of.numel() // count)
            parts.append(torch.linalg.vector_norm(_floating(flat), dim=1))
        else:  # a product laid out as its transpose (``decode(transposed=True)``): along its rows first
            rows = torch.linalg.vector_norm(_floating(blocks_of), dim=1)
            parts.append(torch.linalg.vector_norm(rows.reshape(count, -1), dim=1))
    if not parts:
        return []
    norms = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
    for i, norm in enumerate(norms):
        if not math.isfinite(norm):
            t = tensors[i] if i < len(tensors) else blocks_of[i - len(tensors)]
            if bool(torch.isfinite(t).all()):
                norms[i] = float(torch.linalg.vector_norm(t, dtype=torch.float64))
    return norms


def _floating(t: Tensor) -> Tensor:
    return t if t.is_floating_point() else t.double()


def _usable(t: Tensor, dtype: torch.dtype, any_layout: bool = False) -> Tensor:
    """A result as the decoders take it: detached, in ``dtype``, contiguous (hooks may view it flat;
    only strided or transposed results are copied) unless ``any_layout`` (``_decode_into`` copies
    them into the product as they are, and makes them contiguous for any other decode)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if any_layout or t.is_contiguous() else t.contiguous()


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (Frobenius norm)."""
    exact = exact.double()
    return float(torch.linalg.vector_norm(approx.double() - exact) / torch.linalg.vector_norm(exact))


def straggler_sets(
    n: int, k: int, samples: int | None = None, seed: int = 0, limit: int = 2000
) -> tuple[list[tuple[int, ...]], int]:
    """Every k-subset of range(n), or a random sample of ``samples`` (default: all up to ``limit``)."""
    check_int(k, "k", 1, "the size of each set")
    check_int(n, "n", k, "the number of workers, >= k")
    if samples is not None:
        check_int(samples, "samples", 1, "the number of sets to draw; None draws all")
    check_int(seed, "seed", None, "the random seed")
    check_int(limit, "limit", 1, "the most sets drawn when samples is None")
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
