"""Checkpoints: plain (decoded) weights, optimizer state, RNG, data position and the cluster's schedule.

A checkpoint is a directory:

    meta.json             format, run id, position (epoch, batch, iteration), optimizer steps/scalars,
                          config, data summary, the cluster's schedule state (task counters, respawns,
                          dead workers, simulated clock) so latency models and faults continue exactly
    tensors.safetensors   model/<param> (plain weights), optim/<param>/<field> (e.g. momentum_buffer;
                          DEU momentum decoded from k workers), rng/torch, and for DEU columns/<layer>.col
                          (+ /momentum_buffer): the decoded column copies W^T, which DEU updates apart
                          from W; and coded/<worker>/<key>[/momentum_buffer]: the coded blocks, as
                          they are, of the k DEU workers that answered the checkpoint's round (updated
                          in place, they differ from a fresh encoding of the decoded weights by
                          rounding), so a resumed run decoding from them continues bit for bit
    SHA256SUMS            sha256 of the two files above

Replacing a checkpoint is crash-safe: the new one is written completely into ``<name>.tmp`` and
fsynced (files, then the directory), the old one is renamed to ``<name>.old``, the new one renamed
into place, and only then is the old one removed; ``find`` falls back to ``.tmp`` (if it verifies)
or ``.old`` when a crash hit between the renames. At every moment one complete checkpoint exists.

Ownership: sazd only replaces or removes a checkpoint directory that is empty or whose meta.json
names the same run; it removes only the three files it writes, so anything else a user put there
stays (and the directory is then refused). The checksums detect damage (a flipped bit, a truncated
copy); they do not authenticate: anyone can recompute them. So every field is validated against the
model and config before use (``check``), and nothing read from a checkpoint ever chooses a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sazd import files

FORMAT = "sazd-checkpoint-2"
TENSORS, META, SUMS = "tensors.safetensors", "meta.json", "SHA256SUMS"
FILES = (META, TENSORS, SUMS)  # everything sazd writes into a checkpoint directory, in writing order
META_KEYS = {"format", "run_id", "position", "optim", "config", "code", "data", "schedule"}
# Optimizer state fields by optimizer: present for every trainable parameter once a step was taken.
OPTIM_STATE = {
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq", "step"),
    "adamw": ("exp_avg", "exp_avg_sq", "step"),
}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, does not fit the run, or is not ours to replace."""


@dataclass
class Checkpoint:
    model: dict[str, Tensor]  # plain state_dict of the model
    optim: dict[str, Tensor]  # optimizer tensors by "<param>/<field>"
    meta: dict[str, Any]  # run_id, position, optimizer metadata, config, data, schedule
    rng: Tensor | None = None
    columns: dict[str, Tensor] = field(default_factory=dict)  # DEU column copies by "<layer>.col[/...]"
    coded: dict[str, Tensor] = field(default_factory=dict)  # DEU workers' blocks by "<j>/<key>[/...]"

    @property
    def position(self) -> dict[str, int]:
        return self.meta["position"]


# ------------------------------------------------------------------------------------------ saving
def save(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to directory ``path``, crash-safely replacing this run's older checkpoint there."""
    from safetensors.torch import save as to_bytes

    path = Path(path)
    run_id = ckpt.meta["run_id"]
    tmp, old = _sibling(path, ".tmp"), _sibling(path, ".old")
    for candidate in (path, tmp, old):
        check_owned(candidate, run_id)
    if tmp.exists():
        _remove(tmp)  # left by a save that crashed before its first rename
    _mkdir(tmp)
    tensors = {f"model/{k}": v for k, v in ckpt.model.items()}
    tensors.update({f"optim/{k}": v for k, v in ckpt.optim.items()})
    tensors.update({f"columns/{k}": v for k, v in ckpt.columns.items()})
    tensors.update({f"coded/{k}": v for k, v in ckpt.coded.items()})
    if ckpt.rng is not None:
        tensors["rng/torch"] = ckpt.rng
    payload = {
        META: (json.dumps({"format": FORMAT, **ckpt.meta}, indent=2, sort_keys=True) + "\n").encode(),
        TENSORS: to_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
    }
    payload[SUMS] = "".join(
        f"{hashlib.sha256(payload[n]).hexdigest()}  {n}\n" for n in (TENSORS, META)
    ).encode()
    try:
        for name in FILES:
            _write(tmp / name, payload[name])
            _fsync(tmp / name)
        _fsync(tmp)
    except OSError as err:
        if not files.is_disk_full(err):
            raise
        _remove(tmp)  # give the space back: the checkpoint in place stays as it was
        left = (f"the checkpoint in {path} was left as it was" if path.exists()
                else "no checkpoint was written")
        raise files.DiskFullError(path, "a checkpoint", left) from None
    if path.exists():  # keep the current checkpoint as .old until the new one is in place
        if old.exists():
            _remove(old)
        _rename(path, old)
        _fsync(path.parent)
    _rename(tmp, path)
    _fsync(path.parent)
    if old.exists():
        _remove(old)
    return path


def check_owned(path: Path, run_id: str | None) -> None:
    """Refuse ``path`` unless sazd may write there: it does not exist, is an empty directory, or holds a
    checkpoint of run ``run_id`` (``None``: of any run; for ``--overwrite``)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory {path} exists and is not a directory; choose another --checkpoint-dir"
        )
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return
    owner = run_id_of(path)
    foreign = sorted(entries - set(FILES))
    if owner is None and not foreign and path.name.endswith(".tmp"):
        return  # a save that crashed while writing meta.json
    if owner is None or foreign:
        raise CheckpointError(
            f"checkpoint directory {path} holds files sazd did not write "
            f"({', '.join(foreign or sorted(entries))});"
            " choose a new or empty --checkpoint-dir"
        )
    if run_id is not None and owner != run_id:
        raise CheckpointError(
            f"checkpoint directory {path} holds a checkpoint of another run; resume that run with --resume "
            f"{path}, pass --overwrite to replace it, or choose another --checkpoint-dir"
        )


def remove(path: Path) -> None:
    """Delete a checkpoint directory sazd wrote (and its crash leftovers), only sazd's own files."""
    for candidate in (path, _sibling(path, ".tmp"), _sibling(path, ".old")):
        check_owned(candidate, None)
        if candidate.exists():
            _remove(candidate)


def run_id_of(path: Path) -> str | None:
    """The run id in a checkpoint directory's meta.json (unverified), or None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and str(meta.get("format", "")).startswith("sazd-checkpoint")
    return str(meta.get("run_id")) if ok else None


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# The file-system steps of ``save``, one function each (so a test can fail any one of them).
def _mkdir(path: Path) -> None:
    path.mkdir(parents=True)


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove(path: Path) -> None:
    """Remove sazd's files from ``path``, then the directory (which fails if anything else is there)."""
    for name in FILES:
        (path / name).unlink(missing_ok=True)
    path.rmdir()


# ----------------------------------------------------------------------------------------- loading
def find(path: str | Path) -> Path:
    """The checkpoint directory for ``--resume PATH``: PATH itself or PATH/checkpoint (a run dir); if a
    crash hit between the renames of a save, the complete ``.tmp`` or the ``.old`` one beside it."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / SUMS).is_file() or (candidate / META).is_file():
            return candidate
        for leftover in (_sibling(candidate, ".tmp"), _sibling(candidate, ".old")):
            if not candidate.exists() and (leftover / SUMS).is_file():
                try:
                    _verify(leftover)
                except CheckpointError:
                    continue
                return leftover
    raise CheckpointError(
        f"--resume {path}: no checkpoint there (expected {SUMS}, {META} and {TENSORS} in it or in "
        f"{path / 'checkpoint'}); pass the run directory or the --checkpoint-dir of a run saved with "
        "--checkpoint-every N (or stopped by an error or a signal)"
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint; raise ``CheckpointError`` naming the problem if it is damaged.
    The content is only checked for integrity here; ``check`` validates it against a run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = find(path)
    _verify(path)
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / TENSORS), device=str(device))
    except (ValueError, SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err}); it is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}, expected {FORMAT!r}")
    _check_keys(f"checkpoint {path}: {META}", meta, META_KEYS)
    meta.pop("format")
    if not isinstance(meta["run_id"], str) or not meta["run_id"]:
        raise CheckpointError(f"checkpoint {path}: run_id must be a non-empty string, got {meta['run_id']!r}")
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "columns": {}, "coded": {}, "rng": {}}
    for key, t in tensors.items():
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise CheckpointError(
                f"checkpoint {path}: unexpected tensor {key!r} (not model/, optim/, "
                "columns/, coded/ or rng/torch)"
            )
        groups[group][name] = t
    _check_keys(f"checkpoint {path}: rng tensors", groups["rng"], {"torch"})
    return Checkpoint(
        model=groups["model"],
        optim=groups["optim"],
        meta=meta,
        rng=groups["rng"]["torch"],
        columns=groups["columns"],
        coded=groups["coded"],
    )


def _verify(path: Path) -> None:
    sums_path = path / SUMS
    if not sums_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {SUMS}: it is incomplete; use another checkpoint")
    expected = {}
    for line in sums_path.read_text(errors="replace").splitlines():
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -------------------------------------------------------------------------------------- validation
def check(
    ckpt: Checkpoint, template: Checkpoint, steps_per_epoch: int, optimizer: str, momentum: float
) -> None:
    """Validate a loaded checkpoint against ``template``: the model's tensors (names, shapes, dtypes),
    its trainable parameters in ``template.optim`` (the state ``optimizer`` keeps for them after
    ``meta["optim"]["steps"]`` steps), the position and the optimizer metadata. Raises
    ``CheckpointError`` naming the first bad field."""
    pos = ckpt.meta["position"]
    _check_keys("checkpoint field position", pos, {"epoch", "batch", "iteration"})
    for key in ("epoch", "batch", "iteration"):
        _check_int(f"position.{key}", pos[key], 0)
    if pos["batch"] > steps_per_epoch:
        raise CheckpointError(
            f"checkpoint field position.batch = {pos['batch']} is past the end of an epoch "
            f"({steps_per_epoch} batches); the checkpoint does not fit this run"
        )
    if pos["iteration"] != pos["epoch"] * steps_per_epoch + pos["batch"]:
        raise CheckpointError(
            f"checkpoint field position.iteration = {pos['iteration']} disagrees with epoch {pos['epoch']} "
            f"x {steps_per_epoch} batches + batch {pos['batch']}; the checkpoint is inconsistent"
        )
    optim = ckpt.meta["optim"]
    _check_keys("checkpoint field optim", optim, {"steps", "scalars", "config"})
    _check_int("optim.steps", optim["steps"], 0)
    if optim["steps"] != pos["iteration"]:
        raise CheckpointError(
            f"checkpoint field optim.steps = {optim['steps']} differs from position.iteration "
            f"= {pos['iteration']} (one optimizer step per iteration)"
        )
    if optim["config"] != ckpt.meta["config"].get("optim"):
        raise CheckpointError("checkpoint field optim.config differs from config.optim; it is inconsistent")
    scalars = optim["scalars"]
    if not isinstance(scalars, dict) or not all(
        v is None or (isinstance(v, bool | int | float) and math.isfinite(v)) for v in scalars.values()
    ):
        raise CheckpointError(f"checkpoint field optim.scalars must map names to numbers, got {scalars!r}")
    state = {}
    if optim["steps"] > 0 and not (optimizer == "sgd" and momentum == 0):
        step = torch.zeros((), dtype=torch.float32)
        state = {
            f"{p}/{f}": (step if f == "step" else t)
            for p, t in template.optim.items()
            for f in OPTIM_STATE[optimizer]
        }
    saved, now = ckpt.meta["data"], template.meta["data"]
    if not (isinstance(saved, dict) and saved.keys() == now.keys()
            and all(_same(saved[k], now[k]) for k in now)):
        raise CheckpointError(f"checkpoint field data = {saved!r:.200} differs from the dataset loaded now "
                              f"({now!r:.200}); resume with the same --dataset and --data-dir files")
    check_tensors("model", ckpt.model, template.model)
    check_tensors("optim", ckpt.optim, state)
    check_tensors("columns", ckpt.columns, template.columns)
    check_tensors("rng", {"torch": ckpt.rng}, {"torch": template.rng})


def _same(a: Any, b: Any) -> bool:
    """Equal, floats up to the order of summation (a dataset's mean and std)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12))


def check_tensors(group: str, got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """``got`` has exactly ``want``'s names, each with its shape and dtype, and only finite values."""
    _check_keys(f"checkpoint tensors {group}/", got, set(want))
    for key, t in got.items():
        w = want[key]
        if tuple(t.shape) != tuple(w.shape) or t.dtype != w.dtype:
            raise CheckpointError(
                f"checkpoint tensor {group}/{key} has shape {tuple(t.shape)} {t.dtype}, "
                f"expected {tuple(w.shape)} {w.dtype}; the checkpoint does not fit this run"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"checkpoint tensor {group}/{key} holds NaN or Inf; the run had diverged "
                "before it was saved; resume from an earlier checkpoint"
            )


def _check_keys(what: str, obj: Any, want: set[str]) -> None:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} must be an object, got {type(obj).__name__}")
    missing, extra = sorted(want - set(obj)), sorted(set(obj) - want)
    if missing or extra:
        raise CheckpointError(
            f"{what}: missing {missing}, unexpected {extra}; the checkpoint does not fit "
            "this version of sazd or was edited"
        )


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CheckpointError(f"checkpoint field {name} must be an integer >= {low}, got {value!r}")


def check_fields(where: str, d: Any, cls: type) -> None:
    """``d`` (read from a checkpoint) has exactly the fields of dataclass ``cls``, each of its type."""
    hints = typing.get_type_hints(cls)
    _check_keys(f"checkpoint field {where}", d, set(hints))
    for name, hint in hints.items():
        if not _has_type(d[name], hint):
            raise CheckpointError(f"checkpoint field {where}.{name} = {d[name]!r:.80} is not of type {hint}; "
                                  "the checkpoint was edited or is damaged")


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a simple annotation (scalars, optionals, tuple[int, ...], dict[str, X])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint in (int, str, bool):
        return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _has_type(v, args[1])
                                               for k, v in value.items())
    return dataclasses.is_dataclass(hint) and isinstance(value, dict)  # checked field by field by the caller
