"""`sazd bench tp`: PyTorch tensor parallelism vs sazd on Ray, under the same stragglers.

One run trains the same model (MLP 784-W-W-10 on Fashion-MNIST, or the gpt on pystdlib) on the same
batches with the same optimizer and seed, phase after phase, by TP with k ranks and by each sazd side
(``--sides``: SAZD(k+1,k), SAZD(k+2,k), cyclic(k+2,k), uncoded with k workers), the sides taking
turns, ``--repeats`` times (the best median of each is kept). The phases sweep the straggler
intensity: one worker/rank ``--factors`` times slower, and each call slow (x``--slow-call-factor``)
with probability ``--probs``; ``--extras`` adds a noisy neighbour, shifted-exponential and Pareto
random delays, and a worker that dies mid-run (last: TP stops there). Prints the table (and with
``--profile`` the master's time per DEU iteration); ``--out DIR`` writes JSON, markdown and the plot
with the crossover marked. Every row also gives the side's compute per iteration, its floor on this
machine's cores and the median over it (``sazd.bench.tp.floor``). ``--target`` adds the time each
side takes to a test accuracy (mlp) or validation loss (gpt), per phase (``sazd.bench.tp.target``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SIDES = ("sazd+1", "sazd+2", "cyclic+2", "uncoded")
EXTRAS = ("noisy", "shiftexp", "pareto", "dead")
EVAL_EVERY, MAX_STEPS, EVAL_LIMIT = 5, 300, {"mlp": 1000, "gpt": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "PyTorch tensor parallelism vs sazd on Ray under the same real stragglers."
    parser.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    parser.add_argument("--width", type=int, default=1024, help="mlp: hidden width W of 784-W-W-10")
    parser.add_argument("--gpt", default="256,4,4", help="gpt: channels,layers,heads (heads divisible by k)")
    parser.add_argument("--k", type=int, default=4, help="TP ranks = answers sazd needs per round")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"sazd sides, of {','.join(SIDES)}")
    parser.add_argument("--factors", default="1,2,3,5,10", help="slowdown factors of one worker (1: none)")
    parser.add_argument("--probs", default="0.1,0.25,0.5", help="probabilities of a slow call")
    parser.add_argument("--slow-call-factor", type=float, default=5.0, help="a slow call's factor")
    parser.add_argument("--extras", default=",".join(EXTRAS), help=f"more phases, of {','.join(EXTRAS)} "
                        "('' for none)")
    parser.add_argument("--worker", type=int, default=1, help="the worker/rank that straggles")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps at the start of each phase")
    parser.add_argument("--iterations", type=int, default=15, help="measured steps per phase")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every side, taking turns (best kept)")
    parser.add_argument("--train-limit", type=int, default=4096, help="training samples loaded")
    parser.add_argument("--dataset", default=None, help="default: fashion-mnist (mlp), pystdlib (gpt)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds one TP launch (all its phases) may take")
    parser.add_argument("--target", type=float, default=None,
                        help="also measure the time to this test accuracy (mlp, e.g. 0.75) or validation "
                        "loss (gpt, e.g. 3.2): every phase trains a fresh model until it gets there")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"with --target: evaluate every this many steps (default {EVAL_EVERY})")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"with --target: steps a phase may take to get there (default {MAX_STEPS})")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="with --target: held-out samples (gpt: windows) evaluated on (default "
                        + ", ".join(f"{m} {n}" for m, n in EVAL_LIMIT.items()) + ")")
    parser.add_argument("--profile", action="store_true",
                        help="also print the master's DEU iteration profile")
    parser.add_argument("--quick", action="store_true",
                        help="a small run for the test suite (mlp W=64, k=2, synthetic data, two sides)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, default=None,
                        help="write tp-results.json, tp-report.md, tp-sweep.png there")


QUICK = {"model": "mlp", "width": 64, "k": 2, "sides": "sazd+2,uncoded", "factors": "1,4", "probs": "0.5",
         "extras": "", "batch_size": 32, "warmup": 1, "iterations": 3, "repeats": 1, "train_limit": 256,
         "dataset": "synthetic"}


def _numbers(text: str, flag: str, low: float, high: float | None = None) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None
    bad = [v for v in values if not (low <= v and (high is None or v <= high))]
    if bad:
        raise ValueError(f"{flag}: {bad} out of range [{low}, {high if high is not None else 'inf'}]")
    return values


def _names(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in allowed]
    if unknown:
        raise ValueError(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    return names


def phases(args: argparse.Namespace) -> list[tuple[Any, str | None, float | None]]:
    """(straggler, sweep name, x) for every phase; the dead worker comes last (TP stops there)."""
    from sazd.stragglers import DeadWorker, NoisyNeighbour, NoStraggler, RandomDelays, SlowWorker

    factors = _numbers(args.factors, "--factors", 1.0, 100.0)
    probs = _numbers(args.probs, "--probs", 0.0, 1.0)
    extras = _names(args.extras, "--extras", EXTRAS)
    out: list[tuple[Any, str | None, float | None]] = [(NoStraggler(), "factor", 1.0)]
    out += [(SlowWorker(args.worker, f), "factor", f) for f in factors if f != 1.0]
    out += [(RandomDelays("calls", {"prob": p, "factor": args.slow_call_factor}, args.seed), "prob", p)
            for p in probs if p > 0]
    made = {"noisy": lambda: NoisyNeighbour(args.worker, share=0.2),
            "shiftexp": lambda: RandomDelays("shiftexp", {"shift": 1.0, "rate": 1.0}, args.seed),
            "pareto": lambda: RandomDelays("pareto", {"alpha": 1.5}, args.seed),
            "dead": lambda: DeadWorker(args.worker, after=args.warmup + args.iterations // 2)}
    out += [(made[e](), None, None) for e in extras if e != "dead"]
    out += [(made["dead"](), None, None)] if "dead" in extras else []
    return out


def check(args: argparse.Namespace) -> None:
    for flag in ("k", "warmup", "iterations", "repeats", "batch_size", "train_limit", "width"):
        low = 0 if flag == "warmup" else 1
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    if not 0 <= args.worker < args.k:
        raise ValueError(f"--worker {args.worker} must name a rank in [0, k={args.k})")
    if args.slow_call_factor < 1:
        raise ValueError(f"--slow-call-factor must be >= 1, got {args.slow_call_factor}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.model == "gpt":
        hidden = gpt_hidden(args.gpt)
        if hidden[2] % args.k or hidden[0] % hidden[2]:
            raise ValueError(f"--gpt {args.gpt}: heads must divide over k={args.k} ranks and channels over "
                             "heads")
    target_of(args)
    if args.out is not None:
        from sazd.bench.tp.report import check_out

        check_out(args.out)


def target_of(args: argparse.Namespace) -> Any:
    """The ``Target`` of ``--target`` (None without it); its flags are refused without it."""
    from sazd.bench.tp.target import METRICS, Target

    given = [f"--{name.replace('_', '-')}" for name in ("eval_every", "max_steps", "eval_limit")
             if getattr(args, name) is not None]
    if args.target is None:
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --target; add --target or drop them")
        return None
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    every = EVAL_EVERY if args.eval_every is None else args.eval_every
    most = MAX_STEPS if args.max_steps is None else args.max_steps
    target = Target(METRICS[args.model], args.target, every, most)
    least = args.warmup + args.iterations
    if target.max_steps < least:
        raise ValueError(f"--max-steps {target.max_steps} is below the {least} steps every phase runs "
                         "(--warmup + --iterations); raise it")
    return target


def gpt_hidden(text: str) -> tuple[int, int, int]:
    try:
        c, layers, heads = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--gpt {text!r}: expected channels,layers,heads such as 256,4,4") from None
    if min(c, layers, heads) < 1:
        raise ValueError(f"--gpt {text!r}: every number must be >= 1")
    return c, layers, heads


def command_line(args: argparse.Namespace) -> str:
    flags = ["--model", args.model, "--k", str(args.k), "--sides", args.sides, "--factors", args.factors,
             "--probs", args.probs, "--extras", args.extras, "--repeats", str(args.repeats),
             "--warmup", str(args.warmup), "--iterations", str(args.iterations), "--batch-size",
             str(args.batch_size), "--train-limit", str(args.train_limit)]
    flags += ["--width", str(args.width)] if args.model == "mlp" else ["--gpt", args.gpt]
    target = target_of(args)
    if target is not None:
        flags += ["--target", f"{target.value:g}", "--eval-every", str(target.every), "--max-steps",
                  str(target.max_steps), "--eval-limit", str(eval_limit(args))]
    return "sazd bench tp " + shlex.join(flags)


def eval_limit(args: argparse.Namespace) -> int:
    return EVAL_LIMIT[args.model] if args.eval_limit is None else args.eval_limit


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run(args: argparse.Namespace) -> int:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    check(args)
    from sazd.bench.tp import report
    from sazd.bench.tp.floor import add_work_ratios, cores
    from sazd.bench.tp.sides import TPSide, Workload, sazd_sides
    from sazd.measure.machine import machine, machine_line

    plan = phases(args)
    hidden = (args.width, args.width) if args.model == "mlp" else gpt_hidden(args.gpt)
    dataset = args.dataset or ("fashion-mnist" if args.model == "mlp" else "pystdlib")
    target = target_of(args)
    work = Workload(model=args.model, hidden=hidden, dataset=dataset, train_limit=args.train_limit,
                    batch_size=args.batch_size, warmup=args.warmup, iterations=args.iterations, lr=args.lr,
                    momentum=args.momentum, seed=args.seed, target=target, eval_limit=eval_limit(args))
    coded = sazd_sides(args.k, _names(args.sides, "--sides", SIDES))
    sides = [TPSide(args.k, timeout_s=args.timeout), *coded]
    stragglers = [p[0] for p in plan]
    before = loadavg()
    runs: dict[str, list[list[Any]]] = {side.label: [] for side in sides}
    for rep in range(args.repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:  # taking turns, the order flipped each repeat
            start = time.perf_counter()
            runs[side.label].append(side.run(work, stragglers))
            took = time.perf_counter() - start
            print(f"tp bench: {side.label} run {rep + 1}/{args.repeats} ({took:.0f} s)", file=sys.stderr,
                  flush=True)
    rows = []
    for i, (straggler, sweep, x) in enumerate(plan):
        best = [min((r[i] for r in runs[side.label]), key=lambda p: (p.p50 is None, p.p50 or 0.0)).to_dict()
                for side in sides]
        add_work_ratios(best)
        rows.append({"straggler": straggler.to_dict(), "sweep": sweep, "x": x, "rows": best})
    title = (f"MLP 784-{args.width}-{args.width}-10" if args.model == "mlp" else f"gpt {args.gpt}") + \
        f", batch {args.batch_size}, TP k={args.k} (gloo, CPU)"
    result = {"title": title, "command": command_line(args), "machine": machine_line(machine()),
              "uptime_before": before, "uptime_after": loadavg(), "phases": rows,
              "sweeps": report.sweeps(rows),
              "target": None if target is None else {**target.to_dict(), "eval_limit": work.data.n_test},
              "cores": cores(), "floor_note": report.FLOOR_NOTE,
              "straggler_note": "a slow worker/rank sleeps (f-1) x its measured compute (sazd: per call, TP: "
              "per step); random delays draw the same seeded factors for worker j's t-th call on both sides; "
              "the noisy neighbour and the dead worker are what the table's note says"}
    if args.json:
        import json

        print(json.dumps(result, indent=2, default=str))
    else:
        if result["target"] is not None:
            print("time to target: " + report.target_note(result["target"]))
        print(f"compute floor ({result['cores']} cores): {result['floor_note']}")
        print(report.table(rows, result["target"]))
        for name, data in result["sweeps"].items():
            print(f"crossover ({name}): {report.crossovers(data['crossover'])}")
            if "crossover_time_to_target" in data:
                print(f"crossover of the time to target ({name}): "
                      f"{report.crossovers(data['crossover_time_to_target'])}")
        if args.profile:
            print(report.profile_table(rows))
    if args.out is not None:
        for path in report.write(args.out, result):
            print(f"wrote {path}", file=sys.stderr)
    return 0
