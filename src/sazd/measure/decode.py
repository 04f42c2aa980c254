"""The worst decode error of a code over straggler sets: which sets, and how it is measured.

:func:`hard_sets` lists the straggler sets that are hardest for zigzag decoding (adjacent missing
systematic blocks) so a random sample never misses them; :func:`measure_worst` decodes a list of sets
and reports the worst relative error against the exact float64 product; :func:`worst_certified_set`
finds the set whose certified error (``Code.certify``, the error ``decode`` itself checks) is largest.
torch and the codes are imported inside the functions: ``sazd --help`` imports this module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sazd.codes.base import Code


def hard_sets(code: Code) -> list[tuple[int, ...]]:
    """Received sets (k workers each) that zigzag decoding finds hardest, hardest kinds first.

    For a systematic code with s = min(m, k) missing systematic blocks:
    - every window of s adjacent missing systematic blocks, all parity received (the longest
      zigzag chains, the hardest sets);
    - s - 1 missing systematic blocks (first and last windows, and a non-adjacent "split" pattern:
      the first and the last blocks) together with each single parity block: the decoder must then
      use parities with larger shifts, and with m >= 4 the equations left can be irregular;
    - the split pattern with all parity received.
    For any code: every window of m adjacent missing workers over 0..n-1.
    """
    n, k, m = code.n, code.k, code.m
    missing: list[frozenset[int]] = []
    if code.is_systematic and m > 0:
        s = min(m, k)
        missing += [frozenset(range(a, a + s)) for a in range(k - s + 1)]
        missing.append(_split(s, k) | frozenset(range(k, k + m - s)))
        if s > 1:
            for parity in range(k, n):
                for pattern in (range(s - 1), range(k - s + 1, k), _split(s - 1, k)):
                    missing.append(frozenset(pattern) | {parity})
    missing += [frozenset(range(a, a + m)) for a in range(n - m + 1)]
    ordered = [tuple(j for j in range(n) if j not in miss) for miss in dict.fromkeys(missing)]
    return [s for s in ordered if len(s) == k]


def _split(s: int, k: int) -> frozenset[int]:
    """The first ceil(s/2) and the last floor(s/2) of k blocks: non-adjacent missing blocks."""
    return frozenset(range(-(-s // 2))) | frozenset(range(k - s // 2, k))


def pick_sets(code: Code, samples: int, seed: int) -> tuple[list[tuple[int, ...]], int, bool]:
    """``hard_sets`` first, then ``samples`` random k-subsets; every subset when that is no more.

    Returns (sets, number of k-subsets in total, whether the sets are exhaustive).
    """
    from sazd.codes.base import straggler_sets

    hard = hard_sets(code)
    total = math.comb(code.n, code.k)
    if total <= samples + len(hard):
        every = straggler_sets(code.n, code.k, samples=total)[0]
        return hard + sorted(set(every) - set(hard)), total, True
    sampled, _ = straggler_sets(code.n, code.k, samples=samples, seed=seed)
    sets = hard + sorted(set(sampled) - set(hard))
    return sets, total, len(sets) == total


def missing_of(code: Code, received: Sequence[int]) -> tuple[int, ...]:
    return tuple(j for j in range(code.n) if j not in set(received))


# ------------------------------------------------------------------ measuring the error
@dataclass
class Problem:
    """A random ``W`` (rows x inner) and ``X`` (inner x cols) in float64 and their exact product.

    Generated exactly as ``Code.verify_report`` does, so the two agree for the same seed.
    """

    W: torch.Tensor
    X: torch.Tensor
    exact: torch.Tensor

    @classmethod
    def random(cls, rows: int, cols: int, inner: int = 64, seed: int = 0) -> Problem:
        import torch

        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(rows, inner, generator=gen, dtype=torch.float64)
        X = torch.randn(inner, cols, generator=gen, dtype=torch.float64)
        return cls(W, X, W @ X)


@dataclass
class WorstError:
    worst_error: float  # inf when a decode overflowed or was refused, nan when it produced NaN
    worst_missing: tuple[int, ...]  # the missing workers of the worst set
    sets_checked: int
    status: str = "ok"  # "ok", or why a set could not be decoded


def measure_worst(
    code: Code,
    problem: Problem,
    sets: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: str = "cpu",
    stop_above: float = math.inf,
) -> WorstError:
    """Encode ``problem.W`` in ``dtype``, multiply every coded block by X in ``dtype`` (the workers'
    products), decode each received set and return the worst ``||Y - WX|| / ||WX||``.

    Checking stops at the first set whose error is NaN or above ``stop_above`` (the code has failed
    for this case; the reported worst is then a lower bound, which ``status`` says).
    """
    import torch

    from sazd.codes.base import DecodeError, relative_error

    coded = code.encode(problem.W.to(device=device, dtype=dtype))
    Xd = problem.X.to(device=device, dtype=dtype)
    products = [c @ Xd for c in coded]
    worst = WorstError(-1.0, (), 0)
    for received in sets:
        worst.sets_checked += 1
        status = "ok"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # non-finite products: reported through the error
                decoded = code.decode({j: products[j] for j in received})
            err = relative_error(decoded.to("cpu", torch.float64), problem.exact)
        except DecodeError as exc:  # e.g. every usable product overflowed
            err, status = math.inf, f"decode refused: {exc}"
        if not err <= worst.worst_error:  # also catches NaN
            worst.worst_error, worst.worst_missing, worst.status = err, missing_of(code, received), status
        if math.isnan(err) or err > stop_above:
            if worst.sets_checked < len(sets):
                note = f"stopped after {worst.sets_checked} of {len(sets)} sets: error > {stop_above:g}"
                worst.status = note if worst.status == "ok" else f"{worst.status}; {note}"
            break
    return worst


def worst_certified_set(
    code: Code, rows: int, dtype: torch.dtype, samples: int, seed: int
) -> tuple[tuple[int, ...], float, list[float]]:
    """The received set with the largest certified decode error among :func:`pick_sets`' sets that
    the code can decode, that error (inf: refused) and every error measured."""
    sets = [s for s in pick_sets(code, samples, seed)[0] if code.can_decode(s)]
    errors = [_certified_error(code, s, rows, dtype) for s in sets]
    worst = max(range(len(sets)), key=lambda j: errors[j])
    return tuple(sets[worst]), errors[worst], errors


def _certified_error(code: Code, workers: Sequence[int], rows: int, dtype: torch.dtype) -> float:
    err = code.certify(workers, rows, dtype).error
    return err if err == err else math.inf  # NaN: the certificate failed, as bad as a refusal
