"""`sazd bench codec`: encode and decode throughput of each code next to a plain ``clone()``.

Throughput is GB/s of OUTPUT bytes (encode: all n coded blocks; decode: the k*r decoded rows).
Encoding is timed twice: of ``W`` stored by rows, and of the same ``W`` stored as its transpose (a
view ``W^T`` of a row-major ``(cols, rows)`` tensor: what DEU encodes, ``dY^T`` and ``X^T``). The
physical reference is ``clone()`` of a tensor with the same number of bytes as each output, timed in
the same run and interleaved with the codecs (``sazd.measure.timing.alternate``: every repeat runs
every operation once, so load changes hit all of them alike); each figure is the median of
``--repeats`` after ``--warmup``.
Decoding uses exactly k results: the systematic workers minus a window of ``s`` adjacent missing
blocks (the last s: the longest zigzag chains), plus the first s parity workers. Decode plans are
cached by the codes, so warmup also covers planning. Every decode is also timed uncertified
(``certify=False``) in the same round-robin, and the report puts the two side by side (best of the
repeats): what certification costs per decode once its probes are cached.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

from sazd.measure.codes import CodeSpec, Op, dtype_label, parse_code_spec, parse_dtype, received_set
from sazd.measure.flags import int_list
from sazd.measure.machine import machine
from sazd.measure.table import table
from sazd.measure.timing import alternate

DEFAULT_CODES = ("sazd", "cyclic", "poly", "poly:nodes=chebyshev", "poly:systematic=true", "gaussian")
UNCERTIFIED = ", uncertified"  # suffix of the op timing the same decode with certify=False
TRANSPOSED = "encode W^T view"  # the same encode of W stored transposed (an activation's transpose)
QUICK = {"rows": 256, "cols": 32, "repeats": 3, "warmup": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1] if __doc__ else None
    parser.add_argument(
        "--codes", nargs="+", default=list(DEFAULT_CODES), metavar="SPEC",
        help="codes as name[:opt=value,...] (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=8, help="source blocks")
    parser.add_argument("--n", type=int, default=10, help="workers")
    parser.add_argument("--rows", type=int, default=4096, help="TOTAL rows of W@X (k * rows per block)")
    parser.add_argument("--cols", type=int, default=512, help="columns of W@X")
    parser.add_argument("--dtype", default="fp32", help="fp64, fp32, fp16 or bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--missing", default="1,2", help="numbers of missing systematic blocks to decode")
    parser.add_argument("--repeats", type=int, default=100, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of the table")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"tiny sizes for smoke tests: rows={QUICK['rows']}, cols={QUICK['cols']}, "
        f"repeats={QUICK['repeats']}",
    )  # fmt: skip


def build_ops(spec: CodeSpec, args: argparse.Namespace, W: Any, stored_transposed: Any,
              missing: list[int]) -> list[Op]:
    """Encode (of ``W``, and of the same matrix ``stored_transposed``: a ``W^T`` view, as DEU encodes
    ``dY^T`` and ``X^T``) and one decode per entry of ``missing`` for one code, with their byte
    counters."""
    code = spec.build(args.n, args.k)
    item = W.element_size()
    r = W.shape[0] // args.k
    block_rows = code.block_rows(r)
    coded = code.encode(W)
    in_bytes = W.numel() * item
    encoded = {"bytes_read": in_bytes, "bytes_written": sum(block_rows) * args.cols * item,
               "rows_written": sum(block_rows), "rows_solved": 0, "max_abs_error": 0.0}
    ops = [Op(spec.label, "encode", lambda: code.encode(W), encoded),
           Op(spec.label, TRANSPOSED, lambda: code.encode(stored_transposed), encoded)]
    for s in missing:
        received = received_set(args.k, args.n, s)
        results = {j: coded[j] for j in received}
        # also plans and certifies this set before timing; a set certification would refuse (e.g. Poly
        # on integer nodes) is still timed, with its UnstableDecodeWarning and its error in the table
        decoded = code.decode(results, allow_unstable=True)
        error = float((decoded.double() - W.double()).abs().max())
        solved = s * r if code.is_systematic else args.k * r
        counters = {
            "bytes_read": sum(block_rows[j] for j in received) * args.cols * item,
            "bytes_written": in_bytes, "rows_written": args.k * r, "rows_solved": solved,
            "max_abs_error": error,
        }  # fmt: skip
        for suffix, certify in (("", True), (UNCERTIFIED, False)):
            timed = functools.partial(code.decode, results, allow_unstable=True, certify=certify)
            ops.append(Op(spec.label, f"decode {s} missing{suffix}", timed, counters))
    return ops


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.quick:
        args.rows, args.cols, args.repeats, args.warmup = (
            QUICK["rows"], QUICK["cols"], QUICK["repeats"], QUICK["warmup"])  # fmt: skip
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} asked for CUDA but torch sees no GPU; use --device cpu")
    for flag in ("repeats", "cols", "rows"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    missing = int_list(args.missing, "--missing") if args.missing.strip() not in ("", "0") else []
    dtype = parse_dtype(args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    W = torch.randn(args.rows, args.cols, generator=gen).to(device=args.device, dtype=dtype)
    stored_transposed = W.T.contiguous().T  # the same matrix, held as its transpose
    ops: list[Op] = []
    for text in args.codes:
        ops += build_ops(parse_code_spec(text), args, W, stored_transposed, missing)
    clones: dict[int, Op] = {}  # the physical reference, one per output size
    for nbytes in sorted({op.out_bytes for op in ops}):
        src = torch.randn(nbytes // W.element_size(), generator=gen).to(device=args.device, dtype=dtype)
        clones[nbytes] = Op("clone", "clone", src.clone, {
            "bytes_read": nbytes, "bytes_written": nbytes, "rows_written": 0, "rows_solved": 0,
            "max_abs_error": 0.0,
        })  # fmt: skip
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    alternate([*clones.values(), *ops], args.repeats, args.warmup, sync)

    rows = []
    for op in ops:
        if op.op.endswith(UNCERTIFIED):  # reported next to its certified twin only
            continue
        ref = clones[op.out_bytes]
        rows.append({
            "code": op.code, "op": op.op, "out_mb": op.out_bytes / 1e6, "median_ms": op.seconds * 1e3,
            "gbps": op.gbps, "clone_gbps": ref.gbps, "vs_clone": op.gbps / ref.gbps, **op.counters,
        })  # fmt: skip
    return {
        "machine": machine(args.device),
        "config": {
            "k": args.k, "n": args.n, "rows": args.rows, "rows_per_block": args.rows // args.k,
            "cols": args.cols, "dtype": dtype_label(dtype), "repeats": args.repeats, "warmup": args.warmup,
            "codes": [parse_code_spec(c).label for c in args.codes],
        },
        "results": rows,
        "speedups": speedups(rows),
        "certification": certification_cost(ops),
    }  # fmt: skip


def certification_cost(ops: list[Op]) -> list[dict[str, Any]]:
    """Each decode next to the same decode uncertified: best times (ms) of the alternating repeats."""
    plain = {(op.code, op.op): op for op in ops if op.op.endswith(UNCERTIFIED)}
    out = []
    for op in ops:
        other = plain.get((op.code, op.op + UNCERTIFIED))
        if other is not None:
            out.append({"code": op.code, "op": op.op, "certified_ms": op.best_seconds * 1e3,
                        "uncertified_ms": other.best_seconds * 1e3,
                        "ratio": op.best_seconds / other.best_seconds})  # fmt: skip
    return out


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every decode case: time of each other code / time of the first code (SAZD by default)."""
    if not rows:
        return []
    first = rows[0]["code"]
    out = []
    for base in (r for r in rows if r["code"] == first):
        for other in (r for r in rows if r["op"] == base["op"] and r["code"] != first):
            out.append({"op": base["op"], "code": first, "vs": other["code"],
                        "speedup": other["median_ms"] / base["median_ms"]})  # fmt: skip
    return out


def format_report(report: dict[str, Any]) -> str:
    cfg, mach = report["config"], report["machine"]
    lines = [
        f"k={cfg['k']} n={cfg['n']} rows={cfg['rows']} ({cfg['rows_per_block']} per block) "
        f"cols={cfg['cols']} {cfg['dtype']} on {mach['device']}; torch {mach['torch']} with "
        f"{mach['torch_threads']} threads, {mach['nproc']} cores (load {mach['loadavg_at_start']}); median "
        f"of {cfg['repeats']}",
        table(
            ["code", "op", "out MB", "median ms", "GB/s", "clone GB/s", "vs clone", "read MB", "rows solved",
             "max abs err"],
            [[r["code"], r["op"], f"{r['out_mb']:.2f}", f"{r['median_ms']:.3f}", f"{r['gbps']:.2f}",
              f"{r['clone_gbps']:.2f}", f"{r['vs_clone']:.2f}", f"{r['bytes_read'] / 1e6:.2f}",
              r["rows_solved"], f"{r['max_abs_error']:.1e}"] for r in report["results"]],
        ),
        "",
    ]  # fmt: skip
    for s in report["speedups"]:
        lines.append(f"{s['op']:<17} {s['code']} is {s['speedup']:.2f}x as fast as {s['vs']}")
    if report["certification"]:
        lines += ["", f"certified vs uncertified decode, best of {cfg['repeats']} alternating repeats:",
                  f"{'code':<22} {'op':<17} {'certified ms':>12} {'uncertified ms':>14} {'ratio':>6}"]
        for c in report["certification"]:
            lines.append(f"{c['code']:<22} {c['op']:<17} {c['certified_ms']:>12.3f} "
                         f"{c['uncertified_ms']:>14.3f} {c['ratio']:>6.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = measure(args)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
