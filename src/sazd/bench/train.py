"""`sazd bench train`: iteration time and traffic of naive vs DEU coded training, side by side.

One run, three parts (an MLP ``784 -> W -> ... -> W -> 10``, every hidden layer of width W, batch
128, fp32, SGD with momentum, the code ``--code`` (n, k)):

1. timing: naive and DEU on the ``--backend`` (default: real Ray actors on a local cluster, or the
   running one). Per width and scheme: mean/median iteration seconds over ``--iterations`` after
   ``--warmup``, bytes master->workers and workers->master per iteration from the cluster counters
   next to the model's own traffic formula, and the master's phases (encode, worker rounds, decode,
   update, other).
2. projection: the same configs on the in-process backend with a simulated ``--network-gbps``
   master link (measured compute, simulated transfer): the iteration time on such a cluster.
3. stragglers: DEU with the code and ``--stragglers S`` workers ``--straggler-delay`` times slower
   per task vs none, and uncoded (n = k) likewise, on the in-process simulated clock with a constant
   task time (``--task-time``) on a clock that counts the workers only (the master's measured work is
   reported beside it), and with ``--backend ray`` also on Ray (real sleeps inside the actors).

Every config is measured by ``sazd.measure.training.measure_training``; the formula is the model's
own, ``sazd.parallel.predicted_traffic`` (``layer_traffic`` per coded layer; the first layer's input,
the data, needs no gradient, so it has no input-gradient round and keeps no column copy). It assumes
every worker is asked every round and the first k answers are systematic blocks: exact
without stragglers on the in-process backend with a constant task time. On Ray, an answer from a
parity block (longer for SAZD) or a round that skips a still-busy worker makes the count differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sazd.files import make_dir, write_atomic
from sazd.measure.flags import int_list, output_dir
from sazd.measure.machine import machine, machine_line
from sazd.measure.table import csv_text, table

if TYPE_CHECKING:
    from sazd.data import DataBundle

PHASES = ("encode_s", "worker_s", "decode_s", "update_s", "master_other_s")  # the master's, per iteration
PARTS = ("timing", "projection", "stragglers")


def scheme_names() -> tuple[str, str]:
    """The two schemes compared, naive first (imported here: `sazd --help` stays free of torch)."""
    from sazd.parallel.schemes import DEU, Naive

    return Naive.name, DEU.name


def _deu() -> str:
    return scheme_names()[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Iteration time, bytes and phases of naive vs DEU coded training; stragglers."
    parser.add_argument("--widths", default="1024,2048,4096", help="hidden widths W, comma-separated")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers, all of width W")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=15, help="measured iterations per config")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured iterations first")
    parser.add_argument("--code", default="sazd", help="code name (sazd, poly, gaussian, ...)")
    parser.add_argument("--n", type=int, default=6, help="workers")
    parser.add_argument("--k", type=int, default=4, help="answers needed per round")
    parser.add_argument("--backend", choices=("ray", "inproc"), default="ray", help="backend of part 1")
    parser.add_argument("--address", default=None, help="ray: join this cluster instead of a local one")
    parser.add_argument("--network-gbps", type=float, default=10.0, help="projection: simulated link")
    parser.add_argument("--stragglers", type=int, default=2, help="slow workers S (<= n-k)")
    parser.add_argument("--straggler-delay", type=float, default=5.0, help="their slowdown per task")
    parser.add_argument("--straggler-width", type=int, default=None,
                        help="width of the straggler runs (default: the largest of --widths, where a task's "
                        "compute, not Ray's messaging, dominates, so a real delay shows)")
    parser.add_argument("--task-time", type=float, default=0.02,
                        help="straggler runs: simulated seconds of every healthy worker task")
    parser.add_argument("--ray-stragglers", action=argparse.BooleanOptionalAction, default=None,
                        help="also run part 3 on Ray with real delays (default: when --backend is ray)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run, of {','.join(PARTS)}")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=0, help="master torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None,
                        help="third-party models of sazd.models.zoo, comma-separated (gpt2-hf, llama-hf, "
                        "bert-hf, vit-hf, resnet-hf, vit-timm, transformer-encoder, lora-llama): instead of "
                        "the MLP parts, their coded training step in-process beside the plain step, per "
                        "scheme (uses --code --n --k --batch-size --warmup --iterations --seed --size)")
    parser.add_argument("--size", default=None,
                        help="with --model: the zoo size, tiny (width 64, the default) or base (width 512, "
                        "MLP 2048, 64 tokens, 32x32 images)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and CSV tables here")


# ------------------------------------------------------------------ measuring one config
def config(args: argparse.Namespace, width: int, scheme: str, backend: str, **over: Any) -> Any:
    """The benchmark MLP of the flags at ``width`` (fp32), for ``scheme`` on ``backend``."""
    from sazd.measure.training import bench_config

    fields = dict(depth=args.depth, lr=args.lr, momentum=args.momentum, code=args.code, n=args.n, k=args.k,
                  scheme=scheme, backend=backend, batch_size=args.batch_size, dtype="float32", seed=args.seed,
                  address=args.address)
    return bench_config("mlp", width, **{**fields, **over})


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the three parts
def part_timing(args: argparse.Namespace, widths: list[int], data: DataBundle) -> list[dict[str, Any]]:
    """Every config on one cluster of ``args.backend``: Ray actors start once (each loads torch, which
    takes seconds), and each config loads its own blocks onto them."""
    from sazd.measure.training import measure_training
    from sazd.train.trainer import make_cluster

    rows = []
    with make_cluster(config(args, widths[0], _deu(), args.backend)) as cluster:
        for width in widths:
            for scheme in scheme_names():
                start = time.perf_counter()
                cfg = config(args, width, scheme, args.backend)
                row = {"width": width, **measure_training(cfg, data, args.warmup, args.iterations, cluster)}
                rows.append(row)
                _log(f"timing   {args.backend:6s} W={width:5d} {scheme:5s}: {row['mean_s']:.3f} s/iteration "
                     f"({time.perf_counter() - start:.0f} s)")
    return rows


def part_projection(args: argparse.Namespace, widths: list[int], data: DataBundle) -> list[dict[str, Any]]:
    from sazd.measure.training import link_seconds, measure_training

    rows = []
    for width in widths:
        for scheme in scheme_names():
            start = time.perf_counter()
            cfg = config(args, width, scheme, "inproc", network_gbps=args.network_gbps)
            row = {"width": width, **measure_training(cfg, data, args.warmup, args.iterations)}
            row["network_gbps"] = args.network_gbps
            row["link_s"] = link_seconds(row, args.network_gbps)
            rows.append(row)
            _log(f"project  {args.network_gbps:g} Gb/s W={width:5d} {scheme:5s}: {row['mean_s']:.3f} "
                 f"simulated s/iteration ({time.perf_counter() - start:.0f} s)")
    return rows


def part_stragglers(
    args: argparse.Namespace, width: int, data: DataBundle, backend: str
) -> list[dict[str, Any]]:
    """DEU with the code and uncoded (n = k), each with 0 and S stragglers, on ``backend``.

    In-process: the first S workers get a ``FixedStragglers`` latency model and every healthy task takes
    ``--task-time`` simulated seconds. Ray: one cluster per code; the first S actors are then made
    ``--straggler-delay`` times slower for real (``Worker.set_delay``: they sleep after each product
    and update), so both runs of a code share actors that started once.
    """
    from sazd.train.trainer import make_cluster

    rows = []
    for label, code, n in (("coded", args.code, args.n), ("uncoded", "uncoded", args.k)):
        with contextlib.ExitStack() as stack:
            cluster = None
            if backend == "ray":
                cfg = config(args, width, _deu(), "ray", code=code, n=n)
                cluster = stack.enter_context(make_cluster(cfg))
            for s in (0, args.stragglers):
                start = time.perf_counter()
                row = _straggler_run(args, width, data, cluster, code, n, s)
                row.update(kind=label, stragglers=s, straggler_delay=args.straggler_delay)
                rows.append(row)
                _log(f"straggle {backend:6s} W={width:5d} {label:7s} S={s}: {row['mean_s']:.3f} s/iteration "
                     f"({time.perf_counter() - start:.0f} s)")
    return rows


def _straggler_run(args: argparse.Namespace, width: int, data: DataBundle, cluster: Any, code: str, n: int,
                   s: int) -> dict[str, Any]:
    """One DEU run with ``s`` stragglers: in-process when ``cluster`` is None, else on that Ray cluster."""
    from sazd.measure.training import MASTER_PHASES, measure_training, worker_clock_cluster
    from sazd.runtime.latency import straggler_latency

    if cluster is not None:
        factor = args.straggler_delay if s else 1.0
        cluster.wait_all(cluster.submit("set_delay", (factor,), list(range(args.stragglers))))
        cfg = config(args, width, _deu(), "ray", code=code, n=n)
        return {"width": width, **measure_training(cfg, data, args.warmup, args.iterations, cluster)}
    latency = straggler_latency(s, args.straggler_delay)
    cfg = config(args, width, _deu(), "inproc", code=code, n=n)
    with worker_clock_cluster(n, latency=latency, base_time_s=args.task_time, seed=args.seed) as sim:
        row = {"width": width, **measure_training(cfg, data, args.warmup, args.iterations, sim)}
    master = sum(row["phases_s"][p] for p in MASTER_PHASES)
    row["master_s"] = master  # measured on this machine: what the master's own work would add, serially
    row["mean_with_master_s"] = row["mean_s"] + master
    return row


def straggler_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """with S stragglers / without, for "coded" and "uncoded" (and, where the rows have the master's
    measured work, "<kind>_with_master": the same with that work added)."""
    out = {}
    for kind in ("coded", "uncoded"):
        base = next(r for r in rows if r["kind"] == kind and r["stragglers"] == 0)
        slow = next(r for r in rows if r["kind"] == kind and r["stragglers"] > 0)
        out[kind] = slow["mean_s"] / base["mean_s"]
        if "mean_with_master_s" in base:
            out[f"{kind}_with_master"] = slow["mean_with_master_s"] / base["mean_with_master_s"]
    return out


def scheme_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width: DEU speedup (naive time / DEU time) and bytes ratio naive / DEU (both directions)."""
    out = []
    for width in dict.fromkeys(r["width"] for r in rows):
        naive_name, deu_name = scheme_names()
        naive = next(r for r in rows if r["width"] == width and r["scheme"] == naive_name)
        deu = next(r for r in rows if r["width"] == width and r["scheme"] == deu_name)

        def total(r: dict[str, Any], prefix: str) -> float:
            return r[f"{prefix}_to_workers"] + r[f"{prefix}_from_workers"]

        out.append({
            "width": width,
            "speedup_deu": naive["mean_s"] / deu["mean_s"],
            "speedup_deu_median": naive["median_s"] / deu["median_s"],
            "bytes_ratio": total(naive, "bytes") / total(deu, "bytes"),
            "formula_bytes_ratio": total(naive, "formula") / total(deu, "formula"),
            "sent_once_ratio": (naive["bytes_sent_once"] + naive["bytes_from_workers"])
            / (deu["bytes_sent_once"] + deu["bytes_from_workers"]),
            "formula_sent_once_ratio": (naive["formula_sent_once"] + naive["formula_from_workers"])
            / (deu["formula_sent_once"] + deu["formula_from_workers"]),
        })
        if "link_s" in naive:
            out[-1]["link_speedup"] = naive["link_s"] / deu["link_s"]
    return out


# ------------------------------------------------------------------ output
def _total_bytes(row: dict[str, Any]) -> float:
    return row["bytes_to_workers"] + row["bytes_from_workers"]


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def format_report(rep: dict[str, Any]) -> str:
    m, s = rep["machine"], rep["settings"]
    out = [f"machine: {machine_line(m)}",
           f"model: MLP 784 -> W x{s['depth']} -> 10, batch {s['batch_size']}, fp32, SGD lr={s['lr']} "
           f"momentum={s['momentum']}; code {s['code']} n={s['n']} k={s['k']}; "
           f"{s['warmup']} warmup + {s['iterations']} measured iterations per config"]
    if "timing" in rep:
        out += ["", f"1. iteration time on the {s['backend']} backend (seconds; bytes per iteration in MB)"]
        rows = [[r["width"], r["scheme"], f"{r['mean_s']:.3f}", f"{r['median_s']:.3f}",
                 _mb(r["bytes_to_workers"]), _mb(r["bytes_from_workers"]), _mb(r["bytes_sent_once"]),
                 _mb(r["formula_to_workers"]), _mb(r["formula_from_workers"]), _mb(r["formula_sent_once"]),
                 "yes" if r["bytes_exact"] else "no",
                 *(f"{r['phases_s'][p]:.3f}" for p in PHASES)] for r in rep["timing"]]
        out.append(table(["W", "scheme", "mean_s", "median_s", "to_MB", "from_MB", "once_MB",
                                 "formula_to", "formula_from", "formula_once", "exact", "encode", "workers",
                                 "decode", "update", "other"], rows))
        out += ["", "   DEU vs naive per width:"]
        out.append(table(
            ["W", "DEU speedup (mean)", "(median)", "bytes naive/DEU", "(formula)", "sent once naive/DEU",
             "(formula)"],
            [[r["width"], f"{r['speedup_deu']:.2f}x", f"{r['speedup_deu_median']:.2f}x",
              f"{r['bytes_ratio']:.1f}x", f"{r['formula_bytes_ratio']:.1f}x", f"{r['sent_once_ratio']:.1f}x",
              f"{r['formula_sent_once_ratio']:.1f}x"] for r in rep["timing_ratios"]]))
        out.append("   bytes: to + from workers, each worker's copy of a broadcast counted; sent once: the "
                   "master's egress with each tensor sent once (a multicasting network), + from workers")
    if "projection" in rep:
        out += ["", f"2. projection: in-process backend, simulated {s['network_gbps']:g} Gb/s master link "
                    "(measured compute), simulated seconds per iteration"]
        by = {(r["width"], r["scheme"]): r for r in rep["projection"]}
        rows = []
        for ratio in rep["projection_ratios"]:
            naive, deu = (by[ratio["width"], name] for name in scheme_names())
            rows.append([ratio["width"], f"{naive['mean_s']:.3f}", f"{deu['mean_s']:.3f}",
                         f"{ratio['speedup_deu']:.2f}x", f"{naive['min_s']:.3f}", f"{deu['min_s']:.3f}",
                         _mb(_total_bytes(naive)), _mb(_total_bytes(deu)), f"{naive['link_s']:.3f}",
                         f"{deu['link_s']:.3f}", f"{ratio['link_speedup']:.2f}x"])
        out.append(table(["W", "naive_s", "deu_s", "DEU speedup", "naive_min", "deu_min", "naive_MB",
                                 "deu_MB", "naive_link_s", "deu_link_s", "link speedup"], rows))
    for key, title in (("stragglers", "in-process simulated clock of the workers, constant task time "
                                      f"{s['task_time']:g} s"),
                       ("stragglers_ray", "Ray, real delays inside the actors")):
        if key not in rep:
            continue
        rows_, ratios = rep[key], rep[f"{key}_ratios"]
        out += ["", f"3. stragglers (DEU, W={rows_[0]['width']}, S={s['stragglers']} workers "
                    f"{s['straggler_delay']:g}x slower per task): {title}"]
        master = "master_s" in rows_[0]
        out.append(table(
            ["run", "code", "n", "k", "S", "mean_s", "median_s",
             *(["master_s", "decode_s"] if master else []), "late_discarded", "backlog_kills"],
            [[r["kind"], r["code"].split("(")[0], r["n"], r["k"], r["stragglers"], f"{r['mean_s']:.4f}",
              f"{r['median_s']:.4f}",
              *([f"{r['master_s']:.4f}", f"{r['phases_s']['decode_s']:.4f}"] if master else []),
              r["late_results_discarded"], r["backlog_kills"]] for r in rows_]))
        out.append(f"   with / without stragglers: coded {ratios['coded']:.2f}x, "
                   f"uncoded {ratios['uncoded']:.2f}x")
        if master:
            out.append(f"   adding the master's measured work (encode, decode, update, other) to each: coded "
                       f"{ratios['coded_with_master']:.2f}x, uncoded {ratios['uncoded_with_master']:.2f}x")
    out += ["", f"total {rep['total_s']:.0f} s"]
    return "\n".join(out)


def write_outputs(rep: dict[str, Any], out: Path) -> list[Path]:
    """``results.json`` and one CSV per part in ``out``; nothing is written through a link."""
    make_dir(out, "--out")
    written = [write_atomic(out / "results.json", json.dumps(rep, indent=1), "results")]
    for key in ("timing", "projection", "stragglers", "stragglers_ray"):
        if key in rep:
            flat = [{**{k: v for k, v in r.items() if not isinstance(v, dict)}, **r["phases_s"]}
                    for r in rep[key]]
            written.append(write_atomic(out / f"{key}.csv", csv_text(flat), "table"))
    return written


# ------------------------------------------------------------------ the command
def check_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    widths = int_list(args.widths, "--widths")
    if args.out is not None:
        output_dir(args.out, "--out")  # before the work: a link, a link inside, an unwritable place
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    for name in ("depth", "batch_size", "iterations", "n", "k"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.ray_stragglers is None:
        args.ray_stragglers = args.backend == "ray"
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if "stragglers" in parts and not 1 <= args.stragglers <= args.n - args.k:
        raise ValueError(f"--stragglers {args.stragglers}: the code tolerates 1..n-k={args.n - args.k} "
                         "stragglers; pick S in that range (or leave out the stragglers part)")
    if not args.network_gbps > 0:
        raise ValueError(f"--network-gbps must be > 0, got {args.network_gbps}")
    if not args.task_time > 0:
        raise ValueError(f"--task-time must be > 0, got {args.task_time}")
    if args.straggler_width is not None and args.straggler_width < 1:
        raise ValueError(f"--straggler-width must be >= 1, got {args.straggler_width}")
    if min(widths) < 64:
        raise ValueError(f"--widths {args.widths!r}: widths below 64 are not coded by the default plan; "
                         "use widths >= 64")
    return widths, parts


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested parts; the report dict (what --json prints)."""
    import torch

    from sazd.measure.training import synthetic_data

    widths, parts = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    uses_ray = ((args.backend == "ray" and "timing" in parts)
                or (args.ray_stragglers and "stragglers" in parts))
    rep: dict[str, Any] = {"machine": machine()}
    rep["settings"] = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()
                       if not key.startswith("_") and key not in ("json", "out")}
    data = synthetic_data(args.batch_size * (args.warmup + args.iterations), args.seed)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if uses_ray:  # one Ray for every config: each cluster would otherwise start and stop its own
            from sazd.measure.ray_session import ray_session

            stack.enter_context(ray_session(args.address))
        if "timing" in parts:
            rep["timing"] = part_timing(args, widths, data)
            rep["timing_ratios"] = scheme_ratios(rep["timing"])
        if "projection" in parts:
            rep["projection"] = part_projection(args, widths, data)
            rep["projection_ratios"] = scheme_ratios(rep["projection"])
        if "stragglers" in parts:
            width = args.straggler_width or max(widths)
            rep["stragglers"] = part_stragglers(args, width, data, "inproc")
            rep["stragglers_ratios"] = straggler_ratios(rep["stragglers"])
            if args.ray_stragglers:
                rep["stragglers_ray"] = part_stragglers(args, width, data, "ray")
                rep["stragglers_ray_ratios"] = straggler_ratios(rep["stragglers_ray"])
    rep["total_s"] = time.perf_counter() - start
    return rep


def zoo_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """``--model``: each named zoo model's coded step beside its plain step, naive and DEU."""
    from sazd.models import zoo

    names = [name.strip() for name in args.model.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--model {args.model!r}: name a model, one of {','.join(zoo.ZOO_MODELS)}")
    for name in names:
        zoo.get(name)  # an unknown name: ValueError listing the models
    size = args.size or "tiny"
    if size not in zoo.SIZES:
        raise ValueError(f"--size {size!r}: unknown zoo size; choose one of {','.join(zoo.SIZES)}")
    for flag in ("batch_size", "iterations", "n", "k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rep: dict[str, Any] = {"machine": machine(), "zoo": []}
    start = time.perf_counter()
    for name in names:
        for scheme in scheme_names():
            row = zoo.measure_step(name, scheme, args.code, args.n, args.k, args.batch_size, args.warmup,
                                   args.iterations, args.seed, size)
            rep["zoo"].append(row)
            _log(f"zoo {name} ({size}) {scheme}: coded step {row['ratio']:.2f}x the plain step")
    rep["total_s"] = time.perf_counter() - start
    return rep


def format_zoo(rep: dict[str, Any]) -> str:
    m, rows = rep["machine"], rep["zoo"]
    head = (f"machine: {machine_line(m)}; in-process cluster, code {rows[0]['code']} n={rows[0]['n']} "
            f"k={rows[0]['k']}, size {rows[0]['size']}, batch {rows[0]['batch_size']}, float32 steps (naive: "
            "AdamW, DEU: SGD momentum)")
    rows_table = table(
        ["model", "scheme", "coded/total", "float64 err", "plain ms", "coded ms", "coded/plain", "best",
         "encode", "decode", "workers", "other"],
        [[r["model"], r["scheme"], f"{r['coded']}/{r['total']}", f"{r['float64_error']:.1e}",
          f"{1e3 * r['plain_step_s']:.1f}", f"{1e3 * r['coded_step_s']:.1f}", f"{r['ratio']:.2f}x",
          f"{r['ratio_best']:.2f}x",
          *(f"{1e3 * r['phases_s'][p]:.1f}" for p in ("encode_s", "decode_s", "worker_s", "master_other_s"))]
         for r in rows])
    note = ("   step times: medians; best: the fastest coded step over the fastest plain one; "
            "phases (ms): means per coded step")
    return "\n".join([head, "", rows_table, note,
                      "", f"total {rep['total_s']:.0f} s"])


def run(args: argparse.Namespace) -> int:
    if args.size is not None and args.model is None:
        raise ValueError(f"--size {args.size!r} sizes the zoo models: use it with --model NAME")
    if args.model is not None:
        rep = zoo_benchmark(args)
        print(json.dumps(rep, indent=1) if args.json else format_zoo(rep))
        return 0
    rep = benchmark(args)
    if args.out is not None:
        for path in write_outputs(rep, args.out):
            _log(f"wrote {path}")
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0
