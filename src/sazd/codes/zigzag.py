"""Zigzag decoding as whole-tensor polynomial arithmetic over the ring of polynomials in z.

A polynomial is a tensor ``P`` of shape (L, *trailing): row q holds the coefficient of z^q, so
``z^s P`` is ``P`` shifted down by s rows. The systems to solve are Vandermonde systems whose nodes
are monomials z^e, so every division the solver needs is by a binomial ``z^e_a - z^e_b =
z^e_b (z^D - 1)``: a shift up by e_b rows and a division by (z^D - 1), which is a strided
cumulative sum (``u[q] = u[q-D] - t[q]``). That is exactly zigzag peeling, done as one ``cumsum``
over a (L/D, D, ...) view instead of a Python loop over rows.

Solvers (Golub & Van Loan, Algorithms 4.6.1 and 4.6.2, with the ring operations above):
- ``solve_primal``: values ``R_l = sum_i y_l^i A_i`` at nodes y_l = z^{e_l} (interpolation).
- ``solve_dual``:   ``R_s = sum_i x_i^s A_i`` for s = 0..E-1, nodes x_i = z^{e_i} per unknown.
``peel`` is the general zigzag decoder for shift patterns that are neither (planned once, executed
in waves); SAZD only needs it for rare straggler sets with four or more parity workers.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


def sub_shifted(p: Tensor, q: Tensor, s: int = 0, inplace: bool = False) -> Tensor:
    """``p - z^s q`` (lengths need not match); in place in ``p`` when allowed and ``p`` is long enough."""
    if inplace and p.shape[0] >= q.shape[0] + s:
        p[s : s + q.shape[0]] -= q
        return p
    length = max(p.shape[0], q.shape[0] + s)
    out = p.new_zeros((length, *p.shape[1:]))
    out[: p.shape[0]] = p
    out[s : s + q.shape[0]] -= q
    return out


def div_binomial(t: Tensor, v: int, d: int, minus: Tensor | None = None) -> Tensor:
    """Exact quotient ``t / (z^v (z^d - 1))`` of a polynomial divisible by it (of ``t - minus`` when
    ``minus`` is given: the difference is formed in the division's own buffer).

    Dropping the lowest v rows divides by z^v. For (z^d - 1) u = t', each residue class mod d is
    a chain ``u[q] = u[q-d] - t'[q]``, i.e. ``u = -cumsum`` along the chain. Rounding error walks
    along a chain, so the upper half of the quotient is taken from the other end of the chain
    (``u[q] = u[q+d] + t'[q+d]``, which equals the forward sum plus the chain total): the longest
    walk is half a chain.
    """
    if d <= 0 or v < 0:
        raise ValueError(f"binomial z^{v}(z^{d} - 1) needs d > 0 and v >= 0")
    tp = t[v:]
    rows = max(tp.shape[0], 0 if minus is None else minus.shape[0] - v)
    length = rows - d
    if length <= 0:
        return t.new_zeros((0, *t.shape[1:]))
    chains = -(-rows // d)  # chain steps: rows of the (steps, d, ...) view
    blocks = -(-chains // SCAN_BLOCK)
    u = t.new_empty((blocks * SCAN_BLOCK * d, *t.shape[1:]))
    mp = t[:0] if minus is None else minus[v:]
    both = min(tp.shape[0], mp.shape[0])
    torch.sub(tp[:both], mp[:both], out=u[:both])  # t' = t - minus, formed in place
    u[both : tp.shape[0]] = tp[both:]
    if mp.shape[0] > both:
        torch.neg(mp[both:], out=u[both : mp.shape[0]])
    u[max(tp.shape[0], mp.shape[0]) :] = 0
    steps = u.view(blocks, SCAN_BLOCK, -1)
    carry, top = _blocked_scan_(steps)  # running sums inside blocks; block carries; chain totals
    # A row of the full prefix sum F is its in-block sum plus its block's carry. The lower blocks
    # take u = -F, the upper ones u = top - F (measured from the other end), in one pass each.
    low = round((-(-length // d) / 2) / SCAN_BLOCK)  # blocks taken from the lower end
    torch.sub(carry[:low].neg().unsqueeze(1), steps[:low], out=steps[:low])
    torch.sub((top - carry[low:]).unsqueeze(1), steps[low:], out=steps[low:])
    return u[:length]


SCAN_BLOCK = 8


def _blocked_scan_(v: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix sums over the first two dims of ``v`` (blocks, SCAN_BLOCK, width), by blocks: in place,
    the running sum inside each block (7 strided adds over 1/8 of the data each); returned, each
    block's carry (the sum of all earlier blocks: one small matrix product for up to
    ``GEMM_CARRY_BLOCKS`` blocks, else a log-depth doubling scan of the block totals) and the grand
    total. The inclusive prefix sum is ``v + carry[:, None]``; the caller adds the
    carry in its own final pass. About two passes over memory, against ``cumsum(0)``'s slow strided
    kernel on CPU; on GPU every step is a parallel kernel. Rounding grows with the block length (8)
    plus the number of blocks (at most 40 summed directly, else log-depth), not with the chain.
    """
    for i in range(1, v.shape[1]):
        v[:, i] += v[:, i - 1]
    totals = v[:, -1]
    if v.shape[0] <= GEMM_CARRY_BLOCKS:  # few blocks: all carries in one small matrix product
        carry = _strictly_lower_ones(v.shape[0], v.dtype, v.device) @ totals
        return carry, carry[-1] + totals[-1]
    inclusive = _doubling_scan(totals)
    carry = torch.cat([torch.zeros_like(inclusive[:1]), inclusive[:-1]])
    return carry, inclusive[-1]


GEMM_CARRY_BLOCKS = 40  # up to here one (blocks x blocks) product beats log2(blocks) small passes


@lru_cache(maxsize=64)
def _strictly_lower_ones(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """L[i, j] = 1 for j < i: ``L @ totals`` sums the blocks before each block."""
    return torch.ones(size, size, dtype=dtype, device=device).tril_(-1)


def _doubling_scan(x: Tensor) -> Tensor:
    """Inclusive prefix sum along dim 0 by log-depth doubling (Hillis-Steele)."""
    src = x.clone()
    dst = torch.empty_like(src)
    step = 1
    while step < src.shape[0]:
        dst[:step] = src[:step]
        torch.add(src[step:], src[:-step], out=dst[step:])
        src, dst = dst, src
        step *= 2
    return src


def solve_primal(
    values: list[Tensor], exps: list[int], owned: bool = False, rows: int | None = None
) -> list[Tensor]:
    """Coefficients A_0..A_{E-1} of ``P(y) = sum_i A_i y^i`` from values ``P(z^{e_l})``.

    Newton divided differences (each a binomial division), then Newton -> monomial form (shifts and
    subtractions only). ``exps`` must be strictly increasing. ``owned``: the caller's ``values`` may
    be overwritten (saves copies; with ``rows``, A_0 ends in the buffer of ``values[0]``). ``rows``:
    only the lowest ``rows`` rows of each A_i are wanted; the monomial phase is a ring operation, so
    it works modulo z^rows.
    """
    c = list(values)
    count = len(c)
    mine = [owned] * count
    for s in range(1, count):
        for l in range(count - 1, s - 1, -1):
            c[l] = div_binomial(c[l], exps[l - s], exps[l] - exps[l - s], minus=c[l - 1])
            mine[l] = True
    if rows is not None:
        c = [coef[:rows] for coef in c]
    for s in range(count - 2, -1, -1):
        for l in range(s, count - 1):
            higher = c[l + 1] if rows is None else c[l + 1][: max(0, rows - exps[s])]
            c[l] = sub_shifted(c[l], higher, exps[s], inplace=mine[l])
            mine[l] = True
    return c


def solve_dual(values: list[Tensor], exps: list[int], owned: bool = False) -> list[Tensor]:
    """Unknowns ``A_i`` of ``R_s = sum_i z^{s e_i} A_i`` (s = 0..E-1) for increasing ``exps``."""
    b = list(values)
    count = len(b)
    mine = [owned] * count
    for s in range(count - 1):
        for l in range(count - 1, s, -1):
            b[l] = sub_shifted(b[l], b[l - 1], exps[s], inplace=mine[l])
            mine[l] = True
    for s in range(count - 2, -1, -1):
        for l in range(s + 1, count):
            b[l] = div_binomial(b[l], exps[l - s - 1], exps[l] - exps[l - s - 1])
            mine[l] = True
        for l in range(s, count - 1):
            b[l] = sub_shifted(b[l], b[l + 1], inplace=mine[l])
            mine[l] = True
    return b


# --------------------------------------------------------------------------- general peeling
@lru_cache(maxsize=256)
def peel_plan(offsets: tuple[tuple[int, ...], ...], rows: int) -> list[tuple[np.ndarray, ...]]:
    """Waves of a zigzag peeling order for ``R_v = sum_u z^{offsets[v][u]} A_u`` (A_u has ``rows`` rows).

    Each wave lists unknown rows that some equation row determines alone, given earlier waves.
    Returned per wave: (unknown flat index, equation flat index, other-unknown flat indices (W, E)),
    where flat indices address the stacked unknowns (E*rows, plus one zero row at E*rows) and the
    stacked equations (E*length). The order depends only on the shifts, never on the data. Planning
    is incremental (each solved row decrements the unknown counts of the E equation rows it is in).
    """
    off = np.asarray(offsets, dtype=np.int64)  # (E_eq, E_unknown)
    n_eq, n_unk = off.shape
    length = rows + int(off.max())
    zero_row = n_unk * rows
    src = np.arange(length)[None, :, None] - off[:, None, :]  # (eq, row, unknown) -> source row
    valid = (src >= 0) & (src < rows)
    flat = np.where(valid, np.arange(n_unk)[None, None, :] * rows + src, zero_row).reshape(-1, n_unk)
    unknown_count = valid.sum(-1).reshape(-1)  # per equation row
    known = np.zeros(n_unk * rows + 1, dtype=bool)
    known[zero_row] = True
    waves: list[tuple[np.ndarray, ...]] = []
    solved = 0
    while solved < n_unk * rows:
        eq_index = np.nonzero(unknown_count == 1)[0]
        if eq_index.size == 0:
            raise ValueError("shift pattern is not zigzag decodable (no equation with a single unknown)")
        cand = flat[eq_index]  # (W, E)
        which = np.argmax(~known[cand], axis=1)
        target, first = np.unique(cand[np.arange(len(cand)), which], return_index=True)
        eq_index, cand, which = eq_index[first], cand[first], which[first]
        others = cand.copy()
        others[np.arange(len(others)), which] = zero_row
        waves.append((target, eq_index, others))
        known[target] = True
        solved += len(target)
        # every equation row containing a newly known unknown row has one unknown fewer
        u, s = np.divmod(target, rows)
        eq_rows = (np.arange(n_eq)[:, None] * length + s[None, :] + off[:, u]).reshape(-1)
        np.subtract.at(unknown_count, eq_rows, 1)
    return waves


def peel(equations: list[Tensor], offsets: tuple[tuple[int, ...], ...], rows: int) -> list[Tensor]:
    """Solve ``R_v = sum_u z^{offsets[v][u]} A_u`` by planned zigzag peeling (vectorised per wave)."""
    n_unk = len(offsets[0])
    length = rows + max(max(o) for o in offsets)
    trailing = equations[0].shape[1:]
    eqs = equations[0].new_zeros((len(equations), length, *trailing))
    for v, eq in enumerate(equations):
        eqs[v, : min(length, eq.shape[0])] = eq[:length]
    eqs = eqs.view(len(equations) * length, *trailing)
    unknown = eqs.new_zeros((n_unk * rows + 1, *trailing))
    device = eqs.device
    for target, eq_index, others in peel_plan(offsets, rows):
        t = torch.as_tensor(target, device=device)
        o = torch.as_tensor(others, device=device)
        unknown[t] = eqs[torch.as_tensor(eq_index, device=device)] - unknown[o].sum(1)
    return list(unknown[: n_unk * rows].view(n_unk, rows, *trailing))
