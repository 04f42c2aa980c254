"""Argument checks shared by the public ``sazd.codes`` functions: a wrong type is an
``ArgumentTypeError`` (a TypeError that is also a ValueError), a wrong value a ValueError, each
naming the argument and what it must be."""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sazd.codes.base import Code


class ArgumentTypeError(TypeError, ValueError):
    """An argument of a public ``sazd.codes`` function has the wrong type. A ``TypeError``; also a
    ``ValueError``, so callers that treat any bad input as a ``ValueError`` keep working."""


def check_int(value: Any, name: str, minimum: int | None, meaning: str) -> int:
    """``value`` must be an integer (not a bool) and, when ``minimum`` is given, >= minimum."""
    if type(value) is not int and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
        raise ArgumentTypeError(f"{name} must be an integer ({meaning}), got {name}={value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({meaning}), got {name}={value!r}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be True or False (not a string or a number)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_dtype(dtype: Any, name: str, integers: bool) -> torch.dtype:
    """A floating-point torch dtype (or an integer one when ``integers``)."""
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"{name} must be a torch.dtype such as torch.float32, got {name}={dtype!r}")
    if not (dtype.is_floating_point or (integers and not dtype.is_complex)):
        raise ArgumentTypeError(
            f"{name} must be a floating-point dtype (float64, float32, float16, bfloat16), got {dtype}"
        )
    return dtype


def check_device(device: Any) -> torch.device:
    if not isinstance(device, str | torch.device):
        raise ArgumentTypeError(f"device must be a string or torch.device such as 'cpu', got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device; use e.g. 'cpu' or 'cuda:0'") from err


def check_workers(code: Code, workers: Collection[int], name: str = "workers") -> list[int]:
    """Worker ids: integers in 0..n-1, no duplicates. Returns them as a list of ints."""
    if type(workers) not in (list, tuple, set, frozenset) and (
        isinstance(workers, str | bytes) or not isinstance(workers, Collection)
    ):
        raise ArgumentTypeError(
            f"{name} must be a collection of worker ids (e.g. a list or set of ints), got {workers!r}"
        )
    ids: list[int] = []
    for j in workers:
        if type(j) is not int and (not isinstance(j, numbers.Integral) or isinstance(j, bool)):
            raise ArgumentTypeError(_unknown_worker(code, j, name))
        if not 0 <= j < code.n:
            raise ValueError(_unknown_worker(code, j, name))
        ids.append(int(j))
    if len(set(ids)) != len(ids):
        dup = next(j for j in ids if ids.count(j) > 1)
        raise ValueError(f"duplicate worker id {dup} in {list(workers)}; name each worker once")
    return ids


def _unknown_worker(code: Code, j: Any, name: str) -> str:
    return f"unknown worker id {j!r} in {name}: worker ids are integers 0..{code.n - 1}"


def check_subset(code: Code, workers: Sequence[int]) -> None:
    """Validate a list of worker ids (no duplicates, in range) for APIs that take a sequence."""
    check_workers(code, workers)
