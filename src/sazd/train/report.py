"""A run directory (config.json, metrics.jsonl, report.json, loss.png, accuracy.png, and perplexity.png
for language models) and a progress bar.

metrics.jsonl holds one JSON object per line, appended and flushed as training goes, so a run that
dies still leaves its history. ``plot`` draws every numeric key ending in ``loss`` into loss.png and
every numeric key containing ``acc`` into accuracy.png, against ``iteration`` (or the line number);
keys containing ``perplexity`` go to perplexity.png, drawn only when some were logged.

Ownership: a run directory carries the marker file ``.sazd-run`` (the run's id). sazd writes only
into a directory it creates, an empty one, or one whose marker names the same run (``--resume``);
``--overwrite`` replaces an earlier run by deleting only the files sazd writes (``WRITTEN`` and its
checkpoint files), never anything else. Output files given by path (``--json``) are written only
where nothing is, or over an earlier sazd report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

CONFIG, METRICS, REPORT = "config.json", "metrics.jsonl", "report.json"
LOSS_PNG, ACC_PNG, PPL_PNG = "loss.png", "accuracy.png", "perplexity.png"
MARKER = ".sazd-run"
WRITTEN = (CONFIG, METRICS, REPORT, LOSS_PNG, ACC_PNG, PPL_PNG, MARKER)  # besides the checkpoint directory
REPORT_FORMAT = "sazd-report-1"


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from what training produces: tensors, numpy scalars/arrays, paths, dataclasses,
    dtypes. Non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(value.tolist())
    return str(value)  # torch.dtype, torch.device, enums ...


class RunDir:
    """The directory of run ``run_id``; created (with parents) or claimed on construction.

    An existing directory is used when it is empty, or holds this run (``resume``); with ``overwrite``
    an earlier run's files (only those sazd wrote) are deleted first. Anything else is a ValueError
    naming the directory and the fix, raised before anything is written."""

    def __init__(self, path: str | Path, run_id: str = "", *, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.path, self.run_id = Path(path), run_id
        owner = self.owner(self.path)
        if self.check(self.path, run_id, resume=resume, overwrite=overwrite):
            self.clear()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if owner != run_id or not (self.path / MARKER).is_file():
                _atomic_write(self.path / MARKER, json.dumps({"run_id": run_id}) + "\n")
        except OSError as err:
            raise ValueError(f"--run-dir {self.path} cannot be written ({err.strerror or err}); choose a "
                             "writable --run-dir") from None

    @classmethod
    def check(cls, path: Path, run_id: str, *, resume: bool = False, overwrite: bool = False) -> bool:
        """Whether run ``run_id`` may use ``path`` (see the class docstring), without touching it;
        returns whether an earlier run must be cleared out first."""
        owner = cls.owner(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--run-dir {path} exists and is not a directory; pick another --run-dir")
        if owner is not None and not (resume and owner == run_id):
            if not overwrite:
                raise ValueError(f"--run-dir {path} holds an earlier run; continue it with --resume {path}, "
                                 "pass --overwrite to replace it (deletes only the files sazd wrote there) "
                                 "or choose another --run-dir")
            return True
        if owner is None and path.is_dir() and any(path.iterdir()):
            raise ValueError(f"--run-dir {path} is not empty and is not a sazd run directory; sazd writes "
                             "only into a new or empty directory: choose another --run-dir")
        check_writable(path, "--run-dir")
        return False

    @staticmethod
    def owner(path: Path) -> str | None:
        """The run id in ``path``'s marker, or None when it is not a sazd run directory."""
        try:
            marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
            return str(marker["run_id"]) if isinstance(marker, dict) else None
        except (OSError, ValueError, KeyError):
            return None

    def clear(self) -> None:
        """Delete what sazd wrote here (``WRITTEN`` and the default checkpoint), nothing else."""
        from sazd.train import checkpoint

        checkpoint.remove(self.path / "checkpoint")
        for name in WRITTEN:
            (self.path / name).unlink(missing_ok=True)

    def _write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        _atomic_write(target, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")
        return target

    def write_config(self, config: Mapping[str, Any]) -> Path:
        return self._write_json(CONFIG, config)

    def write_report(self, report: Mapping[str, Any]) -> Path:
        return self._write_json(REPORT, report)

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one line to metrics.jsonl: ``record`` and/or keyword fields, flushed immediately."""
        line = json.dumps(to_jsonable({**(record or {}), **fields}), sort_keys=True)
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / CONFIG).read_text(encoding="utf-8"))

    def read_report(self) -> dict[str, Any]:
        return json.loads((self.path / REPORT).read_text(encoding="utf-8"))

    def plot(self, x: str = "iteration") -> dict[str, Path]:
        """Draw loss.png and accuracy.png (and perplexity.png when logged) from metrics.jsonl; returns
        {"loss": path, "accuracy": path[, "perplexity": path]}."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        use_index = not any(x in row for row in rows)
        out = {}
        for kind, filename, wanted in (
            ("loss", LOSS_PNG, lambda key: key.endswith("loss")),
            ("accuracy", ACC_PNG, lambda key: "acc" in key),
            ("perplexity", PPL_PNG, lambda key: "perplexity" in key),
        ):
            series = _series(rows, x, use_index, wanted)
            if kind == "perplexity" and not series:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            for key, (xs, ys) in sorted(series.items()):
                ax.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, markersize=3)
            if series:
                ax.legend()
            else:
                ax.text(
                    0.5, 0.5, f"no {kind} values logged", ha="center", va="center", transform=ax.transAxes
                )
            ax.set_xlabel("metrics line" if use_index else x)
            ax.set_ylabel(kind)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            out[kind] = self.path / filename
            fig.savefig(out[kind], dpi=100)
            plt.close(fig)
        return out


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse an output file before any work starts: its directory must be creatable and writable, and
    the path must be free or hold an earlier sazd report (never a user's file or a directory)."""
    path = Path(path)
    if path.is_dir() or path.is_symlink():
        raise ValueError(f"{flag} {path} is a directory or a link; give a file path for {flag}")
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"{flag} {path} exists and is not a sazd report; choose another path for {flag}")
    check_writable(path.parent, flag)
    return path


def check_writable(path: str | Path, flag: str) -> None:
    """``path`` is, or can be created as, a directory this process may write into."""
    path = there = Path(path)
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {there} is not a writable directory; choose a writable {flag}")


def write_json_file(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    """A reader never sees half a file, and no other file is touched (a fresh temporary name)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # readable like any other output (mkstemp creates 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _series(rows: list[dict[str, Any]], x: str, use_index: bool, wanted) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = {}
    for i, row in enumerate(rows):
        xv = i if use_index else row.get(x)
        if not _is_number(xv):
            continue
        for key, value in row.items():
            if key != x and wanted(key) and _is_number(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(xv)
                ys.append(value)
    return series


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Progress:
    """A tqdm bar over ``iterable`` that is a silent pass-through when disabled."""

    def __init__(
        self, iterable: Iterable, total: int | None = None, desc: str = "", disable: bool | None = None
    ):
        from tqdm import tqdm

        if disable is None:  # only draw on a terminal; logs and CI get none of the carriage-return noise
            disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        self.bar = tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=True)

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def set_postfix(
        self, loss: float | None = None, acc: float | None = None, iter_s: float | None = None, **extra: Any
    ) -> None:
        """Show the latest loss, accuracy (0..1, shown in %) and iteration time (shown in ms)."""
        shown = {}
        if loss is not None:
            shown["loss"] = f"{float(loss):.4f}"
        if acc is not None:
            shown["acc"] = f"{100 * float(acc):.2f}%"
        if iter_s is not None:
            shown["iter"] = f"{1000 * float(iter_s):.1f}ms"
        shown.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in extra.items()})
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable, total: int | None = None, desc: str = "", disable: bool | None = None
) -> Progress:
    """``for xb, yb in (bar := progress(batches(...), total, "epoch 1")): ...; bar.set_postfix(loss=...)``.
    ``disable=None`` draws only when stderr is a terminal."""
    return Progress(iterable, total=total, desc=desc, disable=disable)


LATENCY_PNG = "latency.png"


def plot_latency(path: str | Path, log: Any, n: int) -> Path:
    """latency.png: every worker's answer time per compute round (``log``: a ``ResponseLog``), with the
    rounds it was late, failed or was skipped marked along the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    for j in range(n):
        xs, ys = log.series(j)
        line = ax.plot(xs, [1000 * y for y in ys], marker=".", markersize=3, linewidth=0.8,
                       label=f"worker {j}")
        missed = [i for i, row in enumerate(log.rounds) if row.get(j, ("skipped", None))[0] != "answered"]
        ax.plot(missed, [0] * len(missed), "|", color=line[0].get_color(), markersize=8)
    ax.set_xlabel("compute round")
    ax.set_ylabel("answer time (ms)")
    ax.set_title("worker answer times (ticks at 0: late, failed or skipped)", fontsize=9)
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=7, ncol=min(n, 4))
    fig.tight_layout()
    out = Path(path) / LATENCY_PNG
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def latency_table(rows: list[dict[str, Any]]) -> str:
    """The per-worker latency summary (``ResponseLog.summary``) as a short text table."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1000 * value:.1f}"

    lines = ["worker  answered  median ms  p95 ms  late  skipped  failed  respawns"]
    lines += [f"{r['worker']:6d}  {r['answered']:8d}  {ms(r['median_s']):>9s}  {ms(r['p95_s']):>6s}  "
              f"{r['late']:4d}  {r['skipped']:7d}  {r['failed']:6d}  {r['respawns']:8d}" for r in rows]
    return "\n".join(lines)


def workers_line(infos: list[dict[str, Any]]) -> str:
    """Where the workers run, in one line: ``workers on 3 node(s): 0@a1b2c3(cpu) 1@d4e5f6(cpu) ...``."""
    nodes = len({w["node_id"] for w in infos})
    def short(node_id: Any) -> str:  # Ray's node ids are 56 hex digits; 6 tell them apart
        return str(node_id)[:6] if len(str(node_id)) > 12 else str(node_id)

    placed = " ".join(f"{w['index']}@{short(w['node_id'])}({w['device']})" for w in infos)
    return f"workers on {nodes} node(s): {placed}"
