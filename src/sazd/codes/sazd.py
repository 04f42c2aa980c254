"""SAZD: shift-and-add encoding, zigzag decoding.

Coded block j is ``C_j = sum_i z^{t[j,i]} A_i`` (``z^t A``: A shifted down t rows). Two layouts:

- systematic (default): workers 0..k-1 hold A_0..A_{k-1} unchanged; parity worker k+p holds
  ``P_p = sum_i z^{p*i*g} A_i`` (p = 0..m-1, shift unit g rows). Decoding is a copy while the
  systematic workers answer; when blocks M are missing, the received systematic blocks are
  subtracted from |M| parity blocks, leaving a small Vandermonde system in monomial nodes.
- non-systematic (the paper's form): worker j holds ``sum_i z^{j*i*g} A_i``, j = 0..n-1; decoding
  always solves the k x k system, by planned zigzag peeling (``zigzag.peel``).

The systematic subsystems are solved by ring arithmetic (``zigzag.solve_primal`` / ``solve_dual``):
binomial divisions are strided cumulative sums; a straggler set whose missing blocks and parities are
both irregular (possible only with four or more parity workers) falls back to peeling. Rounding
error walks along chains of r/(g*D) rows, so ``shift_unit`` g trades overhead rows for accuracy;
``"auto"`` picks g from the block length.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

import sazd.codes.zigzag as zigzag
from sazd.codes.base import Code, compute_dtype, empty_in_layout
from sazd.codes.checks import check_bool, check_int

AUTO_CHAIN_ROWS = 256  # "auto" keeps zigzag chains at most this many rows long: g = ceil(r / 256)
MAX_SHIFT_UNIT = 2**16  # "auto" reaches it only at 16M rows per block; larger units only waste memory
# Small decodes run as one product with a dense plan (``SAZD._dense_plan``): a zigzag solve is some
# fifty small tensor operations, whose fixed cost dwarfs the arithmetic of a short block. Plans are
# kept up to this many entries (missing rows x result rows)...
DENSE_ENTRIES = 2**17
# ... and used while the product costs at most this many multiply-adds (entries x result columns);
# one missing block needs no division (a reduction and a shifted copy), so there the plan pays only
# for short blocks.
DENSE_WORK = 2**23
DENSE_WORK_ONE = 2**20
DENSE_PLAN_LIMIT = 1024  # plans kept per code (one per worker set, r, dtype and device)


class SAZD(Code):
    """Shift-and-add code with zigzag decoding; see the module docstring."""

    name = "sazd"
    stability_hint = "use a larger shift_unit or fewer parity workers (see `sazd design`)"

    def __init__(self, n: int, k: int, systematic: bool = True, shift_unit: int | str = "auto") -> None:
        super().__init__(n, k)
        if n <= k:
            raise ValueError(f"SAZD needs n > k (at least one redundant worker), got n={n}, k={k}")
        self.is_systematic = check_bool(systematic, "systematic")
        if isinstance(shift_unit, str):
            if shift_unit != "auto":
                raise ValueError(
                    f"shift_unit must be an integer >= 1 or 'auto', got shift_unit={shift_unit!r}"
                )
        else:
            shift_unit = check_int(shift_unit, "shift_unit", 1, "rows, or 'auto'")
            extra = ((n - k - 1) if self.is_systematic else (n - 1)) * (k - 1)  # last block: extra * g rows
            if shift_unit > MAX_SHIFT_UNIT and extra:
                raise ValueError(
                    f"shift_unit={shift_unit} is too large: the last coded block would get {extra} x "
                    f"{shift_unit} extra rows; use shift_unit <= {MAX_SHIFT_UNIT} or 'auto' "
                    "(see `sazd design`)"
                )
        self.shift_unit = shift_unit

    # ------------------------------------------------------------- geometry
    def shift_for(self, r: int) -> int:
        """Shift unit g (rows) used for source blocks of r rows."""
        check_int(r, "r", 1, "rows per source block")
        if self.shift_unit == "auto":
            return max(1, -(-r // AUTO_CHAIN_ROWS))
        return int(self.shift_unit)

    def block_rows(self, r: int) -> list[int]:
        g = self.shift_for(r)
        rows = []
        for j in range(self.n):
            p = self._coded_row(j)
            rows.append(r if p is None else r + p * (self.k - 1) * g)
        return rows

    def _source_rows(self, worker: int, rows: int) -> int:
        p = self._coded_row(worker)
        if not p or self.k == 1:  # no shifted rows
            return rows
        return _invert_rows(rows, p * (self.k - 1), self.shift_unit)

    # -------------------------------------------------------------- encoding
    def _encode_blocks(self, blocks: Tensor) -> list[Tensor]:
        r = blocks.shape[1]
        g = self.shift_for(r)
        acc = blocks.to(compute_dtype(blocks.dtype))
        coded = [blocks[i] for i in range(self.k)] if self.is_systematic else []
        for p in range(self.m if self.is_systematic else self.n):
            c = empty_in_layout(acc[0], r + p * (self.k - 1) * g)
            if p == 0:
                torch.sum(acc, 0, out=c)
            else:
                c.zero_()
                for i in range(self.k):  # k whole-block adds: C = sum_i z^{p*i*g} A_i
                    c[p * i * g : p * i * g + r] += acc[i]
            coded.append(c.to(blocks.dtype))
        return coded

    # -------------------------------------------------------------- decoding
    def _decode_blocks(self, results: dict[int, Tensor], r: int, out: Tensor) -> None:
        if self._copies(results):
            torch.stack([results[i] for i in range(self.k)], out=out)
            return
        plan = self._dense_plan(results, r, out)
        if plan is not None and 0 < plan.matrix.numel() * (out.numel() // (self.k * r)) <= plan.work_limit:
            plan.decode(results, out)
        else:
            self._decode_zigzag(results, r, out)

    def _decode_ways(self, results: dict[int, Tensor], r: int, out: Tensor) -> list[Tensor]:
        """Zigzag, and where a dense plan exists for these workers, the plan too."""
        if self._copies(results):
            return super()._decode_ways(results, r, out)
        self._decode_zigzag(results, r, out)
        plan = self._dense_plan(results, r, out)
        if plan is None:
            return [out]
        dense = torch.empty_like(out)
        plan.decode(results, dense)
        return [out, dense]

    def _copies(self, results: dict[int, Tensor]) -> bool:
        """Every systematic block answered: the decode is a copy."""
        return self.is_systematic and all(i in results for i in range(self.k))

    def _dense_plan(self, results: dict[int, Tensor], r: int, out: Tensor) -> _DensePlan | None:
        """The decode from these workers as one matrix: the missing source blocks' rows are D @ (the
        results stacked in worker order); None when D would have more than ``DENSE_ENTRIES`` entries.
        D is the zigzag decode of the identity in float64: its entries are integers (sums and
        differences along the zigzag chains), exact in the results' dtype while they stay below 2^24
        (float32), and certified with the rest of the decode. Built once per (workers, r, dtype,
        device)."""
        workers = tuple(sorted(results))
        plans = self.__dict__.setdefault("_dense_plans", {})
        key = (workers, r, out.dtype, out.device)
        if key in plans:
            return plans[key]
        if len(plans) >= DENSE_PLAN_LIMIT:
            plans.clear()
        received = [i for i in range(self.k) if self.is_systematic and i in results]
        missing = [i for i in range(self.k) if i not in received]
        rows = self._rows_of(r)
        total = sum(rows[j] for j in workers)
        plan = None
        if missing and len(missing) * r * total <= DENSE_ENTRIES:
            eye = torch.eye(total, dtype=torch.float64)
            units = dict(zip(workers, eye.split([rows[j] for j in workers]), strict=True))
            D = torch.empty((self.k, r, total), dtype=torch.float64)
            self._decode_zigzag(units, r, D)
            index = torch.tensor(missing + received, device=out.device)
            plan = _DensePlan(D[missing].reshape(-1, total).to(device=out.device, dtype=out.dtype),
                              index[: len(missing)], index[len(missing):],
                              DENSE_WORK if len(missing) > 1 else DENSE_WORK_ONE)
        plans[key] = plan
        return plan

    def _decode_zigzag(self, results: dict[int, Tensor], r: int, out: Tensor) -> None:
        g = self.shift_for(r)
        if not self.is_systematic:
            # Plain zigzag peeling of the k x k system: measured far more accurate here than the
            # divided-difference ring solver (k=8, n=10, r=16, fp32: 2.7e-6 against 4.5e-2).
            missing = list(range(self.k))
            method, chosen = "peel", tuple(sorted(results)[: self.k])
            equations = {q: results[q] for q in chosen}
        else:
            received = [i for i in range(self.k) if i in results]
            missing = [i for i in range(self.k) if i not in results]
            parities = tuple(sorted(j - self.k for j in results if j >= self.k))
            method, chosen = _plan(tuple(missing), parities) if missing else ("copy", ())
            # Solving primal keeps equation 0 as its buffer and ends with A_{missing[0]} in it: when that
            # equation is parity 0 (r rows, no shift), it is reduced right into its final place.
            in_place = {0: out[missing[0]]} if method == "primal" and chosen[0] == 0 else {}
            equations = self._reduce_parities(results, received, chosen, r, g, out, in_place)
            if not missing:
                return
        owned = self.is_systematic  # reduced parities are our own clones; raw results are the caller's
        blocks = _SOLVERS[method](missing, [equations[q] for q in chosen], chosen, r, g, owned)
        for i, block in zip(missing, blocks, strict=True):
            if block.data_ptr() != out[i].data_ptr():
                out[i] = block[:r]

    def _reduce_parities(
        self, results: dict[int, Tensor], received: list[int], chosen: tuple[int, ...], r: int, g: int,
        out: Tensor, dest: dict[int, Tensor],
    ) -> dict[int, Tensor]:
        """Copy the received systematic blocks into ``out`` and subtract them from the chosen parities:
        ``R_q = P_q - sum_{i received} z^{q*i*g} A_i``.

        Once the blocks sit side by side in ``out``, the shifted sum over a run of consecutive blocks
        i0..i1-1 is one matrix product: row t of ``z^{s*i} A_i`` (s = q*g) is ``out[i, t - s*i]``, at
        flat row ``i*(r - s) + t``, so for the rows t that every block of the run covers, the blocks
        are the rows of a strided (run, rows) view with leading dimension ``(r - s)`` rows, and
        ``R_q[t] = P_q[t] - ones @ view`` reads each block once. The few rows that only some blocks of
        the run reach (at most s*(run-1) at each end) are subtracted block by block. ``dest``: buffers
        to reduce some parities into, {q: tensor shaped like P_q}.
        """
        for i in received:
            out[i] = results[i]
        width = out[0].numel() // r  # elements per row
        flat = out.view(-1)
        runs = [list(run) for run in _consecutive_runs(received)]
        reduced = {}
        for q in chosen:
            s = q * g
            R = dest[q] if q in dest else torch.empty_like(results[self.k + q])
            R.copy_(results[self.k + q])
            for run in runs:
                i0, i1 = run[0], run[-1] + 1
                lo, hi = s * (i1 - 1), r + s * i0  # rows every block of the run covers
                if hi > lo and len(run) > 1:
                    view = flat[i0 * (r - s) * width + lo * width :].as_strided(
                        (len(run), (hi - lo) * width), ((r - s) * width, 1))
                    R[lo:hi].view(1, -1).addmm_(view.new_ones(1, len(run)), view, alpha=-1)
                else:
                    lo = hi = s * i0  # no common rows: every row is an edge row
                for i in run:  # the edge rows: [s*i, lo) and [hi, s*i + r)
                    for a, b in ((s * i, min(s * i + r, lo)), (max(s * i, hi), s * i + r)):
                        if b > a:
                            R[a:b].sub_(out[i, a - s * i : b - s * i])
            reduced[q] = R
        return reduced

    def __repr__(self) -> str:
        kind = "systematic" if self.is_systematic else "non-systematic"
        return f"SAZD(n={self.n}, k={self.k}, {kind}, shift_unit={self.shift_unit!r})"


@dataclass(frozen=True, eq=False)
class _DensePlan:
    """A decode as one product: ``matrix`` (rows of the ``missing`` source blocks x result rows) times
    the results stacked in worker order; the ``received`` systematic blocks are the first results."""

    matrix: Tensor
    missing: Tensor  # source block indices, on the results' device
    received: Tensor
    work_limit: int  # used for decodes of at most this many multiply-adds

    def decode(self, results: dict[int, Tensor], out: Tensor) -> None:
        k, r = out.shape[:2]
        width = out.numel() // (k * r)  # elements per row
        stacked = torch.cat([results[j] for j in sorted(results)]).view(-1, width)
        if not len(self.received):  # every block solved: straight into ``out``
            torch.mm(self.matrix, stacked, out=out.view(k * r, width))
            return
        blocks = out.view(k, r * width)
        solved = self.matrix @ stacked
        blocks.index_copy_(0, self.missing, solved.view(len(self.missing), r * width))
        copied = stacked[: len(self.received) * r].view(len(self.received), r * width)
        blocks.index_copy_(0, self.received, copied)


def _solve_primal(missing, equations, chosen, r, g, owned):
    """missing = a, a+s, ...: R_q shifted up g*q*a rows are values of a polynomial at z^{g*q*s}."""
    a, step = missing[0], _common_step(missing)
    values = [eq[g * q * a :] for eq, q in zip(equations, chosen, strict=True)]
    return zigzag.solve_primal(values, [g * q * step for q in chosen], owned, rows=r)


def _solve_dual(missing, equations, chosen, r, g, owned):
    """equations q0 + d*v: a dual Vandermonde system in nodes z^{g*d*i} for z^{g*q0*i} A_i."""
    q0, d = chosen[0], chosen[1] - chosen[0]
    shifted = zigzag.solve_dual(equations, [g * d * i for i in missing], owned)
    return [block[g * q0 * i :] for block, i in zip(shifted, missing, strict=True)]


def _solve_peel(missing, equations, chosen, r, g, owned):
    """General zigzag peeling, planned once per shift pattern and executed in waves. Peeling can
    amplify rounding errors exponentially along its chains; like every decode, it is certified by the
    probe in ``Code`` (warning or refusal) before a result is returned."""
    offsets = tuple(tuple(g * q * i for i in missing) for q in chosen)
    return zigzag.peel(equations, offsets, r)


_SOLVERS = {"primal": _solve_primal, "dual": _solve_dual, "peel": _solve_peel}


@lru_cache(maxsize=4096)
def _plan(missing: tuple[int, ...], available: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Which |missing| equations (parity indices) to use and which solver; depends only on the set."""
    e = len(missing)
    if _common_step(list(missing)) is not None:
        return "primal", tuple(_spread_subset(list(available), e))
    chosen = _arithmetic_subset(list(available), e)
    if chosen is not None:
        return "dual", tuple(chosen)
    return "peel", available[:e]


def _consecutive_runs(values: list[int]) -> list[range]:
    """Sorted ``values`` split into runs of consecutive integers."""
    runs: list[range] = []
    for v in values:
        if runs and runs[-1].stop == v:
            runs[-1] = range(runs[-1].start, v + 1)
        else:
            runs.append(range(v, v + 1))
    return runs


def _common_step(values: list[int]) -> int | None:
    """The step s if ``values`` (sorted) is an arithmetic progression (any 1 or 2 values are)."""
    if len(values) == 1:
        return 1
    step = values[1] - values[0]
    ok = all(b - a == step for a, b in itertools.pairwise(values))
    return step if ok else None


def _arithmetic_subset(values: list[int], size: int) -> list[int] | None:
    """An arithmetic progression of ``size`` members of ``values`` with the largest step, if any."""
    if size == 1:
        return values[:1]
    present = set(values)
    for step in range(values[-1] - values[0], 0, -1):
        for start in values:
            candidate = [start + step * v for v in range(size)]
            if all(c in present for c in candidate):
                return candidate
    return None


def _spread_subset(values: list[int], size: int) -> list[int]:
    """``size`` of the equations, widely spread (larger node gaps mean shorter zigzag chains)."""
    return _arithmetic_subset(values, size) or values[:size]


@lru_cache(maxsize=4096)
def _invert_rows(rows: int, extra_per_g: int, shift_unit: int | str) -> int:
    """Source rows r with ``r + extra_per_g * g(r) == rows``."""
    candidates = [int(shift_unit)] if shift_unit != "auto" else range(1, rows // extra_per_g + 2)
    for g in candidates:
        r = rows - extra_per_g * g
        if r >= 1 and (shift_unit != "auto" or max(1, -(-r // AUTO_CHAIN_ROWS)) == g):
            return r
    raise ValueError(
        f"a result with {rows} rows is too short for this worker's coded block "
        f"({extra_per_g} x shift unit extra rows); pass each worker's product coded[j] @ X unchanged"
    )
