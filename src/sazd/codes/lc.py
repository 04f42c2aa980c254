"""Linear-combination (LC) codes: the baselines SAZD is compared with.

Coded block ``j`` is ``C_j = sum_i G[j, i] A_i`` for an ``n x k`` real generator matrix ``G``. Decoding
from a set ``S`` of ``k`` received workers solves ``Y_S = G_S A`` with ``G_S = G[S]``, i.e. applies
``inv(G_S)`` -- exact in exact arithmetic, but the rounding errors of the workers' products are
amplified by up to ``cond(G_S)``, which for real Vandermonde matrices grows exponentially in ``k``.

- ``Poly``: real Vandermonde ``G[j, i] = x_j**i`` (integer nodes 1..n: the paper's "Poly"; or
  Chebyshev points), optionally in systematic form.
- ``GaussianMDS``: i.i.d. normal generator, a strong real-valued baseline (well conditioned with high
  probability; every k x k submatrix is invertible with probability 1).
- ``Uncoded`` (n = k) and ``Replication`` (worker j holds block j % k).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from sazd.codes.base import Code, DecodeError, compute_dtype
from sazd.codes.checks import ArgumentTypeError, check_bool, check_int, check_workers

POLY_NODES = ("integer", "chebyshev")
# A generator whose rows sum (in magnitude) to this or more overflows float32 on weights of magnitude 1.
ENCODE_LIMIT = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class _Plan:
    """How to decode from one received set: copy ``plain`` (block -> worker), solve for ``missing``."""

    plain: dict[int, int]
    mixed: list[int]  # received workers holding combinations, in the order of the rows of Y
    missing: list[int]  # source blocks to solve for
    known: Tensor | None  # G[mixed] with the missing columns zeroed (None when nothing is plain)
    solve: Tensor  # inv(G[mixed][:, missing])


def systematic_form(G: Tensor) -> Tensor:
    """``G @ inv(G[:k])`` in float64, with the first k rows set to the exact identity."""
    k = G.shape[1]
    sys = torch.linalg.solve(G[:k].T, G.T).T  # G @ inv(G[:k]) without forming the inverse
    sys[:k] = torch.eye(k, dtype=G.dtype)
    return sys


class LinearCode(Code):
    """An (n, k) code given by an ``n x k`` float64 generator matrix ``G``."""

    name = "linear"
    _CACHE_LIMIT = 4096  # decode plans kept per code (one per received set, dtype and device)

    def __init__(self, n: int, k: int, G: Tensor, systematic: bool = False) -> None:
        super().__init__(n, k)
        check_bool(systematic, "systematic")
        try:
            G = torch.as_tensor(G, dtype=torch.float64).clone()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ArgumentTypeError(
                f"generator G must be an (n, k) real matrix, got {type(G).__name__}"
            ) from err
        if tuple(G.shape) != (n, k):
            raise ValueError(f"generator must have shape (n, k)=({n}, {k}), got {tuple(G.shape)}")
        if not bool(torch.isfinite(G).all()):
            raise ValueError("generator has NaN or Inf entries; choose other nodes or a smaller k")
        widest = float(G.abs().sum(1).max())  # the largest factor by which encoding can grow an entry
        if not widest < ENCODE_LIMIT:
            raise ValueError(
                f"{type(self).__name__}(n={n}, k={k}) has a generator row whose entries sum to {widest:.1e} "
                f"in magnitude: encoding float32 (or bfloat16) weights would overflow to inf (float32 holds "
                f"up to {torch.finfo(torch.float32).max:.1e}); {self.stability_hint}"
            )
        if systematic and not torch.equal(G[:k], torch.eye(k, dtype=torch.float64)):
            raise ValueError("a systematic generator must start with the k x k identity; use systematic_form")
        self._G = G
        self.is_systematic = systematic
        # Worker j whose row of G is exactly e_i holds A_i itself: encode copies it, decode reads it.
        one_hot = (G == 1).sum(1).eq(1) & (G != 0).sum(1).eq(1)
        self._holds = {j: int(G[j].argmax()) for j in range(n) if bool(one_hot[j])}
        self._plans: dict[tuple, _Plan] = {}

    @property
    def generator(self) -> Tensor:
        """The ``n x k`` float64 generator matrix (a copy)."""
        return self._G.clone()

    def condition_number(self, workers: Collection[int]) -> float:
        """``cond(G_S)`` (2-norm) for the k workers ``decode`` would use: the bound on how much it
        amplifies the relative rounding error of the workers' products."""
        rows = self._choose(check_workers(self, workers))
        return float(torch.linalg.cond(self._G[rows]))

    def _copied_blocks(self, workers: Collection[int]) -> dict[int, int]:
        return {j: self._holds[j] for j in self._choose(workers) if j in self._holds}

    def _operator_norm(self, workers: tuple[int, ...]) -> float:
        """``||inv(G_S)||_2`` for the k workers ``decode`` uses: exactly the decode's 2-norm."""
        return float(torch.linalg.matrix_norm(torch.linalg.inv(self._G[self._choose(workers)]), ord=2))

    # ------------------------------------------------------------------ encode
    def _encode_blocks(self, blocks: Tensor) -> list[Tensor]:
        k, shape = self.k, blocks.shape[1:]
        mixed = [j for j in range(self.n) if j not in self._holds]
        coded: list[Tensor | None] = [None] * self.n
        for j, i in self._holds.items():
            coded[j] = blocks[i]
        if mixed:
            cdtype = compute_dtype(blocks.dtype)
            G = self._G[mixed].to(device=blocks.device, dtype=cdtype)
            C = G @ blocks.reshape(k, shape.numel()).to(cdtype)  # one matmul: C_j = sum_i G[j, i] A_i
            # Each worker gets its own storage: a view would share (and pickle) the whole result.
            for j, c in zip(mixed, C.to(blocks.dtype).unbind(0), strict=True):
                coded[j] = c.reshape(shape).clone()
        return coded  # type: ignore[return-value]

    # ------------------------------------------------------------------ decode
    def _choose(self, workers: Collection[int]) -> list[int]:
        """k received workers: those holding a source block as-is first, then the rest in index order."""
        got = sorted(set(workers))
        plain, seen = [], set()
        for j in got:
            if j in self._holds and self._holds[j] not in seen:
                plain.append(j)
                seen.add(self._holds[j])
        rest = [j for j in got if j not in plain]
        chosen = (plain + rest)[: self.k]
        if len(chosen) < self.k:
            raise DecodeError(f"need results from k={self.k} workers, got {got}")
        return chosen

    def _plan(self, chosen: list[int], dtype: torch.dtype, device: torch.device) -> _Plan:
        key = (tuple(chosen), dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            plain = {self._holds[j]: j for j in chosen if j in self._holds}
            mixed = [j for j in chosen if j not in self._holds]
            missing = [i for i in range(self.k) if i not in plain]
            # With A_R known (copied), Y_P = G[P, R] A_R + G[P, M] A_M: subtract, then solve the
            # |M| x |M| system -- the rows M of inv(G_S) applied to Y_S, without touching A_R twice.
            G_P = self._G[mixed]
            known = G_P.clone()
            known[:, missing] = 0.0
            try:
                solve = torch.linalg.inv(G_P[:, missing])  # float64, once per received set
            except torch.linalg.LinAlgError as err:
                raise DecodeError(f"workers {chosen} do not determine all {self.k} source blocks") from err
            plan = _Plan(
                plain=plain,
                mixed=mixed,
                missing=missing,
                known=known.to(device=device, dtype=dtype) if plain else None,
                solve=solve.to(device=device, dtype=dtype),
            )
            if len(self._plans) >= self._CACHE_LIMIT:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _decode_blocks(self, results: dict[int, Tensor], r: int, out: Tensor) -> None:
        plan = self._plan(self._choose(results), out.dtype, out.device)
        for i, j in plan.plain.items():
            out[i] = results[j]
        if not plan.missing:
            return
        A = out.view(self.k, out[0].numel())
        Y = torch.stack([results[j] for j in plan.mixed]).view(len(plan.mixed), A.shape[1])
        if plan.known is not None:
            A[plan.missing] = 0.0
            Y.addmm_(plan.known, A, alpha=-1.0)  # Y_P - G[P, R] A_R
        lo, hi = plan.missing[0], plan.missing[-1] + 1
        if hi - lo == len(plan.missing) and not (Y.requires_grad and torch.is_grad_enabled()):
            torch.matmul(plan.solve, Y, out=A[lo:hi])  # contiguous rows: write in place
        else:
            A[plan.missing] = plan.solve @ Y

    def _options(self) -> str:
        return f", systematic={self.is_systematic}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, k={self.k}{self._options()})"


class Poly(LinearCode):
    """Polynomial code: real Vandermonde generator ``G[j, i] = x_j**i``.

    ``nodes="integer"`` uses ``x_j = j + 1`` (the paper's "Poly", badly conditioned: cond(G_S) grows
    like ``n**k``); ``nodes="chebyshev"`` uses ``x_j = cos((2j+1) pi / (2n))``, the best-conditioned
    classic choice. ``systematic=True`` uses ``G @ inv(G[:k])`` so workers 0..k-1 hold the plain blocks.
    """

    name = "poly"
    stability_hint = ("use Chebyshev nodes (nodes='chebyshev'), a smaller k, or SAZD: real Vandermonde "
                      "systems on integer nodes lose about log10(n**k) digits")

    def __init__(self, n: int, k: int, nodes: str = "integer", systematic: bool = False) -> None:
        if not isinstance(nodes, str):
            raise ArgumentTypeError(f"nodes must be one of {list(POLY_NODES)}, got nodes={nodes!r}")
        if nodes not in POLY_NODES:
            raise ValueError(f"nodes must be one of {list(POLY_NODES)}, got nodes={nodes!r}")
        _check_redundant(self, n, k)
        check_bool(systematic, "systematic")
        self.nodes = nodes
        if nodes == "chebyshev":
            self.stability_hint = "use a smaller k, fewer parity workers, or SAZD"
        j = torch.arange(n, dtype=torch.float64)
        x = j + 1 if nodes == "integer" else torch.cos((2 * j + 1) * math.pi / (2 * n))
        G = x[:, None] ** torch.arange(k, dtype=torch.float64)  # G[j, i] = x_j**i
        super().__init__(n, k, systematic_form(G) if systematic else G, systematic)

    def _options(self) -> str:
        return f", nodes={self.nodes!r}, systematic={self.is_systematic}"


class GaussianMDS(LinearCode):
    """Random Gaussian generator (columns of unit norm, fixed seed): MDS with probability 1."""

    name = "gaussian"

    def __init__(self, n: int, k: int, seed: int = 0, systematic: bool = False) -> None:
        check_int(seed, "seed", None, "the generator's random seed")
        _check_redundant(self, n, k)
        check_bool(systematic, "systematic")
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        G = torch.randn(n, k, generator=gen, dtype=torch.float64)
        G = G / torch.linalg.vector_norm(G, dim=0)
        super().__init__(n, k, systematic_form(G) if systematic else G, systematic)

    def _options(self) -> str:
        return f", seed={self.seed}, systematic={self.is_systematic}"


class Uncoded(LinearCode):
    """No redundancy: n = k workers each hold one plain block; every worker is needed."""

    name = "uncoded"

    def __init__(self, k: int) -> None:
        check_int(k, "k", 1, "the number of source blocks")
        super().__init__(k, k, torch.eye(k, dtype=torch.float64), systematic=True)

    def __repr__(self) -> str:
        return f"Uncoded(k={self.k})"


class Replication(LinearCode):
    """Worker j holds a copy of source block ``j % k``; decodable iff every block has a received copy."""

    name = "replication"

    def __init__(self, n: int, k: int) -> None:
        Code.__init__(self, n, k)  # validate n and k before building G
        G = torch.zeros(n, k, dtype=torch.float64)
        G[torch.arange(n), torch.arange(n) % k] = 1.0
        super().__init__(n, k, G, systematic=True)

    def can_decode(self, workers: Collection[int]) -> bool:
        return not self._missing_blocks(workers)

    def _missing_blocks(self, workers: Collection[int]) -> list[int]:
        have = {j % self.k for j in workers}
        return [i for i in range(self.k) if i not in have]

    def _choose(self, workers: Collection[int]) -> list[int]:
        missing = self._missing_blocks(workers)
        if missing:
            raise DecodeError(
                f"no received copy of source blocks {missing} (workers {sorted(workers)} answered; block i "
                f"lives on workers i, i+{self.k}, ...); wait for a worker holding each missing block"
            )
        return super()._choose(workers)

    def __repr__(self) -> str:
        return f"Replication(n={self.n}, k={self.k})"


def _check_redundant(code: Code, n: int, k: int) -> None:
    """Validate n and k; LC codes need at least one redundant worker (for n = k use ``Uncoded``)."""
    Code.__init__(code, n, k)
    if n <= k:
        raise ValueError(
            f"{type(code).__name__} needs n > k (at least one redundant worker), got n={n}, k={k}; "
            f"increase n or use Uncoded(k={k}) for n = k"
        )
