"""The two sides of `sazd bench tp`, training the same model on the same batches with the same
optimizer and seed, under the same stragglers:

- ``TPSide``: PyTorch tensor parallelism, ``k`` ranks (``sazd.bench.tp.launch``), one launch per
  run of phases.
- ``SazdSide``: sazd on Ray with ``n`` workers and a code (``SAZD(k+1, k)``, ``SAZD(k+2, k)``,
  ``cyclic(k+2, k)``, or uncoded with ``n = k``), DEU; one cluster per run of phases.

A run is a list of phases, one ``Straggler`` each, ``warmup + iterations`` training steps each;
training goes on from phase to phase. Both sides return one ``PhaseResult`` per phase: the measured
iteration times (after the warm-up), the losses, which workers the straggler slowed and how many
times (TP: the ranks' recorded sleeps; sazd: the master's ``Recorder`` of the factors it sent), and
how the run ended (TP: stops when a rank dies; sazd: repairs).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sazd.stragglers import Recorder, Straggler


@dataclass(frozen=True)
class Workload:
    """The model, data and optimizer both sides train."""

    model: str = "mlp"  # "mlp" (784-W-W-10 on fashion-mnist) or "gpt" (on pystdlib)
    hidden: tuple[int, ...] = (1024, 1024)
    dataset: str = "fashion-mnist"
    train_limit: int = 4096
    batch_size: int = 128
    warmup: int = 3
    iterations: int = 15
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    dtype: str = "float32"

    @property
    def steps(self) -> int:
        return self.warmup + self.iterations

    @cached_property
    def data(self) -> Any:
        import torch

        from sazd.data import load_dataset

        if self.dataset == "synthetic":
            from sazd.measure.training import synthetic_data

            bundle = synthetic_data(self.train_limit, self.seed)
            bundle.train_x = bundle.train_x.to(getattr(torch, self.dtype))
            return bundle
        return load_dataset(self.dataset, train_limit=self.train_limit, test_limit=64, seed=self.seed,
                            dtype=getattr(torch, self.dtype))

    def tp_spec(self, phases: list[Straggler]) -> dict[str, Any]:
        return {"model": self.model, "in_shape": list(self.data.in_shape),
                "num_classes": self.data.num_classes, "hidden": list(self.hidden), "seed": self.seed,
                "dtype": self.dtype, "dataset": self.dataset,
                "train_limit": self.train_limit, "batch_size": self.batch_size, "steps": self.steps,
                "lr": self.lr, "momentum": self.momentum, "phases": [p.to_dict() for p in phases]}

    def batches(self) -> list[Any]:
        """The ``steps`` batches of every phase, exactly the TP ranks' (``rank.spec_batches``)."""
        from sazd.bench.tp.rank import spec_batches

        spec = {"batch_size": self.batch_size, "steps": self.steps, "seed": self.seed}
        return spec_batches(spec, self.data)

    def train_config(self, code: str, n: int, k: int) -> Any:
        from sazd.train.optim import OptimConfig
        from sazd.train.trainer import TrainConfig

        return TrainConfig(model=self.model, dataset=self.dataset, hidden=tuple(self.hidden), code=code, n=n,
                           k=k, scheme="deu", backend="ray", batch_size=self.batch_size, dtype=self.dtype,
                           optim=OptimConfig(lr=self.lr, momentum=self.momentum), seed=self.seed,
                           show_progress=False)


@dataclass
class PhaseResult:
    """One side in one phase."""

    side: str
    workers: int
    straggler: dict[str, Any]
    iteration_s: list[float]
    loss: list[float]
    slowed: dict[int, int]  # worker -> calls (sazd) or steps (TP) it was slowed
    stopped: str | None = None
    repairs: int = 0
    neighbour: str | None = None
    compute_s: float | None = None  # TP: a rank's measured compute per step
    profile: dict[str, float] = field(default_factory=dict)  # sazd: the master's phases per iteration

    @property
    def p50(self) -> float | None:
        return statistics.median(self.iteration_s) if self.iteration_s else None

    @property
    def p95(self) -> float | None:
        if not self.iteration_s:
            return None
        ordered = sorted(self.iteration_s)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    @property
    def cost(self) -> float | None:
        """Per-worker cost of an iteration: p50 seconds x workers."""
        return None if self.p50 is None else self.p50 * self.workers

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "workers": self.workers, "straggler": self.straggler, "p50_s": self.p50,
                "p95_s": self.p95, "cost_worker_s": self.cost, "iteration_s": self.iteration_s,
                "loss": self.loss, "slowed": {str(w): c for w, c in self.slowed.items()},
                "stopped": self.stopped, "repairs": self.repairs, "neighbour": self.neighbour,
                "compute_s": self.compute_s, "profile": self.profile}


class TPSide:
    """PyTorch tensor parallelism with ``k`` ranks."""

    def __init__(self, k: int, timeout_s: float = 600.0) -> None:
        self.k, self.timeout_s = k, timeout_s
        self.label = f"TP k={k}"

    def run(self, work: Workload, phases: list[Straggler]) -> list[PhaseResult]:
        from sazd.bench.tp.launch import launch

        result = launch(work.tp_spec(phases), self.k, timeout_s=self.timeout_s)
        out = []
        for i, straggler in enumerate(phases):
            per_rank = [result.phases(r) for r in range(self.k)]
            began = [p[i] for p in per_rank if len(p) > i]
            if not began:
                out.append(PhaseResult(self.label, self.k, straggler.to_dict(), [], [], {},
                                       stopped=result.stopped or "not reached"))
                continue
            lead = per_rank[0][i] if len(per_rank[0]) > i else began[0]
            done = len(lead["iteration_s"]) == work.steps and all(p["error"] is None for p in began) and \
                all(p["died_at"] is None for p in began)
            slowed = {r: len(p[i]["slowed_steps"]) for r, p in enumerate(per_rank)
                      if len(p) > i and p[i]["slowed_steps"]}
            neighbour = next((p["neighbour"] for p in began if p["neighbour"]), None)
            compute = statistics.fmean(rec["compute_s"] for rec in result.records if rec is not None)
            out.append(PhaseResult(self.label, self.k, straggler.to_dict(), lead["iteration_s"][work.warmup:],
                                   lead["loss"], slowed, stopped=None if done else result.stopped,
                                   neighbour=neighbour, compute_s=compute))
        return out


class SazdSide:
    """sazd on Ray: ``code`` with ``n`` workers of which any ``k`` suffice (uncoded: ``n = k``), DEU."""

    def __init__(self, code: str, n: int, k: int) -> None:
        self.code, self.n, self.k = code, n, k
        self.label = "sazd uncoded" if code == "uncoded" else f"{code}({n},{k})"

    def run(self, work: Workload, phases: list[Straggler]) -> list[PhaseResult]:
        from sazd.codes import DecodeError
        from sazd.runtime import make_cluster
        from sazd.runtime.cluster import ClusterError
        from sazd.train.trainer import Trainer

        cfg = work.train_config(self.code, self.n, self.k)
        batches = work.batches()
        out = []
        with make_cluster("ray", self.n, seed=work.seed, worker_timeout_s=60.0) as cluster, \
                Trainer(cfg, cluster=cluster, data=work.data) as trainer:
            for straggler in phases:
                begun = dict(enumerate(cluster.schedule_state()["tasks"]))  # calls counted from here on
                recorder = Recorder(straggler.latency(), start=begun).bind(self.n)
                cluster.latency = recorder  # the factors and deaths of this phase's calls
                before = (len(trainer.history), len(trainer.maintainer.repairs), cluster.counters.snapshot())
                pids = dict(enumerate(cluster.pids()))
                stopped = None
                with straggler.around(pids) as neighbour:
                    try:
                        for xb, yb in batches:
                            trainer.step(xb, yb)
                            trainer.repair_dead()
                    except (ClusterError, DecodeError) as err:  # e.g. uncoded: a dead worker ends the run
                        stopped = "the run stopped: " + " ".join(str(err).split())
                recs = trainer.history[before[0]:]
                timed = recs[work.warmup:]
                after = cluster.counters.snapshot()
                counts = {key: after[key] - before[2][key] for key in ("calls", "rounds")}
                profile = self._profile(timed, counts, len(recs))
                out.append(PhaseResult(self.label, self.n, straggler.to_dict(),
                                       [r["iteration_s"] for r in timed], [r["loss"] for r in recs],
                                       dict(recorder.slowed),
                                       stopped=stopped, repairs=len(trainer.maintainer.repairs) - before[1],
                                       neighbour=None if neighbour is None else neighbour.method,
                                       profile=profile))
                if stopped is not None:
                    break
        out += [PhaseResult(self.label, self.n, s.to_dict(), [], [], {}, stopped="not reached")
                for s in phases[len(out):]]
        return out

    @staticmethod
    def _profile(recs: list[dict[str, Any]], counts: dict[str, int], steps: int) -> dict[str, float]:
        """The master's time per iteration by phase, and messages (calls) and rounds per iteration."""
        if not recs:
            return {}
        keys = ("iteration_s", "encode_s", "decode_s", "update_s", "worker_s", "master_other_s",
                "bytes_to_workers", "bytes_from_workers", "rounds")
        profile = {key: statistics.fmean(r[key] for r in recs) for key in keys}
        profile["calls_per_iteration"] = counts["calls"] / max(steps, 1)
        profile["cluster_rounds_per_iteration"] = counts["rounds"] / max(steps, 1)
        return profile


def sazd_sides(k: int, codes: list[str]) -> list[SazdSide]:
    """The sazd configurations named ``sazd+1`` (SAZD(k+1,k)), ``sazd+2``, ``cyclic+2``, ``uncoded``."""
    table = {"sazd+1": ("sazd", k + 1), "sazd+2": ("sazd", k + 2), "cyclic+2": ("cyclic", k + 2),
             "uncoded": ("uncoded", k)}
    unknown = [c for c in codes if c not in table]
    if unknown:
        raise ValueError(f"--sides: unknown {unknown}; choose from {sorted(table)}")
    return [SazdSide(table[c][0], table[c][1], k) for c in codes]
