"""IDX files (the MNIST family's format), plain or gzip-compressed.

Layout: a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimension
sizes, then the values in C order, big-endian. Everything is read in one ``numpy.frombuffer`` call.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

# dtype code -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # gzip magic; anything else is read as a raw IDX file
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"IDX file {path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (``.gz`` or raw) into a tensor of its stored dtype (uint8 images stay uint8)."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {path}: only {len(data)} bytes, too short for the 4-byte magic number")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise ValueError(
            f"IDX file {path}: bad magic number {data[:4].hex()} (expected 0000 then a dtype code in "
            f"{sorted(hex(c) for c in IDX_DTYPES)} and the number of dimensions); not an IDX file?"
        )
    if ndim == 0:
        raise ValueError(f"IDX file {path}: header says 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"IDX file {path}: truncated header ({len(data)} bytes, need {header} for {ndim} dims)"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"IDX file {path}: {problem}: dims {dims} of {dtype.name} need {expected} bytes, "
            f"file has {len(data)}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, array: np.ndarray | torch.Tensor) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    values = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    native = values.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(
            f"write_idx: dtype {values.dtype} has no IDX code; use one of {sorted(str(d) for d in _CODES)}"
        )
    if values.ndim == 0 or values.ndim > 255:
        raise ValueError(f"write_idx: array must have 1..255 dimensions, got {values.ndim}")
    header = bytes([0, 0, _CODES[native], values.ndim]) + np.asarray(values.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(values, dtype=IDX_DTYPES[_CODES[native]]).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path
