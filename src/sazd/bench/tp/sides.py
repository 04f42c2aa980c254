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
how the run ended (TP: stops when a rank dies; sazd: repairs), and the side's compute per measured
iteration (``sazd.bench.tp.floor``: TP the ranks' step CPU times, sazd the workers' counters read
after the warm-up and after the measured steps, plus the master's encode and decode).

With a ``Target`` (``sazd.bench.tp.target``) each phase trains a fresh model from the seed until the
target (or ``max_steps``; before the first phase, ``warmup`` steps on weights thrown away warm both
sides' processes up), evaluating each side's own model on the held-out set: TP its sharded
model, sazd the weights decoded from its workers (``Trainer.evaluate``, with the phase's stragglers
paused and its calls left out of the phase's call count). Each ``PhaseResult`` then carries every
step's time, the evaluations, and the step and seconds at which the target was reached.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sazd.bench.tp.floor import alive_throughout, cores, floor_fields, sazd_compute, tp_compute
from sazd.bench.tp.launch import launch
from sazd.bench.tp.rank import spec_batches
from sazd.bench.tp.target import Schedule, Target, time_to_target
from sazd.codes import DecodeError
from sazd.data import load_dataset
from sazd.maintain import CodedState
from sazd.measure.training import synthetic_data
from sazd.models import build_model
from sazd.runtime import make_cluster
from sazd.runtime.cluster import ClusterError
from sazd.runtime.latency import NoDelay
from sazd.stragglers import Recorder, Straggler
from sazd.train.optim import CodedOptimizer, OptimConfig
from sazd.train.trainer import TrainConfig, Trainer


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
    target: Target | None = None
    eval_limit: int = 64  # held-out samples (gpt: windows) the target is evaluated on

    @property
    def min_steps(self) -> int:
        """Steps every phase runs: the unmeasured and the measured ones."""
        return self.warmup + self.iterations

    @property
    def steps(self) -> int:
        """Batches of a phase: with a target up to ``max_steps`` (at least ``min_steps``)."""
        return self.min_steps if self.target is None else max(self.min_steps, self.target.max_steps)

    @cached_property
    def data(self) -> Any:
        import torch

        if self.dataset == "synthetic":
            bundle = synthetic_data(self.train_limit, self.seed)
            bundle.train_x = bundle.train_x.to(getattr(torch, self.dtype))
            return bundle
        return load_dataset(self.dataset, train_limit=self.train_limit, test_limit=self.eval_limit,
                            seed=self.seed, dtype=getattr(torch, self.dtype))

    def tp_spec(self, phases: list[Straggler]) -> dict[str, Any]:
        return {"model": self.model, "in_shape": list(self.data.in_shape),
                "num_classes": self.data.num_classes, "hidden": list(self.hidden), "seed": self.seed,
                "dtype": self.dtype, "dataset": self.dataset,
                "train_limit": self.train_limit, "batch_size": self.batch_size, "steps": self.steps,
                "lr": self.lr, "momentum": self.momentum, "phases": [p.to_dict() for p in phases],
                "target": None if self.target is None else self.target.to_dict(), "min_steps": self.min_steps,
                "eval_limit": self.eval_limit, "prewarm": 0 if self.target is None else self.warmup}

    def batches(self) -> list[Any]:
        """The ``steps`` batches of every phase, exactly the TP ranks' (``rank.spec_batches``)."""
        spec = {"batch_size": self.batch_size, "steps": self.steps, "seed": self.seed}
        return spec_batches(spec, self.data)

    def train_config(self, code: str, n: int, k: int) -> Any:
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
    step_s: list[float] = field(default_factory=list)  # every step's time, the unmeasured ones included
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) on the held-out set
    steps_to_target: int | None = None  # the first evaluated step that reached the target
    work: dict[str, Any] = field(default_factory=dict)  # compute per iteration and its parts (``floor``)
    cores: int = field(default_factory=cores)

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

    @property
    def time_to_target(self) -> float | None:
        """Wall seconds of the training steps up to the target (evaluations excluded); None: not reached."""
        return time_to_target(self.step_s, self.steps_to_target)

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "workers": self.workers, "straggler": self.straggler, "p50_s": self.p50,
                "p95_s": self.p95, "cost_worker_s": self.cost, "iteration_s": self.iteration_s,
                "loss": self.loss, "slowed": {str(w): c for w, c in self.slowed.items()},
                "stopped": self.stopped, "repairs": self.repairs, "neighbour": self.neighbour,
                "compute_s": self.compute_s, "profile": self.profile, "step_s": self.step_s,
                "evals": [list(e) for e in self.evals], "steps_to_target": self.steps_to_target,
                "time_to_target_s": self.time_to_target, "work": self.work,
                **floor_fields(self.work.get("compute_s"), self.cores, self.p50),
                "cpu_per_iteration_s": self.work.get("cpu_s")}


class TPSide:
    """PyTorch tensor parallelism with ``k`` ranks."""

    def __init__(self, k: int, timeout_s: float = 600.0) -> None:
        self.k, self.timeout_s = k, timeout_s
        self.label = f"TP k={k}"

    def run(self, work: Workload, phases: list[Straggler]) -> list[PhaseResult]:
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
            done = all(p["complete"] and p["error"] is None and p["died_at"] is None for p in began)
            slowed = {r: len(p[i]["slowed_steps"]) for r, p in enumerate(per_rank)
                      if len(p) > i and p[i]["slowed_steps"]}
            neighbour = next((p["neighbour"] for p in began if p["neighbour"]), None)
            compute = statistics.fmean(rec["compute_s"] for rec in result.records if rec is not None)
            evals = [(int(step), value) for step, value in lead["evals"]]
            ranks_s = [p["cpu_s"][work.warmup:] for p in began]
            ranks_cpu = [p["process_cpu_s"][work.warmup:] for p in began]
            every_rank = len(began) == self.k
            work_s = {"compute_s": tp_compute(ranks_s) if every_rank else None,
                      "ranks_s": [statistics.fmean(s) if s else None for s in ranks_s],
                      "cpu_s": tp_compute(ranks_cpu) if every_rank else None}
            out.append(PhaseResult(self.label, self.k, straggler.to_dict(), lead["iteration_s"][work.warmup:],
                                   lead["loss"], slowed, stopped=None if done else result.stopped,
                                   neighbour=neighbour, compute_s=compute, step_s=list(lead["iteration_s"]),
                                   evals=evals, steps_to_target=_first(work, evals), work=work_s))
        return out


class SazdSide:
    """sazd on Ray: ``code`` with ``n`` workers of which any ``k`` suffice (uncoded: ``n = k``), DEU."""

    def __init__(self, code: str, n: int, k: int) -> None:
        self.code, self.n, self.k = code, n, k
        self.label = "sazd uncoded" if code == "uncoded" else f"{code}({n},{k})"

    def run(self, work: Workload, phases: list[Straggler]) -> list[PhaseResult]:
        cfg = work.train_config(self.code, self.n, self.k)
        batches = work.batches()
        out = []
        with make_cluster("ray", self.n, seed=work.seed, worker_timeout_s=60.0) as cluster, \
                Trainer(cfg, cluster=cluster, data=work.data) as trainer:
            if work.target is not None:  # warm the processes up on weights thrown away: as TP's ranks do
                for xb, yb in batches[:work.warmup]:
                    trainer.step(xb, yb)
            for straggler in phases:
                if work.target is not None:  # time to the target: every phase from the seed's weights
                    self._restart(trainer, work)
                begun = dict(enumerate(cluster.schedule_state()["tasks"]))  # calls counted from here on
                recorder = Recorder(straggler.latency(), start=begun).bind(self.n)
                cluster.latency = recorder  # the factors and deaths of this phase's calls
                before = (len(trainer.history), len(trainer.maintainer.repairs), cluster.counters.snapshot())
                pids = dict(enumerate(cluster.pids()))
                schedule = Schedule(work.target, work.min_steps)
                evaluated = {"calls": 0, "rounds": 0}  # calls outside the training steps
                stopped = None
                start = self._counters(cluster, recorder, evaluated) if work.warmup == 0 else None
                with straggler.around(pids) as neighbour:
                    try:
                        for step, (xb, yb) in enumerate(batches, 1):
                            trainer.step(xb, yb)
                            trainer.repair_dead()
                            if step == work.warmup:
                                start = self._counters(cluster, recorder, evaluated)
                            if schedule.evaluates(step):
                                schedule.record(step, *self._evaluate(trainer, cluster, recorder, evaluated))
                            if schedule.done(step):
                                break
                    except (ClusterError, DecodeError) as err:  # e.g. uncoded: a dead worker ends the run
                        stopped = "the run stopped: " + " ".join(str(err).split())
                recs = trainer.history[before[0]:]
                timed = recs[work.warmup:]
                work_s = self._work(start, cluster, recorder, evaluated, timed, cpu=work.target is None)
                after = cluster.counters.snapshot()
                counts = {key: after[key] - before[2][key] - evaluated[key] for key in ("calls", "rounds")}
                profile = self._profile(timed, counts, len(recs))
                out.append(PhaseResult(self.label, self.n, straggler.to_dict(),
                                       [r["iteration_s"] for r in timed], [r["loss"] for r in recs],
                                       dict(recorder.slowed),
                                       stopped=stopped, repairs=len(trainer.maintainer.repairs) - before[1],
                                       neighbour=None if neighbour is None else neighbour.method,
                                       profile=profile, step_s=[r["iteration_s"] for r in recs],
                                       evals=list(schedule.evals), steps_to_target=schedule.reached_at,
                                       work=work_s))
                if stopped is not None:
                    break
        out += [PhaseResult(self.label, self.n, s.to_dict(), [], [], {}, stopped="not reached")
                for s in phases[len(out):]]
        return out

    def _restart(self, trainer: Any, work: Workload) -> None:
        """The seed's initial weights back on the master and every worker (their momentum dropped), a new
        optimizer, and every worker done loading before the phase's clock starts."""

        cfg, cluster = trainer.cfg, trainer.cluster
        initial = build_model(cfg.model, trainer.data.in_shape, trainer.data.num_classes, hidden=cfg.hidden,
                              seed=cfg.seed, dtype=trainer.dtype).state_dict()
        cluster.latency = NoDelay().bind(self.n)
        trainer.maintainer.load_state(CodedState(initial, {}, {}))
        trainer.opt = CodedOptimizer(trainer.model, cfg.optim)
        cluster.wait_all(cluster.submit("ping", ()))

    def _evaluate(self, trainer: Any, cluster: Any, recorder: Recorder,
                  counts: dict[str, int]) -> tuple[float, float]:
        """(loss, accuracy) of the weights decoded from the workers, the stragglers paused."""
        with self._aside(cluster, recorder, counts):
            return trainer.evaluate()

    def _counters(self, cluster: Any, recorder: Recorder, counts: dict[str, int]) -> dict[str, Any]:
        """Every live worker's ``counters()`` (after all its earlier calls) and incarnation, the
        stragglers paused."""
        with self._aside(cluster, recorder, counts):
            read = cluster.wait_all(cluster.submit("counters", (), cluster.alive()))
            return {"counters": read, "incarnation": list(cluster.schedule_state()["incarnation"]),
                    "master_cpu_s": time.process_time()}

    def _work(self, start: dict[str, Any] | None, cluster: Any, recorder: Recorder, counts: dict[str, int],
              timed: list[dict[str, Any]], cpu: bool) -> dict[str, Any]:
        """Compute per measured iteration (``floor.sazd_compute``) of the workers alive throughout, and
        with ``cpu`` (no evaluations in between) the CPU of every process of the side."""
        if start is None or not timed:
            return {}

        try:
            end = self._counters(cluster, recorder, counts)
        except ClusterError:  # e.g. the run stopped, no worker left to ask: no figure
            return {}
        counted = alive_throughout(start, end)
        every_worker = len(counted) == self.n
        return sazd_compute(start["counters"], end["counters"], counted,
                            [r["encode_s"] + r["decode_s"] for r in timed],
                            end["master_cpu_s"] - start["master_cpu_s"] if cpu and every_worker else None)

    @contextlib.contextmanager
    def _aside(self, cluster: Any, recorder: Recorder, counts: dict[str, int]) -> Iterator[None]:
        """Calls outside the training steps, the stragglers paused: they are not the phase's calls (its
        draws and deaths stay the same) and are added to ``counts``, not to the iteration profile."""

        tasks, counters = cluster.schedule_state()["tasks"], cluster.counters.snapshot()
        cluster.latency = NoDelay().bind(self.n)
        try:
            yield
        finally:
            after = cluster.schedule_state()["tasks"]
            recorder.skip({j: max(a - b, 0) for j, (b, a) in enumerate(zip(tasks, after, strict=True))})
            cluster.latency = recorder
            now = cluster.counters.snapshot()
            for key in counts:
                counts[key] += now[key] - counters[key]

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


def _first(work: Workload, evals: list[tuple[int, float]]) -> int | None:
    return None if work.target is None else work.target.first_reached(evals)


def sazd_sides(k: int, codes: list[str]) -> list[SazdSide]:
    """The sazd configurations named ``sazd+1`` (SAZD(k+1,k)), ``sazd+2``, ``cyclic+2``, ``uncoded``."""
    table = {"sazd+1": ("sazd", k + 1), "sazd+2": ("sazd", k + 2), "cyclic+2": ("cyclic", k + 2),
             "uncoded": ("uncoded", k)}
    unknown = [c for c in codes if c not in table]
    if unknown:
        raise ValueError(f"--sides: unknown {unknown}; choose from {sorted(table)}")
    return [SazdSide(table[c][0], table[c][1], k) for c in codes]
