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
import sys
import time
from typing import Any

from sazd.bench import plane
from sazd.files import write_atomic
from sazd.measure.flags import int_list, output_file
from sazd.measure.timing import Timed, alternate


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

    x = torch.zeros(args.cols, args.batch)

    def fresh_input(rep: int) -> None:
        nonlocal x
        time.sleep(0.01)  # let late answers land, so no round queues behind the previous one
        x = torch.randn(args.cols, args.batch, generator=gen)

    def sazd_round() -> None:
        got = cluster.first_k(cluster.submit("matmul", ("w", x)), args.k)
        assert len(got) == args.k

    def bare_round() -> None:
        ref = ray.put(x)
        ready, _ = ray.wait([a.matmul.remote(ref) for a in bare], num_returns=args.k)
        assert len(ray.get(ready)) == args.k

    sides = alternate([Timed("sazd", sazd_round), Timed("bare", bare_round)], args.rounds, warmup=3,
                      before_repeat=fresh_input)
    for actor in bare:
        ray.kill(actor)
    row = {side.name: {"median_s": side.median_s, "best_s": side.best_s,
                       "p90_s": sorted(side.times)[int(0.9 * len(side.times))]} for side in sides}
    row["ratio"] = row["sazd"]["median_s"] / row["bare"]["median_s"]
    row["payload"] = {"rows": args.rows, "cols": args.cols, "batch": args.batch, "n": args.n, "k": args.k}
    return row


def part_iteration(args: argparse.Namespace, cluster: Any, width: int, own_threads: int) -> dict[str, Any]:
    import torch

    from sazd.measure.training import bench_config, measure_training, synthetic_data
    from sazd.parallel.schemes import DEU
    from sazd.runtime.placement import usable_cores

    data = synthetic_data(128 * (args.warmup + args.iterations), args.seed)
    out: dict[str, Any] = {"width": width}
    for backend, threads in (("ray", args.master_threads or cluster.master_threads), ("inproc", own_threads)):
        cfg = bench_config("mlp", width, code=args.code, n=args.n, k=args.k, scheme=DEU.name, backend=backend,
                           batch_size=128, seed=args.seed)
        torch.set_num_threads(threads)
        try:
            row = measure_training(cfg, data, args.warmup, args.iterations,
                                   cluster if backend == "ray" else None, wait_loaded=True)
        finally:
            torch.set_num_threads(cluster.master_threads)
        out[backend] = {
            "threads": threads,
            "start_s": row["warmup_wall_s"],
            "steady_s": row["median_wall_s"],
            "sim_start_s": row["warmup_s"],
            "sim_steady_s": row["median_s"],
            "master_s": row["master_median_s"],
            "worker_s": row["phases_median_s"]["worker_s"],
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
    if args.json:
        output_file(args.json, "--json")  # before Ray starts: a link, a directory, an unwritable place
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
        write_atomic(args.json, json.dumps(results, indent=2) + "\n", "--json")
    return 0
