"""Shared pieces of the `sazd bench ...` and `sazd design` commands.

- Codes are named on the command line as ``name[:opt=value,...]``, e.g. ``sazd:shift_unit=16`` or
  ``poly:nodes=chebyshev``; :func:`parse_code_spec` turns that into a :class:`CodeSpec`.
- :func:`hard_sets` lists the straggler sets that are hardest for zigzag decoding (adjacent missing
  systematic blocks) so a random sample never misses them; :func:`measure_worst` decodes a list of
  sets and reports the worst relative error against the exact float64 product.

Top-level imports stay light (no torch) because the CLI imports every command module to build
its parser; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sazd.codes.base import Code

DTYPE_NAMES = {
    "fp64": "float64", "float64": "float64", "double": "float64",
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip
SHORT_DTYPE = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# ------------------------------------------------------------------ naming codes and dtypes
@dataclass(frozen=True)
class CodeSpec:
    """A code named on the command line: registry name plus keyword options for ``get_code``."""

    name: str
    opts: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.opts:
            return self.name
        return self.name + ":" + ",".join(f"{key}={_fmt_opt(v)}" for key, v in self.opts.items())

    def build(self, n: int, k: int) -> Code:
        from sazd.codes import get_code

        return get_code(self.name, n=n, k=k, **self.opts)


def _fmt_opt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_code_spec(text: str) -> CodeSpec:
    """``"sazd:shift_unit=16,systematic=false"`` -> ``CodeSpec("sazd", {...})``."""
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"--codes entry {text!r} has no code name; write e.g. 'sazd:shift_unit=16'")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(
                f"--codes entry {text!r}: option {item!r} must be key=value, e.g. 'poly:nodes=chebyshev'"
            )
        opts[key.strip()] = _parse_value(value.strip())
    return CodeSpec(name.strip().lower(), opts)


def parse_dtype(text: str) -> torch.dtype:
    import torch

    key = text.lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {text!r}; use one of fp64, fp32, fp16, bf16")
    return getattr(torch, DTYPE_NAMES[key])


def dtype_label(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return SHORT_DTYPE.get(name, name)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the relative rounding error of one operation."""
    import torch

    return float(torch.finfo(dtype).eps) / 2


def int_list(text: str, what: str) -> list[int]:
    """``"2,4,8"`` -> [2, 4, 8] with a clear message naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must list integers >= 1, got {text!r}")
    return values


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
    }


def json_float(x: float) -> float | str:
    """Strict JSON has no inf/nan: write them as the strings "inf" / "nan"."""
    return x if math.isfinite(x) else str(x)


# ------------------------------------------------------------------ which straggler sets
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
