"""`sazd design`: compare every code family on (n, k, rows per block) and recommend the cheapest.

Candidates: systematic SAZD with each shift unit g (powers of two and "auto"), the cyclic code with
its choices of the prime q (and its consecutive parity rows, for comparison), Chebyshev Poly and
Gaussian (plain and systematic). For each: the MEASURED worst decode error (workers' products in
``--dtype``, exact float64 reference, over the hardest straggler sets plus a random sample, or every
set when that is no more), the storage overhead (extra rows over an ideal MDS code), and the decode
throughput as a fraction of ``clone()`` of the same bytes (timed side by side, on the hardest kind of
set: min(m, k) missing systematic blocks). The recommendation is the design with the least storage
overhead among those meeting ``--max-error`` (ties: the faster decode, to 0.1 of clone, then the
smaller error), or a plain "none does".
SAZD rows also show the error PREDICTED by the model below.

Error model. Zigzag decoding divides by binomials (z^D - 1), i.e. runs cumulative sums along chains
of about L = r / g rows; each step adds a rounding error of relative size u (the unit roundoff of the
products' dtype), and the parities carry sums of k blocks. With one parity in use the missing block
is a plain difference (no chain): err ~ c1 * u * sqrt(k). With two, one cumulative sum, a random
walk: err ~ c2 * u * sqrt(k) * sqrt(L). With three the
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
import warnings
from typing import TYPE_CHECKING, Any

from sazd.measure.codes import CodeSpec, Op, dtype_label, parse_dtype, received_set, unit_roundoff
from sazd.measure.decode import Problem, measure_worst, pick_sets
from sazd.measure.flags import int_list, json_float
from sazd.measure.machine import machine
from sazd.measure.timing import alternate

if TYPE_CHECKING:
    from sazd.codes.base import Code

# m -> (c_m, p_m) of the power-law model in the module docstring; larger m: (C_MORE, m - 3/2) plus the
# exponential growth RHO_M4 per chain step of the irregular straggler sets.
MODEL: dict[int, tuple[float, float]] = {1: (1.7, 0.0), 2: (1.4, 0.5), 3: (0.5, 1.5)}
C_MORE = 0.5
RHO_M4 = 1.15
DEFAULT_UNITS = "1,2,4,8,16,32,64"


FAMILIES = ("sazd", "cyclic", "poly", "gaussian")


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
    parser.add_argument("--families", default=",".join(FAMILIES), help="code families to compare")
    parser.add_argument("--units", default=DEFAULT_UNITS, help="SAZD shift units g to try (plus 'auto')")
    parser.add_argument("--primes", type=int, default=3, help="cyclic: how many primes q to try")
    parser.add_argument("--samples", type=int, default=16, help="random straggler sets beyond the hard ones")
    parser.add_argument("--cols", type=int, default=8, help="columns of X in the error measurement")
    parser.add_argument("--inner", type=int, default=64, help="inner dimension of W @ X")
    parser.add_argument("--bench-mb", type=float, default=8.0, help="output MB of the timed decodes")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per design (median)")
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


def candidates(args: argparse.Namespace) -> list[CodeSpec]:
    """The designs to compare, as code specs, in the order of the table."""
    from sazd.codes.cyclic import is_prime

    families = [f.strip().lower() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"--families: unknown {unknown or 'empty list'}; choose from {list(FAMILIES)}")
    specs: list[CodeSpec] = []
    if "sazd" in families:
        units: list[int | str] = [*int_list(args.units, "--units"), "auto"]
        specs += [CodeSpec("sazd", {"shift_unit": unit}) for unit in units]
    if "cyclic" in families:
        q, primes = max(args.k, 3), []
        while len(primes) < args.primes:
            primes.append(q) if is_prime(q) else None
            q += 1
        specs += [CodeSpec("cyclic", {"q": p}) for p in primes]
        if args.n - args.k >= 3:  # consecutive rows differ from the searched ones only from m = 3 on
            specs.append(CodeSpec("cyclic", {"q": primes[0], "rows": "consecutive"}))
    if "poly" in families:
        specs += [CodeSpec("poly", {"nodes": "chebyshev", "systematic": s}) for s in (False, True)]
    if "gaussian" in families:
        specs += [CodeSpec("gaussian", {"systematic": s}) for s in (False, True)]
    return specs


def decode_vs_clone(code: Code, k: int, r: int, mb: float, repeats: int, seed: int) -> float:
    """Decode throughput / clone() throughput for min(m, k) missing systematic blocks (the last ones)
    plus as many parity workers, on a random W with about ``mb`` MB of output (fp32, CPU)."""
    import torch


    cols = max(1, round(mb * 1e6 / 4 / (k * r)))
    W = torch.randn(k * r, cols, generator=torch.Generator().manual_seed(seed))
    coded = code.encode(W)
    results = {j: coded[j] for j in received_set(k, code.n, min(code.m, k))}
    with warnings.catch_warnings():  # timing only: an unstable design's error is in its own column
        warnings.simplefilter("ignore")
        code.decode(results, allow_unstable=True)  # plans and certifies this set before timing
        counters = {"bytes_written": W.numel() * 4}
        ops = [Op("clone", "clone", W.clone, counters),
               Op("code", "decode", lambda: code.decode(results, allow_unstable=True), counters)]
        alternate(ops, repeats, warmup=1)
    return ops[0].seconds / ops[1].seconds


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.n <= args.k:
        raise ValueError(
            f"--n must be > --k (every design needs a redundant worker), got n={args.n}, k={args.k}"
        )
    if args.rows < 1:
        raise ValueError(f"--rows (rows per block) must be >= 1, got {args.rows}")
    if not args.max_error > 0:
        raise ValueError(f"--max-error must be > 0, got {args.max_error}")
    if args.repeats < 1 or not args.bench_mb > 0:
        raise ValueError(f"--repeats and --bench-mb must be positive, got {args.repeats}, {args.bench_mb}")
    dtype = parse_dtype(args.dtype)
    specs = candidates(args)
    problem = Problem.random(args.k * args.rows, args.cols, args.inner, args.seed)
    rows = []
    for spec in specs:
        code = spec.build(args.n, args.k)
        sets, total, exhaustive = pick_sets(code, args.samples, args.seed)
        worst = measure_worst(code, problem, sets, dtype, stop_above=1.0)
        overhead = code.overhead_rows(args.k * args.rows)
        row = {
            "family": spec.name, "design": spec.label, "code": repr(code), "overhead_rows": overhead,
            "overhead_pct": 100.0 * overhead / (args.n * args.rows), "measured_error": worst.worst_error,
            "worst_missing": list(worst.worst_missing), "sets_checked": worst.sets_checked,
            "sets_total": total, "exhaustive": exhaustive, "meets": worst.worst_error <= args.max_error,
            "status": worst.status, "predicted_error": None,
            "decode_vs_clone": decode_vs_clone(
                code, args.k, args.rows, args.bench_mb, args.repeats, args.seed),
        }  # fmt: skip
        if spec.name == "sazd":
            g = code.shift_for(args.rows)
            row.update(shift_unit=spec.opts["shift_unit"], g=g, chain_rows=args.rows / g,
                       predicted_error=predicted_error(args.n - args.k, args.k, args.rows, g, dtype))
        rows.append(row)
    ok = [row for row in rows if row["meets"]]
    best = min(ok, key=lambda row: (round(row["overhead_pct"], 2), -round(row["decode_vs_clone"], 1),
                                    row["measured_error"]), default=None)  # fmt: skip
    return {
        "machine": machine(),
        "config": {
            "n": args.n, "k": args.k, "rows_per_block": args.rows, "max_error": args.max_error,
            "dtype": dtype_label(dtype), "samples": args.samples, "cols": args.cols, "seed": args.seed,
        },
        "candidates": rows,
        "recommended": None if best is None else best["design"],
    }  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"n={cfg['n']} k={cfg['k']}, r={cfg['rows_per_block']} rows per block "
        f"({cfg['k'] * cfg['rows_per_block']} total), {cfg['dtype']}, target worst error "
        f"{cfg['max_error']:.1e}",
        f"{'design':<38} {'ovh rows':>8} {'ovh %':>6} {'predicted':>9} {'measured':>9} {'sets':>11} "
        f"{'decode/clone':>12}  meets",
    ]
    lines.append("-" * len(lines[-1]))
    for row in report["candidates"]:
        sets = f"{row['sets_checked']}/{row['sets_total']}"
        predicted = "" if row["predicted_error"] is None else f"{row['predicted_error']:.1e}"
        lines.append(
            f"{row['design']:<38} {row['overhead_rows']:>8} {row['overhead_pct']:>6.2f} {predicted:>9} "
            f"{row['measured_error']:>9.1e} {sets:>11} {row['decode_vs_clone']:>12.2f}  "
            f"{'yes' if row['meets'] else 'no'}" + ("" if row["status"] == "ok" else "  (failed)")
        )
    best = report["recommended"]
    if best is None:
        lines.append(
            f"\nno design meets {cfg['max_error']:.1e}: none of these codes decodes every straggler set this "
            "accurately; try fewer parity workers (n - k), a smaller k, shorter blocks or a wider dtype"
        )
    else:
        row = next(r for r in report["candidates"] if r["design"] == best)
        lines.append(
            f"\nrecommended: {best} ({row['code']}): {row['overhead_rows']} overhead rows "
            f"({row['overhead_pct']:.2f}%), measured worst error {row['measured_error']:.1e}, decode at "
            f"{row['decode_vs_clone']:.2f} of clone()"
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
