"""Erasure codes over the reals for straggler-tolerant matrix products.

```python
from sazd.codes import SAZD, get_code
code = SAZD(n=10, k=8)                  # or get_code("sazd", n=10, k=8)
coded = code.encode(W)                  # n coded blocks of W's rows
Y = code.decode({j: coded[j] @ X for j in S})   # any k workers S -> W @ X
```
"""

from __future__ import annotations

import inspect
from typing import Any

from sazd.codes.base import (
    Code,
    DecodeError,
    NonFiniteResultWarning,
    UnstableDecodeWarning,
    straggler_sets,
)
from sazd.codes.certificate import Certificate, warning_bound
from sazd.codes.checks import ArgumentTypeError, check_int
from sazd.codes.cyclic import Cyclic
from sazd.codes.lc import GaussianMDS, LinearCode, Poly, Replication, Uncoded
from sazd.codes.sazd import SAZD

__all__ = [
    "CODE_NAMES",
    "SAZD",
    "ArgumentTypeError",
    "Certificate",
    "Code",
    "Cyclic",
    "DecodeError",
    "GaussianMDS",
    "LinearCode",
    "NonFiniteResultWarning",
    "Poly",
    "Replication",
    "Uncoded",
    "UnstableDecodeWarning",
    "code_options",
    "get_code",
    "straggler_sets",
    "warning_bound",
]

_CODES: dict[str, type[Code]] = {
    "sazd": SAZD,
    "cyclic": Cyclic,
    "poly": Poly,
    "gaussian": GaussianMDS,
    "uncoded": Uncoded,
    "replication": Replication,
}
CODE_NAMES: tuple[str, ...] = tuple(_CODES)


def code_options(name: str) -> tuple[str, ...]:
    """Keyword options the code ``name`` accepts besides n and k."""
    params = inspect.signature(_code_class(name).__init__).parameters
    return tuple(p for p in params if p not in ("self", "n", "k"))


def get_code(name: str, n: int, k: int, **opts: Any) -> Code:
    """Build a code by name: ``get_code("sazd", n=10, k=8, shift_unit=4)``.

    Names: "sazd", "cyclic", "poly", "gaussian", "uncoded" (needs n == k), "replication".
    """
    cls = _code_class(name)
    allowed = code_options(name)
    for opt in opts:
        if opt not in allowed:
            raise ValueError(
                f"unknown option {opt!r} for code {name!r}; valid options: {list(allowed) or 'none'}"
            )
    if cls is Uncoded:
        check_int(n, "n", 1, "the number of workers")
        check_int(k, "k", 1, "the number of source blocks")
        if n != k:
            raise ValueError(
                f"code 'uncoded' has no redundancy, so n must equal k, got n={n}, k={k}; "
                "use another code (e.g. 'sazd') for n > k"
            )
        return Uncoded(k)
    return cls(n, k, **opts)


def _code_class(name: str) -> type[Code]:
    if not isinstance(name, str):
        raise ArgumentTypeError(f"code name must be a string, one of {list(CODE_NAMES)}; got {name!r}")
    if name.lower() not in _CODES:
        raise ValueError(f"unknown code {name!r}; valid names: {list(CODE_NAMES)}")
    return _CODES[name.lower()]
