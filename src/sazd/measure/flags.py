"""Checking the flags of the measuring commands (lists, numbers, output places): a ValueError naming
the flag."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sazd.files import OutputError, make_dir


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


def output_dir(path: str | Path, flag: str) -> Path:
    """``path`` made ready for a command's files before it starts working: created, not a link nor
    holding one (``sazd.files.check_dir``), and a file can be created in it (checked by making and
    removing one), so an unwritable place fails at once, not after the measurement."""
    with _unwritable(flag, path):
        path = make_dir(path, flag)
    _probe(path, flag)
    return path


def output_file(path: str | Path, flag: str) -> Path:
    """``path`` checked as a command's output file before it starts working: not a link nor a
    directory, and its directory exists (it is created) and takes a new file."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise OutputError(f"{flag} {path} is a link or a directory; sazd never writes through a link: "
                          "give a new file path")
    with _unwritable(flag, path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    _probe(path.parent, flag)
    return path


@contextlib.contextmanager
def _unwritable(flag: str, place: str | Path) -> Iterator[None]:
    """An OSError inside (other than sazd's own refusals) becomes a one-line OutputError naming ``flag``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"{flag}: cannot write in {place} ({err.strerror or err}); choose a writable "
                          "place") from None


def _probe(directory: Path, flag: str) -> None:
    with _unwritable(flag, directory):
        fd, name = tempfile.mkstemp(dir=directory, prefix=".sazd-probe-")
    os.close(fd)
    os.unlink(name)
