"""The schema of what travels between the master and a worker: a fixed, versioned msgpack layout.

Nothing received is unpickled, so nothing received can name code to run. A value is built only from
None, bools, ints, floats, strings, lists, tuples, dicts (string or int keys), tensor slots and
records (frozen dataclasses registered with ``record``, whose fields are plain scalars). A tensor
travels as a slot (dtype name, shape) in the header and its raw bytes after it, in slot order; or,
where the receiver maps the sender's shared-memory arena (``sazd.runtime.arena``), as a shared slot
(dtype name, shape, offset) whose bytes the receiver copies from the arena.

- A call is ``[VERSION, method, slowdown, read, args]``; the method must be one of the receiver's
  closed set (``Worker``'s public methods), ``args`` a tuple. ``read``: None where the master does
  not map the worker's arena (answers come on the socket), else how many answers of this connection
  the master has read (the arena regions that held their tensors may be reused).
- An answer is ``[VERSION, 0, value]`` or, when the worker's code raised, ``[VERSION, 1, [type
  name, message]]``: the master rebuilds a built-in exception of that name, or a RuntimeError
  naming the type; never an object of the worker's choosing.

Anything else is a ``WireError``: the connection it came on is broken (the worker is an erasure).
"""

from __future__ import annotations

import builtins
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import msgpack
import torch

VERSION = 2
MAX_DEPTH = 32  # nesting of lists, tuples, dicts and records in one message
_TUPLE, _TENSOR, _RECORD, _SHARED = 1, 2, 3, 4  # msgpack extension codes
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
_SCALARS = (type(None), bool, int, float, str)
_RECORDS: dict[str, type] = {}


class WireError(ValueError):
    """A message that does not follow the schema (or its integrity checks): the connection breaks."""


def record(cls: type) -> type:
    """Register frozen dataclass ``cls`` as a record that may travel (fields: None, bool, int,
    float, str). Used as a class decorator."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__name__}: only frozen dataclasses can travel as records")
    if _RECORDS.setdefault(cls.__name__, cls) is not cls:
        raise TypeError(f"a record named {cls.__name__!r} is already registered")
    return cls


# --------------------------------------------------------------------------------------- packing
def pack(value: Any, shared: Callable[[torch.Tensor], int | None] | None = None
         ) -> tuple[bytes, list[torch.Tensor]]:
    """``value`` as msgpack bytes and the tensors its slots stand for, in order (contiguous, on CPU).
    ``shared(t)``: the offset in the sender's shared-memory arena where ``t`` lies (or was just placed:
    a shared slot, not among the tensors), else None. TypeError naming what cannot travel."""
    tensors: list[torch.Tensor] = []

    def default(obj: Any) -> msgpack.ExtType:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            name = str(t.dtype).removeprefix("torch.")
            if name not in DTYPES:
                raise TypeError(f"tensors of dtype {t.dtype} cannot travel (allowed: {sorted(DTYPES)})")
            offset = None if shared is None else shared(t)
            if offset is not None:
                return msgpack.ExtType(_SHARED, _packb([name, list(t.shape), offset]))
            tensors.append(t)
            return msgpack.ExtType(_TENSOR, _packb([name, list(t.shape)]))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_TUPLE, _packb(list(obj), default))
        for plain in (dict, list, str, float, int):  # a subclass travels as its plain base
            if isinstance(obj, plain) and not isinstance(obj, bool):
                return plain(obj)
        cls = type(obj)
        if _RECORDS.get(cls.__name__) is cls:
            values = [getattr(obj, f.name) for f in dataclasses.fields(cls)]
            if not all(type(v) in _SCALARS for v in values):
                raise TypeError(f"record {cls.__name__} holds a field that is not None/bool/int/float/str")
            return msgpack.ExtType(_RECORD, _packb([cls.__name__, values]))
        raise TypeError(f"a {cls.__name__} cannot travel to or from a worker (only None, bool, int, "
                        "float, str, list, tuple, dict, tensors and registered records)")

    try:
        return _packb(value, default), tensors
    except TypeError:
        raise
    except (ValueError, OverflowError) as err:  # e.g. an int beyond 64 bits, nesting too deep
        raise TypeError(f"cannot pack for a worker: {err}") from None


def _packb(value: Any, default: Any = None) -> bytes:
    return msgpack.packb(value, default=default, strict_types=True, use_bin_type=True)


# -------------------------------------------------------------------------------------- unpacking
def unpack(data: bytes, max_tensor_bytes: int, placed: list[tuple[torch.Tensor, int]] | None = None
           ) -> tuple[Any, list[torch.Tensor]]:
    """The value of ``pack``'s bytes, with a fresh (unfilled) tensor in each slot, and those tensors
    in slot order (their bytes follow the header). Shared slots are allowed only with ``placed``, which
    gets each one's (tensor, arena offset). WireError for anything outside the schema."""
    tensors: list[torch.Tensor] = []
    total = 0

    def hook(code: int, payload: bytes, depth: int) -> Any:
        nonlocal total
        if depth > MAX_DEPTH:
            raise WireError(f"message nested deeper than {MAX_DEPTH}")
        if code == _TUPLE:
            items = _unpackb(payload, lambda c, p: hook(c, p, depth + 1))
            if not isinstance(items, list):
                raise WireError("a tuple that is not a list of items")
            return tuple(items)
        if code in (_TENSOR, _SHARED):
            spec = _unpackb(payload, None)
            size = 2 if code == _TENSOR else 3
            if not (isinstance(spec, list) and len(spec) == size and spec[0] in DTYPES
                    and isinstance(spec[1], list) and len(spec[1]) <= 8
                    and all(type(s) is int and 0 <= s < 1 << 40 for s in spec[1] + spec[2:])):
                raise WireError(f"malformed tensor slot {spec!r:.100}")
            if code == _SHARED and placed is None:
                raise WireError("a shared-memory tensor slot, but no arena is mapped here")
            dtype, shape = DTYPES[spec[0]], tuple(spec[1])
            total += math.prod(shape) * dtype.itemsize
            if total > max_tensor_bytes:
                raise WireError(f"message announces more than {max_tensor_bytes} tensor bytes")
            t = torch.empty(shape, dtype=dtype)
            if code == _TENSOR:
                tensors.append(t)
            else:
                placed.append((t, spec[2]))
            return t
        if code == _RECORD:
            spec = _unpackb(payload, None)
            if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)):
                raise WireError(f"malformed record {spec!r:.100}")
            cls = _RECORDS.get(spec[0]) if isinstance(spec[0], str) else None
            fields = dataclasses.fields(cls) if cls is not None else ()
            if cls is None or len(spec[1]) != len(fields) or not all(type(v) in _SCALARS for v in spec[1]):
                raise WireError(f"not a registered record: {spec!r:.100}")
            return cls(**{f.name: v for f, v in zip(fields, spec[1], strict=True)})
        raise WireError(f"unknown extension type {code}")

    try:
        value = _unpackb(data, lambda c, p: hook(c, p, 1))
    except WireError:
        raise
    except Exception as err:  # msgpack's own errors: truncated, extra bytes, bad keys, too deep
        raise WireError(f"not a message of ours ({type(err).__name__}: {err})") from None
    return value, tensors


def _unpackb(data: bytes, ext_hook: Any) -> Any:
    opts = {"ext_hook": ext_hook} if ext_hook is not None else {}
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True, **opts)


# ------------------------------------------------------------------------------ calls and answers
@dataclasses.dataclass(frozen=True)
class Call:
    """A call as the worker runs it."""

    method: str
    slowdown: float
    read: int | None  # answers the master has read (None: it reads them all from the socket)
    args: tuple


def call(method: str, slowdown: float, read: int | None, args_body: bytes) -> bytes:
    """A call's header; ``args_body`` is ``pack(list(args))[0]`` (packed once, sent to many)."""
    return _packb([VERSION, method, slowdown, read, msgpack.ExtType(_TUPLE, args_body)])


def parse_call(value: Any, methods: frozenset[str]) -> Call:
    """The call in ``value``, checked against the closed set ``methods``."""
    if not (isinstance(value, list) and len(value) == 5 and value[0] == VERSION):
        raise WireError(f"not a call of version {VERSION}: {value!r:.100}")
    _, method, slowdown, read, args = value
    if not isinstance(method, str) or method not in methods:
        raise WireError(f"call of {method!r:.60}, not one of the worker's methods")
    if type(slowdown) not in (int, float) or not 1 <= slowdown < math.inf or not isinstance(args, tuple):
        raise WireError(f"malformed call of {method!r}: slowdown {slowdown!r:.30}, "
                        f"args {type(args).__name__}")
    if read is not None and not (type(read) is int and read >= 0):
        raise WireError(f"malformed call of {method!r}: answers read {read!r:.30}")
    return Call(method, float(slowdown), read, args)


def answer(value: Any, shared: Callable[[torch.Tensor], int | None] | None = None
           ) -> tuple[bytes, list[torch.Tensor]]:
    """A successful answer's header and tensors (TypeError if ``value`` cannot travel); ``shared`` as
    in ``pack``."""
    return pack([VERSION, 0, value], shared)


def failure(err: BaseException) -> bytes:
    """The answer for an exception of the worker's code: its type name and message."""
    message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return _packb([VERSION, 1, [type(err).__name__, message[:4000]]])


def parse_answer(value: Any) -> tuple[bool, Any]:
    """(True, value) or (False, the worker's exception rebuilt) from an answer."""
    if not (isinstance(value, list) and len(value) == 3 and value[0] == VERSION and value[1] in (0, 1)):
        raise WireError(f"malformed answer {value!r:.100}")
    if value[1] == 0:
        return True, value[2]
    spec = value[2]
    if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
        raise WireError(f"malformed error answer {spec!r:.100}")
    return False, rebuild_exception(*spec)


def rebuild_exception(name: str, message: str) -> Exception:
    """A built-in exception named ``name`` holding ``message``; otherwise a RuntimeError naming it."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, OSError):
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(f"{name}: {message}")
