"""`sazd bench runtime --parts plane`: what each data-plane mode costs, side by side.

Three clusters of n workers in one Ray: the default one (``"memory"``: connections sealed with HMAC,
large tensors between the master and the workers on this machine through shared memory, the calls'
through the master's arena, the answers' through each worker's own), one with everything on
its HMAC-sealed sockets (``"hmac"``, ``shared_memory=False``) and one whose sockets also run TLS 1.3
(``"tls"``). Each holds the same blocks. Measured, alternating between them so that load from
anything else on the machine hits all alike:

- round: one coded round (``--rows x --cols`` block times a ``--cols x --batch`` input, first k of
  n), best and median of ``--rounds``;
- throughput: one connection, one 64 MB tensor sent to one worker (which stores it) and
  its short answer back, best of several, in MB/s.
"""

from __future__ import annotations

import argparse
from typing import Any

from sazd.measure.timing import Timed, alternate

MODES = ("memory", "hmac", "tls")
_SENDS = 5
_SEND_MB = 64


def part_plane(args: argparse.Namespace, cluster: Any) -> dict[str, Any]:
    """Round times and one-connection throughput of ``cluster`` (the default data plane) next to twins
    with every tensor on HMAC-sealed sockets and on TLS sockets."""
    import torch

    from sazd.runtime.ray import RayCluster

    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(args.rows, args.cols, generator=gen) for _ in range(args.n)]
    big = torch.randn(_SEND_MB * 2**20 // 4, generator=gen)
    with RayCluster(args.n, worker_timeout_s=600, shared_memory=False) as hmac_cluster, \
            RayCluster(args.n, worker_timeout_s=600, tls=True, shared_memory=False) as tls_cluster:
        clusters = {"memory": cluster, "hmac": hmac_cluster, "tls": tls_cluster}
        for c in clusters.values():
            c.wait_all(c.submit("load", [({"plane": b},) for b in blocks]))
        x = torch.randn(args.cols, args.batch, generator=gen)

        def one_round(c: Any) -> None:
            c.first_k(c.submit("matmul", ("plane", x)), args.k)

        def one_send(c: Any) -> None:
            c.wait_all(c.submit("load", ({"plane_big": big},), [0]))

        # one unmeasured repeat warms connections and allocators; the modes take turns
        rounds = alternate([Timed(m, lambda c=clusters[m]: one_round(c)) for m in MODES], args.rounds,
                           warmup=1)
        sends = alternate([Timed(m, lambda c=clusters[m]: one_send(c)) for m in MODES], _SENDS, warmup=1)
        for c in clusters.values():
            c.wait_all(c.submit("load", ({"plane_big": torch.empty(0)},), [0]))  # free the worker's copy
    mb = big.numel() * 4 / 2**20
    out = {r.name: {"round_best_s": r.best_s, "round_median_s": r.median_s,
                    "throughput_best_mb_s": mb / t.best_s} for r, t in zip(rounds, sends, strict=True)}
    for mode in ("memory", "tls"):
        out[f"round_{mode}_over_hmac"] = out[mode]["round_median_s"] / out["hmac"]["round_median_s"]
        out[f"throughput_{mode}_over_hmac"] = (out[mode]["throughput_best_mb_s"]
                                               / out["hmac"]["throughput_best_mb_s"])
    out["setup"] = {"n": args.n, "k": args.k, "rows": args.rows, "cols": args.cols, "batch": args.batch,
                    "rounds": args.rounds, "send_mb": mb, "sends": _SENDS,
                    "memory_workers": cluster.describe()["shared_memory_workers"],
                    "memory_answers": cluster.describe()["shared_memory_answers"]}
    return out


def print_plane(row: dict[str, Any]) -> None:
    s = row["setup"]
    print(f"data plane, round {s['rows']}x{s['cols']} @ {s['cols']}x{s['batch']}, first {s['k']} of "
          f"{s['n']} (best / median of {s['rounds']}): "
          + ", ".join(f"{m} {1000 * row[m]['round_best_s']:.2f} / {1000 * row[m]['round_median_s']:.2f} ms"
                      for m in MODES)
          + f"; memory/hmac {row['round_memory_over_hmac']:.2f}x, tls/hmac {row['round_tls_over_hmac']:.2f}x"
          + f" ({s['memory_workers']} of {s['n']} workers map the arena, {s['memory_answers']} answer "
          + "through their own)", flush=True)
    print(f"data plane, one connection, {s['send_mb']:.0f} MB to a worker (best of {s['sends']}): "
          + ", ".join(f"{m} {row[m]['throughput_best_mb_s']:.0f} MB/s" for m in MODES)
          + f"; memory/hmac {row['throughput_memory_over_hmac']:.2f}x, "
          + f"tls/hmac {row['throughput_tls_over_hmac']:.2f}x", flush=True)
