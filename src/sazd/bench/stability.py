"""`sazd bench stability`: worst-case relative decode error of every code over straggler sets.

For each code, k, m = n - k, rows per block r and dtype: a random float64 ``W`` (k*r x inner) and
``X`` (inner x cols) are rounded to the dtype, every worker multiplies its coded block by X in that
dtype, each chosen straggler set is decoded, and the worst ``||Y - WX|| / ||WX||`` against the exact
float64 product is reported. Sets: every adjacent window of missing blocks (the longest zigzag
chains, see ``sazd.measure.decode.hard_sets``) plus ``--samples`` random k-subsets; all subsets when that is
no more. Output: a table on stdout, ``stability.csv`` and ``stability.png`` in ``--out``, and
``--json`` prints the results for machines instead of the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from sazd.files import write_atomic
from sazd.measure.codes import CodeSpec, dtype_label, parse_code_spec, parse_dtype
from sazd.measure.decode import Problem, measure_worst, pick_sets
from sazd.measure.figures import pyplot, write_figure
from sazd.measure.flags import int_list, json_float, output_dir
from sazd.measure.machine import machine
from sazd.measure.table import csv_text, table

DEFAULT_CODES = (
    "sazd",
    "sazd:shift_unit=1",
    "sazd:shift_unit=16",
    "sazd:systematic=false",
    "cyclic",
    "poly",
    "poly:nodes=chebyshev",
    "gaussian",
    "gaussian:systematic=true",
)
QUICK = {"k": "2,4", "m": "1,2", "rows": "16,64", "samples": 8}
FIELDS = (
    "code", "k", "m", "n", "rows_per_block", "dtype", "worst_error", "worst_missing", "sets_checked",
    "sets_total", "exhaustive", "overhead_rows", "overhead_pct", "seconds", "status",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1] if __doc__ else None
    parser.add_argument(
        "--codes", nargs="+", default=list(DEFAULT_CODES), metavar="SPEC",
        help="codes as name[:opt=value,...] (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--k", default="2,4,8,12,16", help="source blocks k, comma-separated")
    parser.add_argument("--m", default="1,2,3,4", help="redundant workers m = n - k, comma-separated")
    parser.add_argument("--rows", default="64,1024,8192", help="rows per block r, comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16", help="worker dtypes: fp64, fp32, fp16, bf16")
    parser.add_argument("--samples", type=int, default=16, help="random straggler sets per case")
    parser.add_argument("--cols", type=int, default=8, help="columns of X (the batch)")
    parser.add_argument("--inner", type=int, default=64, help="inner dimension of W @ X")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-above", type=float, default=1.0,
        help="stop checking a case once one set's error exceeds this (the code failed; the worst "
        "reported is then a lower bound); 'inf' checks every set",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-out/stability"), help="output folder")
    parser.add_argument("--plot-k", type=int, default=8, help="k shown in the plot (nearest in --k)")
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of the table")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"tiny grid for smoke tests: k={QUICK['k']}, m={QUICK['m']}, rows={QUICK['rows']}, "
        f"samples={QUICK['samples']}",
    )  # fmt: skip


def measure_case(
    spec: CodeSpec,
    k: int,
    m: int,
    r: int,
    dtype: Any,
    problem: Problem,
    samples: int,
    seed: int,
    stop_above: float = math.inf,
) -> dict[str, Any]:
    """One row of the table: the worst error of code ``spec`` with (n, k) = (k + m, k)."""
    start = time.perf_counter()
    code = spec.build(k + m, k)
    sets, total, exhaustive = pick_sets(code, samples, seed)
    worst = measure_worst(code, problem, sets, dtype, stop_above=stop_above)
    overhead = code.overhead_rows(k * r)
    return {
        "code": spec.label,
        "k": k,
        "m": m,
        "n": k + m,
        "rows_per_block": r,
        "dtype": dtype_label(dtype),
        "worst_error": worst.worst_error,
        "worst_missing": " ".join(map(str, worst.worst_missing)),
        "sets_checked": worst.sets_checked,
        "sets_total": total,
        "exhaustive": exhaustive,
        "overhead_rows": overhead,
        "overhead_pct": 100.0 * overhead / ((k + m) * r),
        "seconds": time.perf_counter() - start,
        "status": worst.status,
    }


def grid(args: argparse.Namespace) -> tuple[list[CodeSpec], list[int], list[int], list[int], list[Any]]:
    """The grid's codes, ks, ms, rows and dtypes from the flags (ValueError naming a bad one)."""
    specs = [parse_code_spec(s) for s in args.codes]
    ks, ms, rows = int_list(args.k, "--k"), int_list(args.m, "--m"), int_list(args.rows, "--rows")
    dtypes = [parse_dtype(d) for d in args.dtypes.split(",") if d.strip()]
    if args.samples < 0:
        raise ValueError(f"--samples must be >= 0, got {args.samples}")
    return specs, ks, ms, rows, dtypes


def run_grid(args: argparse.Namespace, log=None) -> list[dict[str, Any]]:
    specs, ks, ms, rows, dtypes = grid(args)
    results = []
    for k in ks:
        for r in rows:
            problem = Problem.random(k * r, args.cols, args.inner, args.seed)
            for m in ms:
                for spec in specs:
                    for dtype in dtypes:
                        row = measure_case(
                            spec, k, m, r, dtype, problem, args.samples, args.seed, args.stop_above
                        )
                        results.append(row)
                        if log:
                            log(row)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    return table(
        ["code", "k", "m", "r", "dtype", "worst err", "worst missing", "sets", "ovh rows", "ovh %", "status"],
        [[row["code"], row["k"], row["m"], row["rows_per_block"], row["dtype"], fmt_error(row),
          row["worst_missing"], f"{row['sets_checked']}/{row['sets_total']}", row["overhead_rows"],
          f"{row['overhead_pct']:.2f}", row["status"]] for row in results],
    )  # fmt: skip


def fmt_error(row: dict[str, Any]) -> str:
    """The worst error as %.1e, with '>' when checking stopped early (the value is a lower bound)."""
    return (">" if "stopped" in row["status"] else "") + f"{row['worst_error']:.1e}"


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    rows = [{
        **row, "worst_error": f"{row['worst_error']:.3e}", "seconds": f"{row['seconds']:.3f}",
        "overhead_pct": f"{row['overhead_pct']:.3f}",
    } for row in results]  # fmt: skip
    write_atomic(path, csv_text(rows, FIELDS), "table")


def plot(results: list[dict[str, Any]], path: Path, plot_k: int) -> None:
    """Worst error vs rows per block, one line per code; panels: dtype (rows) x m (columns)."""
    plt = pyplot()
    ks = sorted({row["k"] for row in results})
    k = min(ks, key=lambda v: (abs(v - plot_k), -v))
    sel = [row for row in results if row["k"] == k]
    dtypes = list(dict.fromkeys(row["dtype"] for row in sel))
    ms = sorted({row["m"] for row in sel})
    codes = list(dict.fromkeys(row["code"] for row in sel))
    ceiling = 1e2  # non-finite and huge errors are drawn here with an 'x'
    fig, axes = plt.subplots(
        len(dtypes), len(ms), figsize=(3.6 * len(ms), 3.2 * len(dtypes)), squeeze=False, sharex=True
    )
    for di, dt in enumerate(dtypes):
        for mi, m in enumerate(ms):
            ax = axes[di][mi]
            for ci, code in enumerate(codes):
                pts = sorted(
                    (row["rows_per_block"], row["worst_error"])
                    for row in sel
                    if row["code"] == code and row["dtype"] == dt and row["m"] == m
                )
                xs = [p[0] for p in pts]
                ys = [min(p[1], ceiling) if math.isfinite(p[1]) else ceiling for p in pts]
                line = ax.plot(xs, ys, marker="o", ms=3, label=code, color=f"C{ci}")[0]
                over = [(x, y) for (x, e), y in zip(pts, ys, strict=True) if not math.isfinite(e) or e > y]
                if over:
                    ax.plot(*zip(*over, strict=True), "x", ms=8, color=line.get_color())
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylim(top=ceiling * 3)
            ax.axhline(1e-5, color="gray", lw=0.6, ls="--")
            ax.set_title(f"{dt}, k={k}, n-k={m}", fontsize=9)
            if di == len(dtypes) - 1:
                ax.set_xlabel("rows per block r")
            if mi == 0:
                ax.set_ylabel("worst relative error")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Worst-case decode error (x = >= {ceiling:g}, inf or nan; dashed: 1e-5)", fontsize=10)
    fig.tight_layout()
    write_figure(fig, path, dpi=110)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.k, args.m, args.rows, args.samples = QUICK["k"], QUICK["m"], QUICK["rows"], QUICK["samples"]
    import torch

    grid(args)  # every flag checked before anything is made
    output_dir(args.out, "--out")  # before the work: a link, a link inside, an unwritable place
    start = time.perf_counter()
    log = None if args.json else (lambda row: print(
        f"  {row['code']:<24} k={row['k']:<2} m={row['m']} r={row['rows_per_block']:<5} {row['dtype']}: "
        f"{row['worst_error']:.1e} ({row['seconds']:.2f} s)", file=sys.stderr, flush=True))  # fmt: skip
    results = run_grid(args, log)
    elapsed = time.perf_counter() - start
    write_csv(results, args.out / "stability.csv")
    plot(results, args.out / "stability.png", args.plot_k)
    info = {**machine(), "seconds": round(elapsed, 2)}
    if args.json:
        payload = {
            "machine": info,
            "config": {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()
                       if not key.startswith("_")},
            "results": [{**row, "worst_error": json_float(row["worst_error"])} for row in results],
        }  # fmt: skip
        print(json.dumps(payload, indent=1))
    else:
        print(format_table(results))
        print(
            f"\n{len(results)} cases in {elapsed:.1f} s on {info['nproc']} cores, torch "
            f"{torch.__version__} with {info['torch_threads']} threads; wrote {args.out / 'stability.csv'} "
            f"and {args.out / 'stability.png'}"
        )
    return 0
