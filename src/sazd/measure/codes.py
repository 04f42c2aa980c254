"""Codes and dtypes as the measuring commands name them: ``name[:opt=value,...]`` and fp32/bf16/...

:func:`parse_code_spec` turns ``"sazd:shift_unit=16"`` or ``"poly:nodes=chebyshev"`` into a
:class:`CodeSpec`. torch and the code registry are imported inside the functions: ``sazd --help``
imports this module and stays free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sazd.measure.timing import Timed

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


class Op(Timed):
    """One timed operation of a code and its deterministic counters."""

    def __init__(self, code: str, op: str, fn: Callable[[], Any], counters: dict[str, Any]) -> None:
        super().__init__(f"{code} {op}", fn)
        self.code, self.op, self.counters = code, op, counters

    @property
    def out_bytes(self) -> int:
        return self.counters["bytes_written"]

    @property
    def seconds(self) -> float:
        return self.median_s

    @property
    def best_seconds(self) -> float:
        return min(self.times)

    @property
    def gbps(self) -> float:
        return self.out_bytes / self.seconds / 1e9


def received_set(k: int, n: int, s: int) -> list[int]:
    """Systematic workers minus the last s (adjacent) plus the first s parity workers: k workers."""
    if not 0 <= s <= min(k, n - k):
        raise ValueError(f"--missing {s} must be between 0 and min(k, n-k) = {min(k, n - k)}")
    return [*range(k - s), *range(k, k + s)]
