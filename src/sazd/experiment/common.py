"""Shared machinery of the experiments: output directory, resumable cell store, progress bar,
run-to-run spread, the codes compared, the written outputs (csv, json) and the commands' common start
(flags checked, bad ones refused with exit status 2) and end (outputs written and printed). What they
measure with, and the machine description and tables, is :mod:`sazd.measure`'s."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sazd.files import LOCK_NAME, DirLock, OutputError, append_text, check_dir, write_atomic
from sazd.measure.codes import CodeSpec
from sazd.measure.figures import write_figure
from sazd.measure.flags import choice_list, output_dir
from sazd.measure.table import csv_text

MARKER = ".sazd-experiment"  # written into every directory an experiment creates; nothing else is reused
CELLS = "cells.jsonl"


# ------------------------------------------------------------------ output directory
def out_path(out: str | None, experiment: str) -> Path:
    """``out``, or ``runs/experiment-<name>-<UTC time>`` when it is not given."""
    if out is not None:
        return Path(out)
    return Path("runs") / f"experiment-{experiment}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"


def claim_out(path: Path, experiment: str) -> DirLock:
    """Make ``path`` this process's output directory and return its held lock.

    A directory is used only when it is new, empty, or was created by the same experiment (it then
    holds completed cells to resume from); anything else is refused, never overwritten. Refused too:
    a link, a directory holding a (symbolic or hard) link or anything but plain files, a place where
    no file can be created, and a directory another
    ``sazd experiment`` holds (its lock names the process). Checked before anything is created, and
    again under the lock."""
    _check_out(path, experiment, locked=False)
    lock = DirLock(output_dir(path, "--out"), "--out").acquire()
    try:
        _check_out(path, experiment, locked=True)
        write_atomic(path / MARKER, experiment + "\n", "experiment marker")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_out(path: Path, experiment: str, locked: bool) -> None:
    check_dir(path, "--out")
    if not path.is_dir() or (not locked and (path / LOCK_NAME).exists()):
        return  # a holder may be writing its marker: the lock says who, and the check reruns under it
    entries = [e for e in path.iterdir() if e.name != LOCK_NAME]
    odd = [e.name for e in entries if not (e.is_file() or e.is_dir())]
    if odd:
        raise OutputError(f"--out {path} holds {odd[0]!r}, which is not a plain file; choose another "
                          "directory")
    shared = [e.name for e in entries if e.is_file() and e.stat().st_nlink > 1]
    if shared:  # a hard link: appending to it would change the other name's file too
        raise OutputError(f"--out {path} holds {shared[0]!r}, a file with another name elsewhere (a hard "
                          "link); sazd never writes through a link: remove it or choose another directory")
    if not entries:
        return
    marker = path / MARKER
    if not marker.is_file():
        raise OutputError(f"--out {path} exists and was not created by `sazd experiment`; choose a new "
                          "directory")
    owner = marker.read_text().strip()
    if owner != experiment:
        raise OutputError(f"--out {path} holds a `sazd experiment {owner}` run; choose another directory")


# ------------------------------------------------------------------ resumable cells
class CellStore:
    """Completed cells, one JSON object per line in ``DIR/cells.jsonl``, keyed by ``cell["key"]``.

    A cell is written (and flushed) the moment it finishes, so an interrupted sweep loses at most the
    cell in flight. Lines that do not parse (a write cut short) are ignored and rerun.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / CELLS
        self.cells: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # a write cut short: start the next cell on its own line
                append_text(self.path, "\n", "cell store")
            for line in text.splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    cell = json.loads(line)
                    if isinstance(cell, dict) and isinstance(cell.get("key"), str):
                        self.cells[cell["key"]] = cell

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def add(self, cell: dict[str, Any]) -> None:
        self.cells[cell["key"]] = cell
        append_text(self.path, json.dumps(cell, default=_jsonable) + "\n", "cell store")


def cell_key(**fields: Any) -> str:
    return "|".join(f"{k}={fields[k]}" for k in sorted(fields))


def run_cells(
    store: CellStore,
    cells: Sequence[dict[str, Any]],
    run_one: Callable[[dict[str, Any]], dict[str, Any]],
    desc: str,
    seconds_per_cell: float,
) -> list[dict[str, Any]]:
    """Run every cell not yet in ``store`` (printing the expected run time first), with a progress bar;
    return all cells of the grid, in grid order."""
    todo = [c for c in cells if c["key"] not in store]
    done = len(cells) - len(todo)
    print(
        f"{desc}: {len(cells)} cells, {done} already done, {len(todo)} to run; expected run time about "
        f"{_duration(len(todo) * seconds_per_cell)} (a guide for 2 idle cores; longer on a busy machine)",
        file=sys.stderr,
        flush=True,
    )
    with progress(total=len(todo), desc=desc) as bar:
        for cell in todo:
            start = time.perf_counter()
            result = run_one(cell)
            store.add({**cell, **result, "cell_s": round(time.perf_counter() - start, 3)})
            bar.update(1)
    return [store.cells[c["key"]] for c in cells]


def progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# ------------------------------------------------------------------ spread and ties
@dataclass(frozen=True)
class Spread:
    """Run-to-run spread of one quantity over seeds: mean, and half the range (max - min) / 2."""

    mean: float
    half_range: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread | None:
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            return None
        return cls(statistics.fmean(vals), (max(vals) - min(vals)) / 2, len(vals))

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        return f"{self.mean * scale:.{digits}f} ± {self.half_range * scale:.{digits}f}"


def compare(a: Spread | None, b: Spread | None, higher_is_better: bool = True) -> str:
    """``"a"`` / ``"b"`` (the better one: higher, or lower for a loss with ``higher_is_better=False``)
    or ``"tie"`` when the difference of the means is within the seeds' spread:
    ``|mean_a - mean_b| <= half_range_a + half_range_b`` (the two ranges overlap). With fewer than 3
    seeds on either side the verdict is ``"n/a"``."""
    if a is None or b is None:
        return "a" if b is None and a is not None else ("b" if a is None and b is not None else "n/a")
    if min(a.count, b.count) < 3:
        return "n/a"
    if abs(a.mean - b.mean) <= a.half_range + b.half_range:
        return "tie"
    return "a" if (a.mean > b.mean) == higher_is_better else "b"


# ------------------------------------------------------------------ flags
def add_common_arguments(parser: argparse.ArgumentParser, experiment: str) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help=f"output directory (default runs/experiment-{experiment}-<time>); an existing "
        "directory of the same experiment is resumed, any other is refused",
    )
    parser.add_argument("--quick", action="store_true", help="a small grid that finishes in a few minutes")


# ------------------------------------------------------------------ outputs
def write_results(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``results.csv`` (one row per cell, nested fields left out) and ``results.json`` (everything)."""
    flat = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
    write_atomic(out / "results.csv", csv_text(flat), "results")
    write_atomic(out / "results.json", json.dumps({**summary, "cells": rows}, indent=1, default=_jsonable),
                 "results")


def settings_json(s: dict[str, Any]) -> dict[str, Any]:
    """The settings as written to ``results.json``: the codes by their labels."""
    return {**s, "variants": [v.label for v in s["variants"]]}


def fmt_error(err: float | None) -> str:
    if err is None:
        return "—"
    if not err < 1:  # from 1 on, decode raises a DecodeError (sazd.codes.certificate.REFUSE_ERROR)
        return "refused"
    return f"{err:.1e}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def read_error(value: Any) -> float:
    return float(value) if value is not None else math.nan


# ------------------------------------------------------------------ the codes compared
@dataclass(frozen=True)
class Variant:
    """One code as the experiments compare it: a short label, the code (``CodeSpec``: registry name and
    options) and a title for reports."""

    label: str
    spec: CodeSpec
    title: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.spec.opts)

    def with_options(self, **opts: Any) -> Variant:
        return dataclasses.replace(self, spec=CodeSpec(self.name, {**self.spec.opts, **opts}))

    def build(self, n: int, k: int) -> Any:
        return self.spec.build(self.n_for(k, n - k), k)

    def n_for(self, k: int, m: int) -> int:
        return k if self.name == "uncoded" else k + m


_VARIANTS = (
    Variant("uncoded", CodeSpec("uncoded"), "uncoded (n = k, waits for every worker)"),
    Variant("sazd", CodeSpec("sazd", {"systematic": True}), "SAZD systematic"),
    Variant("sazd-nonsys", CodeSpec("sazd", {"systematic": False}), "SAZD non-systematic (paper's form)"),
    Variant("poly", CodeSpec("poly", {"nodes": "integer"}), "Poly, integer nodes (paper's baseline)"),
    Variant("poly-cheb", CodeSpec("poly", {"nodes": "chebyshev"}), "Poly, Chebyshev nodes"),
    Variant("gaussian", CodeSpec("gaussian"), "Gaussian MDS"),
    Variant("cyclic", CodeSpec("cyclic"), "cyclic shift-and-add"),
)


def variants() -> dict[str, Variant]:
    """The variants whose code exists in this sazd (``sazd.codes.CODE_NAMES``), by label."""
    from sazd.codes import CODE_NAMES

    return {v.label: v for v in _VARIANTS if v.name in CODE_NAMES}


def pick_variants(text: str | None, flag: str = "--codes", coded_only: bool = False) -> list[Variant]:
    available = {k: v for k, v in variants().items() if not (coded_only and v.name == "uncoded")}
    if text is None:
        return list(available.values())
    return [available[label] for label in choice_list(text, flag, list(available))]


def check_codes(variants: Sequence[Variant], shapes: Iterable[tuple[int, int]], flags: str) -> None:
    """Build every code of the grid, each variant at each ``(k, n - k)`` of ``shapes``, before anything
    runs or is written: a shape a code refuses (e.g. more workers than any code supports) is a
    ValueError naming ``flags``, the flags that chose it."""
    for k, m in dict.fromkeys(shapes):
        for v in variants:
            n = v.n_for(k, m)
            try:
                v.build(n, k)
            except ValueError as err:
                raise ValueError(f"{flags}: the grid needs {v.label} with n={n}, k={k}, which cannot be "
                                 f"built ({err}); choose smaller values") from None


def save_figure(fig: Any, out: Path, name: str, names: list[str], *, bbox_tight: bool = False) -> None:
    """Lay out ``fig`` (or crop it to its contents with ``bbox_tight``), write it to ``out/name``, close it
    and list the file in ``names``."""
    if not bbox_tight:
        fig.tight_layout()
    write_figure(fig, out / name, **({"bbox_inches": "tight"} if bbox_tight else {}))
    names.append(name)


# ------------------------------------------------------------------ the command
def run_experiment(
    experiment: str,
    args: argparse.Namespace,
    settings: Callable[[argparse.Namespace], dict[str, Any]],
    body: Callable[[dict[str, Any], Path], int],
) -> int:
    """Run ``body(settings(args), output directory)`` holding the directory's lock, and return its exit
    status. A bad flag or ``--out`` (a ValueError from ``settings``, which checks every flag and builds
    every code of the grid, or from :func:`claim_out`; both come before anything is written) is one
    line on stderr and exit status 2."""
    try:
        s = settings(args)
        out = out_path(args.out, experiment)
        lock = claim_out(out, experiment)
    except ValueError as err:
        print(f"sazd experiment {experiment}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    with lock:
        return body(s, out)


def publish(
    out: Path, report: str, cells: list[dict[str, Any]], summary: dict[str, Any], plots: list[str]
) -> int:
    """Write ``report.md`` and the results (:func:`write_results`), print the report and where it all went;
    exit status 0."""
    write_atomic(out / "report.md", report, "report")
    write_results(out, cells, summary)
    print(report)
    print(f"\nwritten: {out}/report.md, results.csv, results.json, {', '.join(plots)}", file=sys.stderr)
    return 0
