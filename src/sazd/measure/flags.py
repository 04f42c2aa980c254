"""Checking the list and number flags of the measuring commands: a ValueError naming the flag."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``"2,4,8"`` -> [2, 4, 8]; every value >= ``minimum``."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{flag} must list integers >= {minimum}, got {text!r}")
    return values


def choice_list(text: str, flag: str, allowed: Sequence[str]) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each one of ``allowed``."""
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"{flag}: unknown value(s) {bad or text!r}; choose from {', '.join(allowed)}")
    return values


def positive(value: Any, flag: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a positive number, got {value!r}")
    return value


def json_float(x: float) -> float | str:
    """Strict JSON has no inf/nan: write them as the strings "inf" / "nan"."""
    return x if math.isfinite(x) else str(x)
