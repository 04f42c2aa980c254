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
from collections.abc import Iterable, Sequence
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
    }


def json_float(x: float) -> float | str:
    """Strict JSON has no inf/nan: write them as the strings "inf" / "nan"."""
    return x if math.isfinite(x) else str(x)


# ------------------------------------------------------------------ which straggler sets
def hard_sets(code: Code) -> list[tuple[int, ...]]:
    """Received sets (k workers each) that zigzag decoding finds hardest.

    For a systematic code: every window of ``s`` adjacent missing systematic blocks (the longest
    zigzag chains), for s = min(m, k) with all parity received, and for s = min(m, k) - 1 with each
    single parity block missing too (the decoder must then use parities with larger shifts).
    For any code: every window of m adjacent workers over 0..n-1 missing.
    """
    n, k, m = code.n, code.k, code.m
    missing_sets: set[frozenset[int]] = set()
    for a in range(n - m + 1):
        missing_sets.add(frozenset(range(a, a + m)))
    if code.is_systematic and m > 0:
        s_max = min(m, k)
        for s in (s_max, s_max - 1):
            extra = m - s  # parity blocks that are missing as well
            if s < 1 or extra > 1:
                continue
            parity_choices = [()] if extra == 0 else [(k + j,) for j in range(m)]
            for a in range(k - s + 1):
                for par in parity_choices:
                    missing_sets.add(frozenset(range(a, a + s)) | frozenset(par))
    return sorted(tuple(j for j in range(n) if j not in miss) for miss in missing_sets)


def pick_sets(code: Code, samples: int, seed: int) -> tuple[list[tuple[int, ...]], int, bool]:
    """``hard_sets`` plus ``samples`` random k-subsets (all of them when that covers every subset).

    Returns (sets, number of k-subsets in total, whether the sets are exhaustive).
    """
    from sazd.codes.base import straggler_sets

    hard = hard_sets(code)
    total = math.comb(code.n, code.k)
    if total <= samples + len(hard):
        return straggler_sets(code.n, code.k, samples=total)[0], total, True
    sampled, _ = straggler_sets(code.n, code.k, samples=samples, seed=seed)
    sets = sorted(set(hard) | set(sampled))
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
    sets: Iterable[Sequence[int]],
    dtype: torch.dtype,
    device: str = "cpu",
) -> WorstError:
    """Encode ``problem.W`` in ``dtype``, multiply every coded block by X in ``dtype`` (the workers'
    products), decode each received set and return the worst ``||Y - WX|| / ||WX||``."""
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
            if math.isnan(err):
                break
    return worst
