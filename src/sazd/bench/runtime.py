"""`sazd bench runtime`: what sazd's Ray runtime adds on top of bare Ray, measured side by side.

One run, in one Ray, three parts:

1. round: one coded round -- n calls, the first k gathered -- of a ``--rows x --cols`` block times a
   ``--cols x --batch`` input, through ``RayCluster`` (``submit`` + ``first_k``: its direct
   connections) and through bare Ray (``ray.put`` of the input, one actor method call per actor,
   ``ray.wait(num_returns=k)``, ``ray.get``) on two sets of n actors holding the same blocks. Rounds
   alternate between the two, so load from anything else on the machine hits both alike; medians
   are reported.
2. iteration: Ray DEU training iterations of the MLP ``784-W-W-10`` (batch 128, ``--code`` (n, k))
   next to the same iterations in-process, for each ``--widths``, wall time against wall time: the
   same work on the same machine, the in-process master computing every worker's product itself with
   the process's own torch threads (Ray's master runs with ``RayCluster.master_threads``). The ratio
   from the start of a run (the first ``--warmup`` iterations; actor start-up and loading the coded
   blocks excluded, as in-process) and in steady state (median of the following ``--iterations``).
   Also against the in-process simulated clock (the master's measured work plus, per round, the k-th
   fastest worker's measured compute: every worker on a core of its own, transfers free).
3. split: each steady Ray iteration split into master work (encode, decode, update, autograd),
   worker compute (the in-process master's wall time in worker rounds, where it computes all n
   workers' products one after another, / n) and the rest of the time in worker rounds (transfer,
   serialisation, scheduling).
4. floor: the simulated clock gives every worker a core of its own. On a machine with fewer cores
   than workers no runtime can reach it: the least wall time is the master's work plus all n workers'
   compute spread over the cores this process may use, ``master + n * compute * threads / cores``
   (``compute`` measured in-process on ``threads`` threads, counted as if they scaled perfectly:
   exact with ``OMP_NUM_THREADS=1``). Ray's steady iteration over that floor is what the runtime
   itself costs on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sazd.bench import int_list, plane

MASTER = ("encode_s", "decode_s", "update_s", "master_other_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "sazd's Ray runtime vs bare Ray: one coded round and DEU iterations, side by side."
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1024, help="round: block rows per worker")
    parser.add_argument("--cols", type=int, default=1024, help="round: block columns (input rows)")
    parser.add_argument("--batch", type=int, default=128, help="round: input columns")
    parser.add_argument("--rounds", type=int, default=40, help="round: measured rounds per side")
    parser.add_argument("--widths", default="1024,4096", help="iteration: hidden widths W")
    parser.add_argument("--code", default="sazd")
    parser.add_argument("--warmup", type=int, default=3, help="iteration: 'from the start' iterations")
    parser.add_argument("--iterations", type=int, default=8, help="iteration: steady iterations")
    parser.add_argument("--parts", default="round,iteration,plane",
                        help="round, iteration, plane (data-plane modes; comma-separated)")
    parser.add_argument("--master-threads", type=int, default=None,
                        help="iteration: Ray master's torch threads (default: what its workers leave it)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)


class BareWorker:
    """The bare-Ray side: an actor holding one block, answering one product per call."""

    def __init__(self, block: Any) -> None:
        import torch

        torch.set_num_threads(1)
        self.block = block.clone()

    def matmul(self, x: Any) -> Any:
        return self.block @ x


def part_round(args: argparse.Namespace, cluster: Any) -> dict[str, Any]:
    import ray
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    blocks = [torch.randn(args.rows, args.cols, generator=gen) for _ in range(args.n)]
    cluster.wait_all(cluster.submit("load", [({"w": b},) for b in blocks]))
    bare = [ray.remote(BareWorker).options(num_cpus=0.01).remote(b) for b in blocks]
    ray.get([a.matmul.remote(torch.zeros(args.cols, 1)) for a in bare])

    def sazd_round(x: torch.Tensor) -> float:
        start = time.perf_counter()
        got = cluster.first_k(cluster.submit("matmul", ("w", x)), args.k)
        assert len(got) == args.k
        return time.perf_counter() - start

    def bare_round(x: torch.Tensor) -> float:
        start = time.perf_counter()
        ref = ray.put(x)
        refs = [a.matmul.remote(ref) for a in bare]
        ready, _ = ray.wait(refs, num_returns=args.k)
        got = ray.get(ready)
        assert len(got) == args.k
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"sazd": [], "bare": []}
    for i in range(args.rounds + 3):
        x = torch.randn(args.cols, args.batch, generator=gen)
        for name, fn in (("sazd", sazd_round), ("bare", bare_round)) if i % 2 else \
                (("bare", bare_round), ("sazd", sazd_round)):
            t = fn(x)
            if i >= 3:
                times[name].append(t)
        time.sleep(0.01)  # let late answers land, so no round queues behind the previous one
    for actor in bare:
        ray.kill(actor)
    row = {name: {"median_s": statistics.median(ts), "p90_s": sorted(ts)[int(0.9 * len(ts))]}
           for name, ts in times.items()}
    row["ratio"] = row["sazd"]["median_s"] / row["bare"]["median_s"]
    row["payload"] = {"rows": args.rows, "cols": args.cols, "batch": args.batch, "n": args.n, "k": args.k}
    return row


def part_iteration(args: argparse.Namespace, cluster: Any, width: int, own_threads: int) -> dict[str, Any]:
    import itertools

    import torch

    from sazd.bench.train import synthetic_data
    from sazd.data import batches
    from sazd.parallel.schemes import DEU
    from sazd.runtime.placement import usable_cores
    from sazd.train.optim import OptimConfig
    from sazd.train.trainer import TrainConfig, Trainer

    steps = args.warmup + args.iterations
    data = synthetic_data(128 * steps, args.seed)
    out: dict[str, Any] = {"width": width}
    for backend, threads in (("ray", args.master_threads or cluster.master_threads), ("inproc", own_threads)):
        cfg = TrainConfig(model="mlp", dataset="synthetic", hidden=(width, width), code=args.code, n=args.n,
                          k=args.k, scheme=DEU.name, backend=backend, batch_size=128, seed=args.seed,
                          optim=OptimConfig(lr=0.01, momentum=0.9), show_progress=False)
        torch.set_num_threads(threads)
        try:
            with Trainer(cfg, cluster=cluster if backend == "ray" else None, data=data) as trainer:
                # the blocks are loaded (in-process: at once; Ray: calls run in order, so a ping answers
                # after them)
                trainer.cluster.wait_all(trainer.cluster.submit("ping", ()))
                for xb, yb in itertools.islice(batches(data.train_x, data.train_y, 128, args.seed, 0), steps):
                    trainer.step(xb, yb)
                recs = trainer.history
        finally:
            torch.set_num_threads(cluster.master_threads)
        start, steady = recs[: args.warmup], recs[args.warmup:]
        out[backend] = {
            "threads": threads,
            "start_s": statistics.fmean(r["wall_s"] for r in start),
            "steady_s": statistics.median(r["wall_s"] for r in steady),
            "sim_start_s": statistics.fmean(r["iteration_s"] for r in start),
            "sim_steady_s": statistics.median(r["iteration_s"] for r in steady),
            "master_s": statistics.median(sum(r[p] for p in MASTER) for r in steady),
            "worker_s": statistics.median(r["worker_s"] for r in steady),
        }
    ray_, local = out["ray"], out["inproc"]
    out["ratio_start"] = ray_["start_s"] / local["start_s"]
    out["ratio_steady"] = ray_["steady_s"] / local["steady_s"]
    out["ratio_sim_start"] = ray_["start_s"] / local["sim_start_s"]
    out["ratio_sim_steady"] = ray_["steady_s"] / local["sim_steady_s"]
    compute = local["worker_s"] / args.n
    out["split"] = {"master_s": ray_["master_s"], "worker_compute_s": compute,
                    "transfer_and_overhead_s": max(ray_["worker_s"] - compute, 0.0)}
    cores = usable_cores()
    core_s = args.n * compute * min(local["threads"], cores)  # the workers' compute in core-seconds
    out["floor"] = {"cores": cores, "floor_s": local["master_s"] + core_s / cores}
    out["ratio_floor"] = ray_["steady_s"] / out["floor"]["floor_s"]
    return out


def print_iteration(row: dict[str, Any]) -> None:
    ray_, local, split, floor = row["ray"], row["inproc"], row["split"], row["floor"]
    print(f"DEU iteration W={row['width']}, Ray/in-process wall time: {row['ratio_start']:.2f}x from the "
          f"start ({1000 * ray_['start_s']:.0f} vs {1000 * local['start_s']:.0f} ms), "
          f"{row['ratio_steady']:.2f}x steady ({1000 * ray_['steady_s']:.0f} vs "
          f"{1000 * local['steady_s']:.0f} ms; master threads {ray_['threads']} vs {local['threads']})",
          flush=True)
    print(f"  Ray/in-process simulated clock (each worker a core of its own): {row['ratio_sim_start']:.2f}x "
          f"from the start, {row['ratio_sim_steady']:.2f}x steady ({1000 * local['sim_steady_s']:.0f} ms); "
          f"Ray steady split: master {1000 * split['master_s']:.0f} ms, worker compute "
          f"{1000 * split['worker_compute_s']:.0f} ms, transfer+overhead "
          f"{1000 * split['transfer_and_overhead_s']:.0f} ms; floor on {floor['cores']} cores "
          f"{1000 * floor['floor_s']:.0f} ms, Ray/floor {row['ratio_floor']:.2f}x", flush=True)


def check_args(args: argparse.Namespace) -> tuple[set[str], list[int]]:
    """The parts and widths asked for; ValueError naming the flag when anything cannot be run."""
    from sazd.codes import get_code

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"round", "iteration", "plane"} or not parts:
        raise ValueError(f"--parts must name round, iteration and/or plane, got {args.parts!r}")
    widths = int_list(args.widths, "--widths")
    if min(widths) < 64:
        raise ValueError(f"--widths {args.widths!r}: widths below 64 are not coded by the default plan; "
                         "use widths >= 64")
    for name in ("n", "rows", "cols", "batch", "rounds", "warmup", "iterations"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.k <= args.n:
        raise ValueError(f"--k {args.k}: a round gathers k of n={args.n} answers; pick 1 <= k <= n")
    get_code(args.code, args.n, args.k)  # a code that cannot be built is refused before Ray starts
    if args.master_threads is not None and args.master_threads < 1:
        raise ValueError(f"--master-threads must be >= 1, got {args.master_threads}")
    return parts, widths


def run(args: argparse.Namespace) -> int:
    import torch

    from sazd.runtime.ray_backend import RayCluster

    try:
        parts, widths = check_args(args)
    except ValueError as err:
        print(f"sazd bench runtime: error: {err}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"note": "side by side in one run, on one machine; ratios are what to compare"}
    own_threads = torch.get_num_threads()
    with RayCluster(args.n, worker_timeout_s=600) as cluster:
        if "round" in parts:
            row = results["round"] = part_round(args, cluster)
            print(f"round {args.rows}x{args.cols} @ {args.cols}x{args.batch}, first {args.k} of {args.n}: "
                  f"sazd {1000 * row['sazd']['median_s']:.2f} ms, bare Ray "
                  f"{1000 * row['bare']['median_s']:.2f} ms (median), sazd/bare = {row['ratio']:.2f}x",
                  flush=True)
        if "iteration" in parts:
            results["iteration"] = []
            for width in widths:
                row = part_iteration(args, cluster, width, own_threads)
                results["iteration"].append(row)
                print_iteration(row)
        if "plane" in parts:
            results["plane"] = plane.part_plane(args, cluster)
            plane.print_plane(results["plane"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
