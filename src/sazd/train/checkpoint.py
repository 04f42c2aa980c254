"""Checkpoints: plain (decoded) weights, optimizer state, RNG and data position, with a checksum.

A checkpoint is a directory:

    tensors.safetensors   model/<param> (plain weights), optim/<param>/<field> (e.g. momentum_buffer;
                          DEU momentum decoded from k workers), rng/torch, and for DEU columns/<layer>.col
                          (+ /momentum_buffer): the decoded column copies W^T, which DEU updates apart
                          from W, so a resumed run continues bit for bit
    meta.json             format, position (epoch, batch, iteration), optimizer steps/scalars, config
    SHA256SUMS            sha256 of the two files above

``save`` writes a new directory beside the old one and swaps it in, so a crash never leaves half a
checkpoint; ``load`` verifies the checksums and refuses a corrupt or truncated checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "sazd-checkpoint-1"
TENSORS, META, SUMS = "tensors.safetensors", "meta.json", "SHA256SUMS"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the run."""


@dataclass
class Checkpoint:
    model: dict[str, Tensor]  # plain state_dict of the model
    optim: dict[str, Tensor]  # optimizer tensors by "<param>/<field>"
    meta: dict[str, Any]  # position, optimizer metadata, config
    rng: Tensor | None = None
    columns: dict[str, Tensor] = field(default_factory=dict)  # DEU column copies by "<layer>.col[/...]"

    @property
    def position(self) -> dict[str, int]:
        return self.meta["position"]


def save(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to directory ``path`` atomically (replacing an older checkpoint there)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model/{k}": v for k, v in ckpt.model.items()}
    tensors.update({f"optim/{k}": v for k, v in ckpt.optim.items()})
    tensors.update({f"columns/{k}": v for k, v in ckpt.columns.items()})
    if ckpt.rng is not None:
        tensors["rng/torch"] = ckpt.rng
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    (tmp / META).write_text(json.dumps({"format": FORMAT, **ckpt.meta}, indent=2, sort_keys=True) + "\n")
    sums = "".join(f"{_sha256(tmp / name)}  {name}\n" for name in (TENSORS, META))
    (tmp / SUMS).write_text(sums)
    for name in (TENSORS, META, SUMS):
        _fsync(tmp / name)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def find(path: str | Path) -> Path:
    """The checkpoint directory for ``--resume PATH``: PATH itself or PATH/checkpoint (a run dir)."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / SUMS).is_file() or (candidate / META).is_file():
            return candidate
    raise CheckpointError(
        f"--resume {path}: no checkpoint there (expected {SUMS}, {META} and {TENSORS} in it or in "
        f"{path / 'checkpoint'}); pass the run directory or checkpoint directory of a run saved with "
        "--checkpoint-every N"
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint; raise ``CheckpointError`` naming the problem if it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = find(path)
    sums_path = path / SUMS
    if not sums_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {SUMS}: it is incomplete; use another checkpoint")
    expected = {}
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name.strip()] = digest.strip()
    for name in (TENSORS, META):
        if name not in expected:
            raise CheckpointError(f"checkpoint {path}: {SUMS} lists no checksum for {name}; it is corrupt")
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing; the checkpoint is incomplete")
        actual = _sha256(path / name)
        if actual != expected[name]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt or truncated (sha256 {actual[:12]}... != recorded "
                f"{expected[name][:12]}...); refusing to resume from it"
            )
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / TENSORS), device=str(device))
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err}); it is corrupt") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    meta.pop("format")
    model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k.removeprefix("optim/"): v for k, v in tensors.items() if k.startswith("optim/")}
    columns = {k.removeprefix("columns/"): v for k, v in tensors.items() if k.startswith("columns/")}
    return Checkpoint(model=model, optim=optim, meta=meta, rng=tensors.get("rng/torch"), columns=columns)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
