"""`sazd experiment stability`: decode-error maps of every code and the storage overhead each costs.

Two parts, every cell one certified measurement (``Code.certify``: decode a random probe from a
straggler set and compare with its exact float64 product, times a safety margin — the error ``decode``
itself checks before it returns):

1. ``codes``: each code over k x (n - k) x rows per block x worker-product dtype; the worst certified
   error over the hard straggler sets and ``--samples`` random ones, the worst set, and the storage
   overhead (extra coded rows over an ideal MDS code, as a fraction of all coded rows).
2. ``shift``: systematic SAZD at ``--shift-k`` over shift unit x rows x (n - k): the design trade-off —
   a larger shift unit shortens zigzag chains (smaller error) and costs extra rows on the parity blocks.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from sazd.experiment import common
from sazd.measure.decode import worst_certified_set
from sazd.measure.figures import pyplot
from sazd.measure.flags import choice_list, int_list, json_float
from sazd.measure.machine import machine, machine_line
from sazd.measure.table import table

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float64": "float64"}
QUICK = dict(ks="2,4,8", ms="1,2,3", rows="64,1024", shift_units="auto,1,16", samples=6)
FULL = dict(ks="2,4,8,12,16", ms="1,2,3,4", rows="64,1024,8192", shift_units="auto,1,4,16,64", samples=20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n")[0].strip("`")
    common.add_common_arguments(parser, "stability")
    parser.add_argument("--codes", default=None, help="comma list of code labels (default: every coded one)")
    parser.add_argument("--ks", default=None, help="comma list of k")
    parser.add_argument("--ms", default=None, help="comma list of n - k (parity workers)")
    parser.add_argument("--rows", default=None, help="comma list of rows per source block")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="worker-product dtypes")
    parser.add_argument(
        "--shift-units", default=None, help="SAZD shift units for the design map (auto or ints)"
    )
    parser.add_argument("--shift-k", type=int, default=8, help="k of the shift-unit map")
    parser.add_argument(
        "--samples", type=int, default=None, help="random straggler sets per cell (plus hard ones)"
    )


def settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    s: dict[str, Any] = {
        "variants": common.pick_variants(args.codes, coded_only=True),
        "ks": int_list(args.ks or base["ks"], "--ks"),
        "ms": int_list(args.ms or base["ms"], "--ms"),
        "rows": int_list(args.rows or base["rows"], "--rows"),
        "dtypes": choice_list(args.dtypes, "--dtypes", list(DTYPES)),
        "samples": base["samples"] if args.samples is None else args.samples,
        "shift_k": args.shift_k,
    }
    units = [u.strip() for u in (args.shift_units or base["shift_units"]).split(",") if u.strip()]
    bad = [u for u in units if u != "auto" and not (u.isdigit() and int(u) >= 1)]
    if not units or bad:
        raise ValueError(f"--shift-units must list 'auto' or integers >= 1, got {args.shift_units!r}")
    s["shift_units"] = units
    if s["samples"] < 1:
        raise ValueError(f"--samples must be >= 1, got {s['samples']}")
    if s["shift_k"] < 2:
        raise ValueError(f"--shift-k must be >= 2, got {s['shift_k']}")
    common.check_codes(s["variants"], [(k, m) for k in s["ks"] for m in s["ms"]], "--ks/--ms")
    sazd = [v for v in common.variants().values() if v.label == "sazd"]
    common.check_codes(sazd, [(s["shift_k"], m) for m in s["ms"]], "--shift-k/--ms")
    return s


def grid(s: dict[str, Any]) -> list[dict[str, Any]]:
    cells = []
    for v in s["variants"]:
        for k in s["ks"]:
            for m in s["ms"]:
                for rows in s["rows"]:
                    for dtype in s["dtypes"]:
                        fields = dict(
                            part="codes", code=v.label, k=k, m=m, rows=rows, dtype=dtype, shift_unit=""
                        )
                        cells.append({"key": common.cell_key(**fields, samples=s["samples"]), **fields})
    if any(v.label == "sazd" for v in common.variants().values()):
        for unit in s["shift_units"]:
            for m in s["ms"]:
                for rows in s["rows"]:
                    for dtype in s["dtypes"]:
                        fields = dict(
                            part="shift",
                            code="sazd",
                            k=s["shift_k"],
                            m=m,
                            rows=rows,
                            dtype=dtype,
                            shift_unit=unit,
                        )
                        cells.append({"key": common.cell_key(**fields, samples=s["samples"]), **fields})
    return cells


def measure(cell: dict[str, Any], samples: int) -> dict[str, Any]:
    """Worst certified error of one (code, k, m, rows, dtype) and its storage overhead."""
    import torch

    v = common.variants()[cell["code"]]
    unit = cell["shift_unit"]
    if unit:
        v = v.with_options(shift_unit=unit if unit == "auto" else int(unit))
    try:
        code = v.build(cell["k"] + cell["m"], cell["k"])
    except ValueError as err:  # e.g. a shift unit this (n, k, rows) cannot use
        return {"status": "invalid", "message": str(err)[:200]}
    total = cell["k"] * cell["rows"]
    received, err, _ = worst_certified_set(code, total, getattr(torch, cell["dtype"]), samples, 0)
    overhead = code.overhead_rows(total) / (code.n * cell["rows"])
    missing = [j for j in range(code.n) if j not in received]
    status = "refused" if not err < 1 else ("unstable" if err > _bound(cell["dtype"]) else "certified")
    return {
        "status": status,
        "error": json_float(err),
        "worst_missing": missing,
        "overhead": overhead,
        "code_repr": repr(code),
    }


def _bound(dtype: str) -> float:
    import torch

    from sazd.codes import warning_bound

    return warning_bound(getattr(torch, dtype))


# ------------------------------------------------------------------ report
def _err(c: dict[str, Any]) -> float:
    return common.read_error(c.get("error")) if c.get("status") != "invalid" else math.nan


def format_report(s: dict[str, Any], cells: list[dict[str, Any]], m: dict[str, Any], plots: list[str]) -> str:
    lines = [
        "# Experiment: decode stability and storage overhead",
        "",
        f"Machine: {machine_line(m)} (errors are deterministic; the machine does not change them).",
        "",
        "## What was run",
        "",
        "Certified relative decode error (`Code.certify`: a probe decoded from the straggler set, compared "
        "with its exact float64 product, times the safety margin `decode` uses) — the worst over the hard "
        f"straggler sets and {s['samples']} random sets — for k in {s['ks']}, n - k in {s['ms']}, rows per "
        f"block {s['rows']}, worker products in {', '.join(s['dtypes'])}. 'refused': >= 1, decoding raises. "
        "Overhead: extra coded rows over an ideal MDS code, as a fraction of all coded rows.",
        "",
    ]
    for dtype in s["dtypes"]:
        for rows in s["rows"]:
            part = [c for c in cells if c["part"] == "codes" and c["dtype"] == dtype and c["rows"] == rows]
            if not part:
                continue
            lines += [f"### {dtype}, {rows} rows per block (worst certified error; overhead in brackets)", ""]
            cols = [(k, mm) for k in s["ks"] for mm in s["ms"]]
            header = ["code"] + [f"k={k} m={mm}" for k, mm in cols]
            body = []
            for v in s["variants"]:
                by = {(c["k"], c["m"]): c for c in part if c["code"] == v.label}
                body.append([v.label] + [_cell_text(by.get(key)) for key in cols])
            lines += [table(header, body, markdown=True), ""]
    shift = [c for c in cells if c["part"] == "shift"]
    if shift:
        lines += [f"### SAZD systematic, k = {s['shift_k']}: shift unit vs error and overhead", ""]
        cols = [(mm, rows) for mm in s["ms"] for rows in s["rows"]]
        body = []
        for dtype in s["dtypes"]:
            for unit in s["shift_units"]:
                by = {
                    (c["m"], c["rows"]): c for c in shift if c["shift_unit"] == unit and c["dtype"] == dtype
                }
                body.append([dtype, unit] + [_cell_text(by.get(key)) for key in cols])
        lines += [
            table(["dtype", "shift unit"] + [f"m={mm} r={rows}" for mm, rows in cols], body, markdown=True),
            "",
        ]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Conclusion", "", conclusion(cells, s), ""]
    return "\n".join(lines)


def _cell_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return "—"
    if c["status"] == "invalid":
        return "n/a"
    text = common.fmt_error(_err(c))
    if c.get("overhead"):
        text += f" (+{c['overhead'] * 100:.1f}%)"
    return text


def conclusion(cells: list[dict[str, Any]], s: dict[str, Any]) -> str:
    f32 = [c for c in cells if c["part"] == "codes" and c["dtype"] == "float32"]
    if not f32:
        return "No float32 cells were run."
    parts = []
    for v in s["variants"]:
        cs = [c for c in f32 if c["code"] == v.label]
        ok = [c for c in cs if _err(c) < _bound("float32")]
        refused = [c for c in cs if c["status"] == "refused"]
        worst_ok_m = max((c["m"] for c in ok), default=None)
        parts.append(
            f"{v.label}: {len(ok)} of {len(cs)} float32 cells certified (<= 1e-3), {len(refused)} refused"
            + (f", certified up to n - k = {worst_ok_m}" if worst_ok_m else "")
        )
    text = "; ".join(parts) + ". "
    m2 = 2 if 2 in s["ms"] else s["ms"][0]
    rows = max(s["rows"])
    trend = []
    for v in s["variants"]:
        cs = sorted(
            (c for c in f32 if c["code"] == v.label and c["m"] == m2 and c["rows"] == rows),
            key=lambda c: c["k"],
        )
        if len(cs) > 1:
            trend.append(
                f"{v.label} {common.fmt_error(_err(cs[0]))} at k={cs[0]['k']} -> "
                f"{common.fmt_error(_err(cs[-1]))} at k={cs[-1]['k']}"
            )
    if trend:
        text += f"Growth with k (float32, n - k = {m2}, {rows} rows): " + "; ".join(trend) + ". "
    return text + (
        "The shift map shows what a larger shift unit buys (shorter zigzag chains, smaller error) and "
        "what it costs (extra parity rows); in bfloat16 every code is limited by bf16 rounding."
    )


def _log_error(err: float) -> float:
    """What the maps colour: log10 of a certified error clipped to [1e-9, 1] (0: refused; nan: none)."""
    return math.log10(min(max(err, 1e-9), 1.0)) if err == err else math.nan


def _heatmap(
    ax: Any,
    values: Any,
    xs: list[Any],
    ys: list[Any],
    xlabel: str,
    title: str,
    fontsize: int,
    notes: dict[tuple[int, int], str] | None = None,
) -> Any:
    """Colour ``values[y, x]`` (log10 errors, 1e-8 .. 1) on ``ax`` and write each measured one on its
    cell ("R": refused), with its line of ``notes`` below; return the image for the colour bar."""
    import numpy as np

    image = ax.imshow(values, origin="lower", cmap="viridis", vmin=-8, vmax=0, aspect="auto")
    for (i, j), val in np.ndenumerate(values):
        if val == val:
            text = "R" if val >= 0 else f"{val:.0f}"
            if notes is not None:
                text += "\n" + notes[i, j]
            color = "white" if val < -4 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=8)
    ax.grid(False)
    return image


def plot(cells: list[dict[str, Any]], s: dict[str, Any], out: Path) -> list[str]:
    import numpy as np

    plt = pyplot()
    names = []
    rows = max(s["rows"])
    for dtype in s["dtypes"]:
        part = [c for c in cells if c["part"] == "codes" and c["dtype"] == dtype and c["rows"] == rows]
        if not part:
            continue
        fig, axes = plt.subplots(
            1, len(s["variants"]), figsize=(2.4 * len(s["variants"]) + 1, 2.8), squeeze=False
        )
        image = None
        for ax, v in zip(axes[0], s["variants"], strict=True):
            grid_ = np.full((len(s["ms"]), len(s["ks"])), np.nan)
            for c in part:
                if c["code"] == v.label:
                    grid_[s["ms"].index(c["m"]), s["ks"].index(c["k"])] = _log_error(_err(c))
            image = _heatmap(ax, grid_, s["ks"], s["ms"], "k (source blocks)", v.label, 7)
        axes[0][0].set_ylabel("n - k (parity workers)")
        cbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
        cbar.set_label("log10 certified rel. error (R: refused)")
        fig.suptitle(
            f"worst certified decode error, {dtype} products, {rows} rows per block", fontsize=9, y=1.03
        )
        common.save_figure(fig, out, f"stability_{dtype}.png", names, bbox_tight=True)
    shift = [c for c in cells if c["part"] == "shift" and c["dtype"] == s["dtypes"][0]]
    if shift:
        fig, axes = plt.subplots(1, len(s["ms"]), figsize=(3.2 * len(s["ms"]) + 1, 2.8), squeeze=False)
        image = None
        for ax, mm in zip(axes[0], s["ms"], strict=True):
            grid_ = np.full((len(s["shift_units"]), len(s["rows"])), np.nan)
            over = {}
            for c in shift:
                if c["m"] == mm and c["status"] != "invalid":
                    i, j = s["shift_units"].index(c["shift_unit"]), s["rows"].index(c["rows"])
                    grid_[i, j] = _log_error(_err(c))
                    over[i, j] = f"+{c.get('overhead', 0.0) * 100:.1f}%"
            title = f"n - k = {mm}"
            image = _heatmap(ax, grid_, s["rows"], s["shift_units"], "rows per source block", title, 6, over)
        axes[0][0].set_ylabel("shift unit g")
        cbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
        cbar.set_label("log10 certified rel. error")
        fig.suptitle(
            f"SAZD k = {s['shift_k']}, {s['dtypes'][0]}: error (top) and extra parity rows (bottom, % of "
            "coded rows)",
            fontsize=9,
            y=1.03,
        )
        common.save_figure(fig, out, "shift_units.png", names, bbox_tight=True)
    return names


def experiment(s: dict[str, Any], out: Path) -> int:
    m = machine()
    cells = common.run_cells(
        common.CellStore(out), grid(s), lambda c: measure(c, s["samples"]), "stability", seconds_per_cell=0.1
    )
    plots = plot(cells, s, out)
    summary = {"machine": m, "settings": common.settings_json(s)}
    return common.publish(out, format_report(s, cells, m, plots), cells, summary, plots)


def run(args: argparse.Namespace) -> int:
    return common.run_experiment("stability", args, settings, experiment)
