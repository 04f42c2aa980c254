"""Measuring training iterations: the one loop under `sazd bench train`, `sazd bench runtime` and
`sazd experiment speed`.

:func:`measure_training` runs warmup + measured steps of a ``TrainConfig`` and summarises the measured
ones: iteration time (the cluster's clock: measured, or simulated in-process), wall time, the master's
phases, the bytes the cluster counted next to the model's own traffic formula
(``sazd.parallel.predicted_traffic``) and what the cluster did about stragglers.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import torch

from sazd.codes import DecodeError
from sazd.data import DataBundle, batches
from sazd.parallel import predicted_traffic
from sazd.runtime.cluster import Cluster, ClusterError
from sazd.runtime.inproc import InProcessCluster
from sazd.train.optim import OptimConfig
from sazd.train.trainer import TrainConfig, Trainer

PHASES = ("encode_s", "worker_s", "decode_s", "update_s", "master_other_s")
MASTER_PHASES = ("encode_s", "decode_s", "update_s", "master_other_s")
BYTES = ("bytes_to_workers", "bytes_from_workers", "bytes_sent_once")
IN_SHAPE, CLASSES = (1, 28, 28), 10  # fashion-mnist shaped
STOPPED_BY = (ClusterError, DecodeError)  # what ends a run early (e.g. uncoded with a dead worker)


def bench_config(model: str, width: int, *, depth: int = 2, lr: float = 0.01, momentum: float = 0.9,
                 **fields: Any) -> TrainConfig:
    """The benchmark model on synthetic data: the MLP ``784 -> W x depth -> 10`` or the CNN with W
    hidden units, SGD with momentum, no progress bar; ``fields`` are the rest of the TrainConfig
    (scheme, backend, code, n, k, batch_size, ...)."""
    hidden = (width,) if model == "cnn" else (width,) * depth
    return TrainConfig(model=model, dataset="synthetic", hidden=hidden, show_progress=False,
                       optim=OptimConfig(lr=lr, momentum=momentum), **fields)


def synthetic_data(samples: int, seed: int = 0) -> DataBundle:
    """Random fashion-mnist shaped images and labels (timing does not depend on the values)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, *IN_SHAPE, generator=gen)
    y = torch.randint(0, CLASSES, (samples,), generator=gen)
    return DataBundle("synthetic", x, y, x[:256], y[:256], IN_SHAPE, CLASSES, 0.0, 1.0)


def worker_clock_cluster(n: int, **opts: Any) -> InProcessCluster:
    """An in-process cluster whose simulated clock counts worker tasks (and transfers) only: the
    master's work does not move it, so with a constant task time (``base_time_s``) the clock, and
    with it every iteration time, is exactly reproducible."""
    return InProcessCluster(n, master_time="ignored", **opts)


def measure_training(
    cfg: TrainConfig,
    data: DataBundle,
    warmup: int,
    iterations: int,
    cluster: Cluster | None = None,
    wait_loaded: bool = False,
) -> dict[str, Any]:
    """Run ``warmup + iterations`` training steps of ``cfg`` on ``cluster`` (default: a new one for
    ``cfg``) and summarise the measured ones (the warmup's own means as ``warmup_s`` and
    ``warmup_wall_s``). ``wait_loaded``: wait until every worker holds its blocks before the first
    step (a ping answers after the loads), so the first iterations time training, not loading. The
    errors of ``STOPPED_BY`` (e.g. uncoded training with a dead worker) propagate: the caller decides
    whether they are a result."""
    with Trainer(cfg, cluster=cluster, data=data) as trainer:
        if wait_loaded:
            trainer.cluster.wait_all(trainer.cluster.submit("ping", ()))
        before = trainer.cluster.counters.snapshot()
        steps = batches(data.train_x, data.train_y, cfg.batch_size, cfg.seed, 0)
        for xb, yb in itertools.islice(steps, warmup + iterations):
            trainer.step(xb, yb)
            trainer.repair_dead()  # a straggler whose backlog grew too long is replaced, as in training
        first, recs = trainer.history[:warmup], trainer.history[warmup:]
        formula = predicted_traffic(trainer.model)
        after = trainer.cluster.counters.snapshot()
        repairs = len(trainer.maintainer.repairs)
        code = repr(trainer.code)
    times = [r["iteration_s"] for r in recs]
    return {
        "scheme": cfg.scheme,
        "code": code,
        "n": cfg.n,
        "k": cfg.k,
        "backend": cfg.backend,
        "iterations": len(recs),
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_wall_s": statistics.fmean(r["wall_s"] for r in recs),
        "median_wall_s": statistics.median(r["wall_s"] for r in recs),
        **{key: statistics.fmean(r[key] for r in recs) for key in BYTES},
        **{key.replace("bytes", "formula"): formula[key] for key in BYTES},
        "bytes_exact": all(r[key] == formula[key] for r in recs for key in BYTES),
        "phases_s": {p: statistics.fmean(r[p] for r in recs) for p in PHASES},
        "phases_median_s": {p: statistics.median(r[p] for r in recs) for p in PHASES},
        "master_median_s": statistics.median(sum(r[p] for p in MASTER_PHASES) for r in recs),
        "warmup_s": statistics.fmean(r["iteration_s"] for r in first) if first else None,
        "warmup_wall_s": statistics.fmean(r["wall_s"] for r in first) if first else None,
        "late_results_discarded": after["late_results_discarded"] - before["late_results_discarded"],
        "backlog_kills": after["backlog_kills"] - before["backlog_kills"],
        "repairs": repairs,
    }


def link_seconds(row: dict[str, Any], network_gbps: float) -> float:
    """Seconds per iteration the busier side of a full-duplex master link of ``network_gbps`` is
    occupied by ``row``'s bytes."""
    return max(row["bytes_to_workers"], row["bytes_from_workers"]) / (network_gbps * 1e9 / 8)
