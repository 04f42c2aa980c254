"""A run directory: config.json, metrics.jsonl, report.json, the figures and checkpoint/.

metrics.jsonl holds one JSON object per line, appended and flushed as training goes, so a run that
dies still leaves its history.

Ownership: a run directory carries the marker file ``.sazd-run`` (the run's id). sazd writes only
into a directory it creates, an empty one, or one whose marker names the same run (``--resume``);
``--overwrite`` replaces an earlier run by deleting only the files sazd writes (``WRITTEN`` and its
checkpoint files), never anything else. One process at a time owns a run directory (``DirLock``: a
live owner is refused by PID, a dead one's lock taken over aloud). No file is written through a
link: a directory holding links is refused, files are opened with ``O_NOFOLLOW`` or replaced
atomically (``sazd.files``). Output files given by path (``--json``) are written only where nothing
is, or over an earlier sazd report, and are checked before training starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sazd import files
from sazd.train import checkpoint
from sazd.train.report import (
    ACC_PNG,
    LATENCY_PNG,
    LOSS_PNG,
    PPL_PNG,
    REPORT_FORMAT,
    latency_figure,
    metric_figures,
    to_jsonable,
)

CONFIG, METRICS, REPORT = "config.json", "metrics.jsonl", "report.json"
MARKER = ".sazd-run"
WRITTEN = (CONFIG, METRICS, REPORT, LOSS_PNG, ACC_PNG, PPL_PNG, LATENCY_PNG, MARKER)  # + checkpoint/


class RunDir:
    """The directory of run ``run_id``; created (with parents), claimed and locked on construction.

    An existing directory is used when it is empty, or holds this run (``resume``); with ``overwrite``
    an earlier run's files (only those sazd wrote) are deleted first. Anything else is a ValueError
    naming the directory and the fix, raised before anything is written. ``close()`` releases it."""

    def __init__(self, path: str | Path, run_id: str = "", *, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.path, self.run_id = Path(path), run_id
        clear = self.check(self.path, run_id, resume=resume, overwrite=overwrite)
        try:
            files.make_dir(self.path, "--run-dir")
        except OSError as err:
            raise ValueError(f"--run-dir {self.path} cannot be written ({err.strerror or err}); choose a "
                             "writable --run-dir") from None
        self.lock = files.DirLock(self.path, "--run-dir").acquire()
        try:
            if clear:
                self.clear()
            if self.owner(self.path) != run_id:
                files.write_atomic(self.path / MARKER, json.dumps({"run_id": run_id}) + "\n", MARKER)
        except BaseException:
            self.lock.release()
            raise

    @classmethod
    def check(cls, path: Path, run_id: str, *, resume: bool = False, overwrite: bool = False) -> bool:
        """Whether run ``run_id`` may use ``path`` (see the class docstring), without touching it;
        returns whether an earlier run must be cleared out first."""
        files.check_dir(path, "--run-dir")
        owner = cls.owner(path)
        if owner is not None and not (resume and owner == run_id):
            if not overwrite:
                raise ValueError(f"--run-dir {path} holds an earlier run; continue it with --resume {path}, "
                                 "pass --overwrite to replace it (deletes only the files sazd wrote there) "
                                 "or choose another --run-dir")
            return True
        if owner is None and path.is_dir() and any(p.name != files.LOCK_NAME for p in path.iterdir()):
            raise ValueError(f"--run-dir {path} is not empty and is not a sazd run directory; sazd writes "
                             "only into a new or empty directory: choose another --run-dir")
        check_writable(path, "--run-dir")
        return False

    @staticmethod
    def owner(path: Path) -> str | None:
        """The run id in ``path``'s marker, or None when it is not a sazd run directory."""
        marker = path / MARKER
        if marker.is_symlink():
            return None
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
            return str(data["run_id"]) if isinstance(data, dict) else None
        except (OSError, ValueError, KeyError):
            return None

    def clear(self) -> None:
        """Delete what sazd wrote here (``WRITTEN`` and the default checkpoint), nothing else."""
        checkpoint.remove(self.path / "checkpoint")
        for name in WRITTEN:
            (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        self.lock.release()

    # ------------------------------------------------------------------ writing
    def _write_json(self, name: str, obj: Any) -> Path:
        return files.write_atomic(self.path / name, json.dumps(to_jsonable(obj), indent=2, sort_keys=True)
                                  + "\n", name)

    def write_config(self, config: Mapping[str, Any]) -> Path:
        return self._write_json(CONFIG, config)

    def write_report(self, report: Mapping[str, Any]) -> Path:
        return self._write_json(REPORT, report)

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one line to metrics.jsonl: ``record`` and/or keyword fields, flushed immediately."""
        line = json.dumps(to_jsonable({**(record or {}), **fields}), sort_keys=True)
        files.append_text(self.path / METRICS, line + "\n", METRICS)

    def plot(self, x: str = "iteration") -> dict[str, Path]:
        """Draw loss.png and accuracy.png (and perplexity.png when logged) from metrics.jsonl; returns
        {"loss": path, "accuracy": path[, "perplexity": path]}."""
        out = {}
        for name, png in metric_figures(self.read_metrics(), x).items():
            out[name.removesuffix(".png")] = files.write_atomic(self.path / name, png, name)
        return out

    def plot_latency(self, log: Any, n: int) -> Path:
        return files.write_atomic(self.path / LATENCY_PNG, latency_figure(log, n), LATENCY_PNG)

    # ------------------------------------------------------------------ reading
    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / CONFIG).read_text(encoding="utf-8"))

    def read_report(self) -> dict[str, Any]:
        return json.loads((self.path / REPORT).read_text(encoding="utf-8"))


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file before any work starts: its directory must be creatable and writable, and
    the path must be free or hold an earlier sazd report (never a user's file, a link, a directory or
    anything but a regular file)."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise ValueError(f"{flag} {path} is a directory or a link; give a file path for {flag}")
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{flag} {path} is not a regular file; give a file path for {flag}")
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"{flag} {path} exists and is not a sazd report; choose another path for {flag}")
    check_writable(path.parent, flag, shown=path)
    return path


def check_writable(path: str | Path, flag: str, shown: str | Path | None = None) -> None:
    """``path`` is, or can be created as, a directory this process may write into (a file can be made
    there: permission bits alone do not tell, e.g. for root or in /proc)."""
    path = there = Path(path)
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK) or not _can_create(there):
        raise ValueError(f"{flag} {shown or path}: {there} is not a writable directory; choose a writable "
                         f"{flag}")


def _can_create(directory: Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".sazd-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def write_json_file(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (parents created, no link followed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.write_atomic(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n", str(path))


def claim(cfg: Any, run_id: str, resumed: bool) -> RunDir | None:
    """Check, then claim, the run directory and checkpoint directory of ``cfg`` (a ``TrainConfig``):
    sazd writes only where it may. Returns the run directory (None: no ``run_dir``)."""
    run_dir, ckpt = (Path(p) if p else None for p in (cfg.run_dir, cfg.checkpoint_path))
    if ckpt is not None and run_dir is not None:
        r, c = run_dir.resolve(), ckpt.resolve()
        inside = c.parent == r and c.name in WRITTEN
        if c == r or inside or c in r.parents:
            raise ValueError(f"--checkpoint-dir {ckpt} would overwrite the run directory {run_dir} or its "
                             "files; leave --checkpoint-dir out (default RUN_DIR/checkpoint) or choose a "
                             "directory outside the run directory")
    if run_dir is not None:
        RunDir.check(run_dir, run_id, resume=resumed, overwrite=cfg.overwrite)
    if ckpt is not None:
        for path in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")):
            checkpoint.check_owned(path, None if cfg.overwrite else run_id)
        check_writable(ckpt, "--checkpoint-dir")
    # checked: now claim them (with --overwrite, an earlier run's files go: only those sazd wrote)
    run = RunDir(run_dir, run_id, resume=resumed, overwrite=cfg.overwrite) if run_dir is not None else None
    if ckpt is not None and cfg.overwrite:
        checkpoint.remove(ckpt)
    return run
