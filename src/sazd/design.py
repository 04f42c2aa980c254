"""`sazd design`: choose the SAZD shift unit g for given n, k and rows per block.

For each candidate g (powers of two and "auto") it shows the overhead rows (``overhead_rows``), the
PREDICTED worst decode error of the model below and the MEASURED worst error (systematic SAZD,
workers' products in ``--dtype``, exact float64 reference, over the hardest straggler sets plus a
random sample), and recommends the g with the fewest overhead rows whose measured error meets
``--max-error``.

Error model. Zigzag decoding divides by binomials (z^D - 1), i.e. runs cumulative sums along chains
of about L = r / g rows; each step adds a rounding error of relative size u (the unit roundoff of the
products' dtype), and the parities carry sums of k blocks. With one parity in use the missing block
is a plain difference (no chain): err ~ c1 * u * sqrt(k). With two, one cumulative sum, a random
walk: err ~ c2 * u * sqrt(k) * sqrt(L) (about eps * sqrt(k * r / g)). With three the
divisions nest once more and the walk of a walk grows like L^(3/2). So, for m = n - k <= 3:

    predicted = c_m * u * sqrt(k) * L ** p_m,    L = max(1, r / g),

with p_1 = 0, p_2 = 1/2, p_3 = 3/2 (derived; free least-squares fits on log error gave 0.00, 0.47,
1.41) and c_m fitted to the fp32 results of ``sazd bench stability`` (systematic SAZD, k in
{2..16}, r in {64, 1024, 8192}, g in {1, 16, auto}): c_1 = 1.7, c_2 = 1.4, c_3 = 0.5; for m >= 4
the same law continues with p_m = m - 3/2, c_m = 0.5 for the regular sets. But with m >= 4 some
straggler sets (three non-adjacent missing systematic blocks plus a missing middle parity) leave
equations that are not a Vandermonde system in binomials; the general zigzag peel then divides by a
polynomial with roots inside the unit circle and the error grows EXPONENTIALLY along the chain, even
in float64: u * sqrt(k) * rho ** L with rho = 1.15 fitted for k = 8..16 (k = 4 measured 1.28). The
prediction for m >= 4 is the larger of the two terms. The model is a guide; the measurement decides.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from sazd.bench import (
    Problem,
    dtype_label,
    int_list,
    json_float,
    machine_info,
    measure_worst,
    parse_dtype,
    pick_sets,
    unit_roundoff,
)

# m -> (c_m, p_m) of the power-law model in the module docstring; larger m: (C_MORE, m - 3/2) plus the
# exponential growth RHO_M4 per chain step of the irregular straggler sets.
MODEL: dict[int, tuple[float, float]] = {1: (1.7, 0.0), 2: (1.4, 0.5), 3: (0.5, 1.5)}
C_MORE = 0.5
RHO_M4 = 1.15
DEFAULT_UNITS = "1,2,4,8,16,32,64"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1] if __doc__ else None
    parser.add_argument("--n", type=int, required=True, help="workers")
    parser.add_argument("--k", type=int, required=True, help="source blocks (workers needed)")
    parser.add_argument(
        "--rows", type=int, required=True,
        help="rows PER BLOCK r (each worker's share of the layer's output rows; total rows = k * r)",
    )  # fmt: skip
    parser.add_argument("--max-error", type=float, default=1e-5, help="worst relative error allowed")
    parser.add_argument("--dtype", default="fp32", help="dtype of the workers' products: fp64/fp32/fp16/bf16")
    parser.add_argument("--units", default=DEFAULT_UNITS, help="shift units g to try (plus 'auto')")
    parser.add_argument("--samples", type=int, default=16, help="random straggler sets beyond the hard ones")
    parser.add_argument("--cols", type=int, default=8, help="columns of X in the measurement")
    parser.add_argument("--inner", type=int, default=64, help="inner dimension of W @ X")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of the table")


def predicted_error(m: int, k: int, r: int, g: int, dtype: Any) -> float:
    """The model of the module docstring: ``c_m * u * sqrt(k) * L ** p_m``, and for m >= 4 at least
    ``u * sqrt(k) * RHO_M4 ** L``, with chain length L = max(1, r / g)."""
    chain = max(1.0, r / g)
    scale = unit_roundoff(dtype) * math.sqrt(k)
    if m in MODEL:
        c, p = MODEL[m]
        return c * scale * chain**p
    power = C_MORE * scale * chain ** (m - 1.5)
    return max(power, scale * math.exp(min(chain * math.log(RHO_M4), 700.0)))  # capped: no overflow


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from sazd.codes import SAZD

    if args.n <= args.k:
        raise ValueError(f"--n must be > --k (SAZD needs a redundant worker), got n={args.n}, k={args.k}")
    if args.rows < 1:
        raise ValueError(f"--rows (rows per block) must be >= 1, got {args.rows}")
    if not args.max_error > 0:
        raise ValueError(f"--max-error must be > 0, got {args.max_error}")
    dtype = parse_dtype(args.dtype)
    units: list[int | str] = [*int_list(args.units, "--units"), "auto"]
    problem = Problem.random(args.k * args.rows, args.cols, args.inner, args.seed)
    rows = []
    for unit in units:
        code = SAZD(args.n, args.k, systematic=True, shift_unit=unit)
        g = code.shift_for(args.rows)
        sets, total, exhaustive = pick_sets(code, args.samples, args.seed)
        worst = measure_worst(code, problem, sets, dtype, stop_above=1.0)
        overhead = code.overhead_rows(args.k * args.rows)
        rows.append({
            "shift_unit": unit, "g": g, "chain_rows": args.rows / g, "overhead_rows": overhead,
            "overhead_pct": 100.0 * overhead / (args.n * args.rows),
            "predicted_error": predicted_error(args.n - args.k, args.k, args.rows, g, dtype),
            "measured_error": worst.worst_error, "worst_missing": list(worst.worst_missing),
            "sets_checked": worst.sets_checked, "sets_total": total, "exhaustive": exhaustive,
            "meets": worst.worst_error <= args.max_error, "status": worst.status,
        })  # fmt: skip
    ok = [row for row in rows if row["meets"]]
    best = min(ok, key=lambda row: (row["overhead_rows"], row["measured_error"], row["g"]), default=None)
    return {
        "machine": machine_info(),
        "config": {
            "n": args.n, "k": args.k, "rows_per_block": args.rows, "max_error": args.max_error,
            "dtype": dtype_label(dtype), "samples": args.samples, "cols": args.cols, "seed": args.seed,
        },
        "candidates": rows,
        "recommended": None if best is None else best["shift_unit"],
    }  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"SAZD systematic n={cfg['n']} k={cfg['k']}, r={cfg['rows_per_block']} rows per block "
        f"({cfg['k'] * cfg['rows_per_block']} total), {cfg['dtype']}, target worst error "
        f"{cfg['max_error']:.1e}",
        f"{'shift unit':>10} {'g':>4} {'chain r/g':>9} {'ovh rows':>8} {'ovh %':>6} {'predicted':>9} "
        f"{'measured':>9} {'sets':>9}  meets",
    ]
    lines.append("-" * len(lines[-1]))
    for row in report["candidates"]:
        sets = f"{row['sets_checked']}/{row['sets_total']}"
        lines.append(
            f"{row['shift_unit']!s:>10} {row['g']:>4} {row['chain_rows']:>9.1f} {row['overhead_rows']:>8} "
            f"{row['overhead_pct']:>6.2f} {row['predicted_error']:>9.1e} {row['measured_error']:>9.1e} "
            f"{sets:>9}  {'yes' if row['meets'] else 'no'}"
            + ("" if row["status"] == "ok" else f"  ({row['status']})")
        )
    best = report["recommended"]
    if best is None:
        lines.append(
            f"\nno shift unit meets {cfg['max_error']:.1e}: try larger --units, fewer parity workers "
            "(n - k), shorter blocks (smaller rows per block) or a wider dtype"
        )
    else:
        row = next(r for r in report["candidates"] if r["shift_unit"] == best)
        lines.append(
            f"\nrecommended: shift_unit={best} (g={row['g']}): {row['overhead_rows']} overhead rows "
            f"({row['overhead_pct']:.2f}%), measured worst error {row['measured_error']:.1e}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = evaluate(args)
    if args.json:
        for row in report["candidates"]:
            row["measured_error"] = json_float(row["measured_error"])
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0 if report["recommended"] is not None else 1
