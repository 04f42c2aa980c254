"""Cyclic shift-and-add code: circulant-permutation embedding over a prime q.

Why not zero-padded shifts. With shifts ``z^t`` that push rows off into zero padding and all
coefficients +1, the system left by m' missing blocks has a determinant (a polynomial in z) with a
root at z = 1 of multiplicity >= m' - 1: the lowest-frequency content is divided by (z - 1)^(m'-1),
so rounding errors grow like L^(m'-1) along chains of L rows (see docs/numerics.md).

The embedding. Pick a prime q. Each source block ``A_i`` (r rows) is zero-padded to (q-1)*s rows,
s = ceil(r / (q-1)), and cut into q-1 sub-blocks of s rows; a q-th sub-block equal to minus the sum
of the others is appended. A coded block stores its q*s rows followed by one zero row per padding
row ((q-1)*s - r < q-1 of them), so its length tells r. The extended block ``Ã_i`` (q sub-blocks)
sums to zero over its sub-blocks.
``P`` is the cyclic shift by one sub-block (sub-block t moves to t+1 mod q). Coded block
``C_c = sum_i P^{e[c,i]} Ã_i``: encoding adds cyclically shifted sub-blocks, nothing else.

The math of decoding is the Fourier domain along the sub-block axis (length q): ``P^e`` becomes
multiplication by ``w^{-f e}`` (w = exp(2 pi i / q)); frequency 0 is zero for every extended block
(its sub-blocks sum to zero), and each other frequency f is an independent small system
``Ĉ_c(f) = sum_i w^{-f e[c,i]} Â_i(f)`` in Vandermonde form with nodes on the unit circle.

- systematic (default): workers 0..k-1 hold the plain ``A_i`` (r rows); parity worker k+c holds
  ``sum_i P^{p_c*i} Ã_i`` (q*s rows), with row multipliers p_c chosen by ``searched_rows``. With
  every systematic worker present decoding is a copy; with blocks M missing, the received blocks
  are subtracted (shifted, in place of the unknowns) from |M| parities and only the |M| x |M|
  system per frequency is solved. Nodes ``w^{f i}``, i < k: any prime q >= k keeps them distinct;
  the smallest such q spreads them round the whole circle, which is also the best conditioned
  (docs/numerics.md has the measured amplification per q).
- non-systematic: worker j holds ``sum_i P^{j*i} Ã_i`` (needs q >= n); every decode solves k x k.

The decode plan of a received set (which parities, and the inverse of every frequency's subsystem)
is computed once in float64 and cached per (received set, dtype, device). Its rfft -> per-frequency
solve -> inverse rfft is linear, so the plan stores it as one small real matrix applied with a GEMM
(t*q columns for t missing blocks: faster than three passes of FFT, solve and inverse FFT).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from sazd.codes.base import Code, DecodeError, compute_dtype

# A subsystem whose inverse has a 2-norm above this is treated as singular (float64 cannot solve it).
SINGULAR_NORM = 1e8
ROW_CHOICES = ("auto", "consecutive")
_MDS_CHECK_LIMIT = 20000  # square parity submatrices checked when choosing q automatically
_CHOICE_LIMIT = 64  # parity subsets compared when more parities than missing blocks were received


def is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


@dataclass(frozen=True)
class _Plan:
    """Decode from one received set: the coded blocks of workers ``coded`` give blocks ``missing``."""

    missing: tuple[int, ...]
    coded: tuple[int, ...]
    solve: Tensor  # (t*(q-1), t*q): reduced coded blocks -> missing sub-blocks
    amplification: float  # largest inverse 2-norm over frequencies


class Cyclic(Code):
    """Shift-and-add code with cyclic shifts of q sub-blocks; see the module docstring."""

    name = "cyclic"
    stability_hint = "use the systematic form with the default q (see `sazd design`)"
    _CACHE_LIMIT = 4096

    def __init__(
        self, n: int, k: int, q: int | str = "auto", systematic: bool = True, rows: str = "auto"
    ) -> None:
        super().__init__(n, k)
        if n <= k:
            raise ValueError(f"the cyclic code needs n > k (at least one redundant worker), got n={n}, k={k}")
        if not isinstance(systematic, bool):
            raise TypeError(f"systematic must be a bool, got {type(systematic).__name__}")
        self.is_systematic = systematic
        if rows not in ROW_CHOICES:
            raise ValueError(f"rows must be one of {list(ROW_CHOICES)}, got rows={rows!r}")
        least = k if systematic else n  # nodes w^{p*i} must be distinct: i < k (systematic), p < n
        if q == "auto":
            q = _auto_q(k, self.m, least, systematic)
        elif not isinstance(q, int) or isinstance(q, bool):
            raise TypeError(f"q must be a prime integer or 'auto', got {type(q).__name__}")
        elif not is_prime(q) or q < max(least, 3):
            raise ValueError(
                f"q must be a prime >= {max(least, 3)} ({'k' if systematic else 'n'} or more, so that the "
                f"shift nodes are distinct), got q={q}; use q='auto'"
            )
        self.q = q
        if not systematic:
            self._rows = tuple(range(n))  # q >= n: every row p < n is a distinct node
        elif rows == "consecutive" or self.m <= 2:  # any two rows are equivalent to {0, 1}
            self._rows = tuple(range(self.m))
        else:
            self._rows = searched_rows(k, self.m, q)
        self.rows = rows
        self._exponents = _exponent_table(self._rows, k, q)  # (coded rows, k) shifts in sub-blocks
        self._plans: dict[tuple, _Plan] = {}

    # ------------------------------------------------------------- geometry
    def sub_rows(self, r: int) -> int:
        """Rows s of each sub-block for source blocks of r rows (padding r up to (q-1)*s)."""
        return -(-r // (self.q - 1))

    def block_rows(self, r: int) -> list[int]:
        s = self.sub_rows(r)
        coded = self.q * s + (self.q - 1) * s - r  # q sub-blocks, then one zero row per padding row
        return [r if self._coded_row(j) is None else coded for j in range(self.n)]

    def _source_rows(self, worker: int, rows: int) -> int:
        if self._coded_row(worker) is None:
            return rows
        # rows = q*s + pad with pad = (q-1)*s - r < q - 1: the trailing zero rows make r readable
        s, pad = divmod(rows, self.q)
        if s < 1 or pad >= self.q - 1:
            raise ValueError(
                f"a result of worker {worker} has {rows} rows, which no coded block of {self!r} has; pass "
                "each worker's product coded[j] @ X unchanged"
            )
        return (self.q - 1) * s - pad

    # -------------------------------------------------------------- encoding
    def _encode_blocks(self, blocks: Tensor) -> list[Tensor]:
        q, r = self.q, blocks.shape[1]
        flat = blocks.to(compute_dtype(blocks.dtype)).reshape(self.k, -1)  # block i: its r rows, flat
        width = flat.shape[1] // r
        size = self.sub_rows(r) * width  # elements per sub-block
        sums = _sub_block_sums(flat, size)  # Ã_i's last sub-block is -sums[i]
        coded = [blocks[i] for i in range(self.k)] if self.is_systematic else []
        for e in self._exponents.tolist():
            c = flat.new_zeros((self.block_rows(r)[-1], width))  # q*s rows, then the padding rows
            ring = c.view(-1)[: q * size]
            _add_shifted(ring, flat, [shift * size for shift in e], range(self.k))
            _add_shifted(ring, -sums, [(q - 1 + shift) % q * size for shift in e], range(self.k))
            coded.append(c.view(-1, *blocks.shape[2:]).to(blocks.dtype))
        return coded

    # -------------------------------------------------------------- decoding
    def _decode_blocks(self, results: dict[int, Tensor], r: int, out: Tensor) -> None:
        plain = [i for i in range(self.k) if self.is_systematic and i in results]
        for i in plain:
            out[i] = results[i]
        if len(plain) == self.k:
            return
        plan = self._plan(tuple(sorted(results)), out.dtype, out.device)
        q, t = self.q, len(plan.missing)
        flat = out.view(self.k, -1)
        size = self.sub_rows(r) * (flat.shape[1] // r)
        # R_c = C_c - sum_{i received} P^{e[c,i]} Ã_i: shifted subtractions of the received blocks
        reduced = torch.stack([results[j].reshape(-1)[: q * size] for j in plan.coded])
        if plain:
            sums = _sub_block_sums(flat, size)[plain]  # the received blocks' last sub-blocks: -sums
            for c, j in enumerate(plan.coded):
                e = self._exponents[self._coded_row(j)][plain].tolist()
                _add_shifted(reduced[c], flat, [shift * size for shift in e], plain, alpha=-1.0)
                _add_shifted(reduced[c], sums, [(q - 1 + shift) % q * size for shift in e],
                             range(len(plain)))  # fmt: skip
        solved = plan.solve @ reduced.view(t * q, size)  # the Fourier solve of every frequency at once
        solved = solved.view(t, -1)  # row a: the q-1 sub-blocks of missing block a, padding last
        for a, i in enumerate(plan.missing):
            flat[i] = solved[a, : flat.shape[1]]

    def _plan(self, received: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Plan:
        key = (received, dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            master = self._plans.get((received, torch.float64, None)) or self._make_plan(received)
            plan = _Plan(master.missing, master.coded, master.solve.to(device, dtype), master.amplification)
            if len(self._plans) >= self._CACHE_LIMIT:
                self._plans.clear()
            self._plans[(received, torch.float64, None)] = master  # the float64 CPU plan, for other dtypes
            self._plans[key] = plan
        return plan

    def _make_plan(self, received: tuple[int, ...]) -> _Plan:
        """The Fourier-domain left inverse of the missing blocks' equations as one real matrix, in
        float64, for the best-conditioned choice of parities."""
        missing = tuple(i for i in range(self.k) if not (self.is_systematic and i in received))
        coded = [j for j in received if self._coded_row(j) is not None]
        best: _Plan | None = None
        for chosen in itertools.islice(itertools.combinations(coded, len(missing)), _CHOICE_LIMIT):
            e = self._exponents[[self._coded_row(j) for j in chosen]][:, list(missing)]
            solve, amplification = _left_inverse(e, self.q)
            if best is None or amplification < best.amplification:
                best = _Plan(missing, chosen, solve, amplification)
        if best is None or not best.amplification <= SINGULAR_NORM:
            raise DecodeError(
                f"workers {list(received)} do not determine source blocks {list(missing)} of {self!r}: "
                f"the cyclic-shift system is singular for every choice of parities; {self.stability_hint}"
            )
        return best

    def condition(self, workers: Collection[int]) -> float:
        """Largest 2-norm over frequencies of the inverse the decoder applies for this received set: how
        much it can amplify the rounding errors of the used products (1 for a copy)."""
        received = tuple(sorted(set(workers)))
        if self.is_systematic and all(i in received for i in range(self.k)):
            return 1.0
        return self._plan(received, torch.float64, torch.device("cpu")).amplification

    def __repr__(self) -> str:
        kind = "systematic" if self.is_systematic else "non-systematic"
        return f"Cyclic(n={self.n}, k={self.k}, q={self.q}, {kind}, rows={self._rows})"

    @property
    def parity_rows(self) -> tuple[int, ...]:
        """The row multipliers p: coded row c shifts block i by ``p_c * i`` sub-blocks (mod q)."""
        return self._rows


def _add_shifted(
    ring: Tensor, blocks: Tensor, offsets: list[int], which: Collection[int], alpha: float = 1.0
) -> None:
    """``ring[(o + x) % len(ring)] += alpha * blocks[b, x]`` for b in ``which`` with o its offset: a
    cyclic shift on the flat q sub-blocks, two contiguous slices per block (a block shorter than q-1
    sub-blocks is its zero padding left out)."""
    size = ring.shape[0]
    for b, o in zip(which, offsets, strict=True):
        block = blocks[b]
        head = min(block.shape[0], size - o)  # elements landing at o.., the rest wrap round to 0
        ring[o : o + head].add_(block[:head], alpha=alpha)
        if head < block.shape[0]:
            ring[: block.shape[0] - head].add_(block[head:], alpha=alpha)


def _sub_block_sums(flat: Tensor, size: int) -> Tensor:
    """(b, L) -> (b, size): the sum of each row's consecutive sub-blocks of ``size`` elements (the
    last one zero-padded), without copying the blocks."""
    full = flat.shape[1] // size
    sums = flat[:, : full * size].reshape(flat.shape[0], full, size).sum(1)
    rest = flat.shape[1] - full * size
    if rest:
        sums[:, :rest] += flat[:, full * size :]
    return sums


def _left_inverse(exponents: np.ndarray, q: int) -> tuple[Tensor, float]:
    """The real (t*(q-1), t*q) matrix taking reduced coded blocks ``R_c = sum_i P^{e[c,i]} Ã_i`` (t of
    them, q sub-blocks each) to the first q-1 sub-blocks of the t unknown ``Ã_i``, and the largest
    inverse 2-norm over frequencies (inf when a frequency's system is singular).

    It is the Fourier solve applied to the unit vectors: rfft along the sub-block axis, the inverse of
    ``[w^{-f e}]`` at each frequency f >= 1 (frequency 0 of every Ã is zero), inverse rfft. Plans are
    tiny: numpy (single-threaded) computes them in float64."""
    t = exponents.shape[0]
    system = _spectrum(exponents, q)  # (F-1, t, t)
    smallest = float(np.linalg.svd(system, compute_uv=False)[..., -1].min())
    if not smallest * SINGULAR_NORM > 1:
        return torch.zeros(t * (q - 1), t * q, dtype=torch.float64), math.inf
    basis = np.fft.rfft(np.eye(t * q).reshape(t, q, t * q), axis=1)
    solved = np.zeros_like(basis)
    solved[:, 1:] = np.einsum("fab,bfx->afx", np.linalg.inv(system), basis[:, 1:])
    unknowns = np.fft.irfft(solved, n=q, axis=1)  # (t, q, t*q)
    return torch.from_numpy(unknowns[:, : q - 1].reshape(t * (q - 1), t * q).copy()), 1 / smallest


def _spectrum(exponents: np.ndarray, q: int) -> np.ndarray:
    """``[w^{-f e}]`` for every nonzero rfft frequency f = 1..q//2: shape (..., F-1, rows, cols)."""
    f = np.arange(1, q // 2 + 1)
    return np.exp((-2j * np.pi / q) * f[:, None, None] * exponents[..., None, :, :])


def _exponent_table(rows: Sequence[int], k: int, q: int) -> np.ndarray:
    """e[c, i] = rows[c] * i mod q: coded row c shifts block i by that many sub-blocks."""
    return np.outer(np.asarray(rows, dtype=np.int64), np.arange(k)) % q


_SEARCH_LIMIT = 400  # candidate row sets scored by searched_rows


@lru_cache(maxsize=256)
def searched_rows(k: int, m: int, q: int) -> tuple[int, ...]:
    """Parity row multipliers {0, 1, a, ...} (m of them) minimising the worst root-mean-square over
    frequencies of the inverse norm of every square parity subsystem (the decode error amplification).

    Scaling all rows by a unit mod q permutes frequencies and adding a constant multiplies columns by
    unimodular factors, so every set is equivalent to one holding 0 and 1; consecutive rows, the
    obvious choice, put clustered nodes against the smallest spread of exponents (docs/numerics.md).
    """
    best = (_amplification(tuple(range(m)), k, q), tuple(range(m)))
    classes = {_canonical((0, 1, *rest), q) for rest in itertools.combinations(range(2, q), m - 2)}
    for rows in itertools.islice(sorted(classes), _SEARCH_LIMIT):
        best = min(best, (_amplification(rows, k, q, bound=best[0]), rows))
    return best[1]


def _canonical(rows: tuple[int, ...], q: int) -> tuple[int, ...]:
    """The smallest of the equivalent row sets u * (rows - c) (mod q) that contain 0 and 1."""
    images = []
    for a, b in itertools.permutations(rows, 2):
        u = pow(b - a, -1, q)  # maps a -> 0, b -> 1
        images.append(tuple(sorted(u * (p - a) % q for p in rows)))
    return min(images)


def _amplification(rows: tuple[int, ...], k: int, q: int, bound: float = math.inf) -> float:
    """max over square submatrices (parity rows x missing blocks) of the RMS over frequencies of the
    inverse 2-norm; translations of the missing blocks are equivalent, so the first is block 0.
    Stops (returning inf) as soon as it exceeds ``bound``."""
    e = _exponent_table(rows, k, q)
    worst = 0.0
    for t in range(min(len(rows), k), 0, -1):  # the largest subsystems are the worst: test them first
        sub_rows = np.array(list(itertools.combinations(range(len(rows)), t)))
        cols = np.array([(0, *c) for c in itertools.combinations(range(1, k), t - 1)])
        sub = e[sub_rows[:, None, :, None], cols[None, :, None, :]]
        smallest = np.linalg.svd(_spectrum(sub, q), compute_uv=False)[..., -1]
        if not float(smallest.min()) * SINGULAR_NORM > 1:
            return math.inf
        worst = max(worst, float(np.sqrt((smallest**-2.0).mean(-1)).max()))
        if worst > bound:
            return math.inf
    return worst


def _auto_q(k: int, m: int, least: int, systematic: bool) -> int:
    """Smallest prime q >= max(least, 3) whose parity subsystems are all invertible (checked when
    their number is small enough; rows p*i repeat when m > q, so q > m - 1 as well)."""
    q = max(least, m, 3)
    while True:
        if is_prime(q) and (not systematic or _systematic_mds(k, m, q)):
            return q
        q += 1


def _systematic_mds(k: int, m: int, q: int) -> bool:
    """Every square submatrix of the parity exponents (rows p < m, columns i < k) invertible at every
    frequency; assumed (not checked) when there are more than _MDS_CHECK_LIMIT of them."""
    count = sum(math.comb(m, t) * math.comb(k, t) for t in range(1, min(m, k) + 1))
    if count > _MDS_CHECK_LIMIT:
        return True
    e = _exponent_table(range(m), k, q)
    for t in range(1, min(m, k) + 1):
        rows = np.array(list(itertools.combinations(range(m), t)))  # (R, t)
        cols = np.array(list(itertools.combinations(range(k), t)))  # (C, t)
        sub = e[rows[:, None, :, None], cols[None, :, None, :]]  # (R, C, t, t)
        if not float(np.linalg.svd(_spectrum(sub, q), compute_uv=False)[..., -1].min()) * SINGULAR_NORM > 1:
            return False
    return True
