"""Coded training end to end: data, model, cluster, the iteration loop, metrics, repair, checkpoints.

``train(TrainConfig(...)) -> report`` or ``Trainer(config).train()``. Each iteration:
zero_grad -> forward (coded rounds) -> loss -> backward (coded rounds) -> optimizer step (DEU: encoded
updates to the workers; naive: re-encode and ship) -> repair respawned workers -> maybe checkpoint.
Per iteration it records loss, batch accuracy, traffic (from the cluster's counters), master phases
and, on the in-process backend, the simulated iteration time; per epoch the test accuracy of the plain
model decoded from the workers. The settings: ``sazd.train.config``; checkpoints taken and resumed:
``sazd.train.resume``; the run directory: ``sazd.train.rundir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sazd.codes import DecodeError
from sazd.data import DataBundle, batches, load_dataset, num_batches
from sazd.maintain import Maintainer
from sazd.models import build_model, task_of
from sazd.parallel import (
    SCHEMES,
    coded_layers,
    context,
    parallelize,
    plain_model,
    predicted_traffic,
    resolve_plan,
)
from sazd.runtime import make_cluster as make_backend
from sazd.runtime.cluster import Cluster, ClusterError
from sazd.runtime.latency import straggler_latency
from sazd.train import checkpoint, resume, rundir
from sazd.train.config import DTYPES, TrainConfig
from sazd.train.optim import CodedOptimizer, lr_at
from sazd.train.report import REPORT_FORMAT, progress

PHASES = ("encode_s", "decode_s", "worker_s", "update_s")


@dataclass
class Position:
    """Where training stands: the next batch to run is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0
    iteration: int = 0


class Trainer:
    """One coded training run; see module docstring. ``callbacks`` run after every iteration as
    ``callback(trainer)`` (e.g. to kill workers in a fault test)."""

    def __init__(self, config: TrainConfig, cluster: Cluster | None = None, data: DataBundle | None = None,
                 callbacks: list[Callable[[Trainer], None]] | None = None) -> None:
        cfg = config
        ckpt = resume.open_checkpoint(cfg)  # an untrusted input: verified, its settings checked
        cfg.validate()
        self.code = cfg.make_code()
        self.dtype = getattr(torch, cfg.dtype)
        self.data = (data or load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.test_limit,
                                          cfg.seed, self.dtype)).to(dtype=self.dtype)
        self.steps_per_epoch = num_batches(self.data.n_train, cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {self.data.n_train} training "
                             "samples")
        if cfg.optim.schedule == "cosine" and cfg.optim.total_steps is None:  # the run's length in epochs
            total = ckpt.meta["config"]["optim"]["total_steps"] if ckpt else self.steps_per_epoch * cfg.epochs
            cfg.optim = dataclasses.replace(cfg.optim, total_steps=total)
        self.cfg = cfg
        self.model = build_model(cfg.model, self.data.in_shape, self.data.num_classes, hidden=cfg.hidden,
                                 seed=cfg.seed, dtype=self.dtype)
        self.task = task_of(self.model)  # what the output scores: the loss and metrics follow it
        self.plain = resume.plain_template(self.model)  # what its checkpoints hold
        resolve_plan(self.model, cfg.plan, cfg.min_features)  # a bad plan fails before any worker starts
        self.data_summary = {"n_train": self.data.n_train, "n_test": self.data.n_test,
                             "in_shape": list(self.data.in_shape), "num_classes": self.data.num_classes,
                             "mean": self.data.mean, "std": self.data.std}
        if ckpt is not None:
            resume.check(self, ckpt)
        self.run_id = ckpt.meta["run_id"] if ckpt is not None else uuid.uuid4().hex
        self.run = rundir.claim(cfg, self.run_id, resumed=ckpt is not None)  # before any worker starts
        self._own_cluster = cluster is None
        self.cluster = cluster
        self.position = Position()
        self.last_checkpoint: Path | None = None  # the latest complete checkpoint, and its iteration
        self.last_checkpoint_iteration: int | None = None
        self._checkpoint_iteration = -1  # the iteration of the checkpoint at cfg.checkpoint_path
        try:
            self.cluster = cluster if cluster is not None else make_cluster(cfg)
            self._parallelize()
            if ckpt is not None:
                resume.restore(self, ckpt)
                self._resumed_at(ckpt)
        except BaseException:
            self.close()
            raise
        self.resumed_from = None if ckpt is None else dict(ckpt.position)
        self.callbacks = list(callbacks or [])
        self.history: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._stop_requested = False
        self.stop_signal: int | None = None  # SIGINT or SIGTERM, when one stopped the run
        self.ending = ""  # how an interrupted or failed run ended: where its checkpoint is
        self._in_step = False
        self._exhausted_saved = False

    def _parallelize(self) -> None:
        """The model's coded layers onto the cluster; the optimizer and maintainer that keep them."""
        cfg = self.cfg
        parallelize(self.model, self.code, self.cluster, plan=cfg.plan, scheme=cfg.scheme,
                    min_features=cfg.min_features, decode_device=cfg.master_decode_device())
        self.ctx = context(self.model)
        self.opt = CodedOptimizer(self.model, cfg.optim)
        self.maintainer = Maintainer(self.model, repair=cfg.repair)

    def _resumed_at(self, ckpt: checkpoint.Checkpoint) -> None:
        """The checkpoint resumed from is the latest good one (and, where it lies at the run's checkpoint
        path, need not be written again before an iteration has run)."""
        found = checkpoint.find(self.cfg.resume)
        self.last_checkpoint, self.last_checkpoint_iteration = found, self.position.iteration
        path = self.cfg.checkpoint_path
        if path is not None and path.resolve() == found.resolve():
            self._checkpoint_iteration = self.position.iteration

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the report (also written to the run directory).

        However the run ends (done, SIGINT/SIGTERM, workers lost, a full disk, any error) it leaves a
        checkpoint (of the weights now if they can still be decoded and the state is between
        iterations, else the latest one; ``self.ending`` says which) and a report in the run directory."""
        cfg = self.cfg
        try:
            if self.run is not None:
                self.run.write_config(cfg.to_dict())
                if self.resumed_from is not None:
                    self.run.log({"kind": "resume", **self.resumed_from})
            with self._interrupt_guard():
                if self.resumed_from is None and cfg.checkpoint_path is not None:
                    self.save_checkpoint()  # iteration 0: even a run that fails at once can be resumed
                self._loop()
            if cfg.checkpoint_path is not None and self._checkpoint_iteration != self.position.iteration:
                self.save_checkpoint()  # the end of the run, so it can be extended with --resume
        except BaseException as err:
            self.ending = self._emergency_checkpoint(err)
            self._write_report(err)
            if isinstance(err, ClusterError):
                raise ClusterError(f"{err}. {self.ending}") from err
            raise
        return self._write_report(None)

    def _write_report(self, error: BaseException | None) -> dict[str, Any]:
        """The report, with how the run ended, into the run directory (best effort after an error)."""
        try:
            report = self.report()
        except Exception:
            if error is None:
                raise
            report = {"format": REPORT_FORMAT, "iterations": len(self.history),
                      "position": dataclasses.asdict(self.position),
                      "checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint)}
        status = ("completed" if error is None else
                  "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        report.update(status=status, ending=self.ending)
        if error is not None:
            report["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            report["traceback"] = "".join(traceback.format_exception(error))
        if self.run is not None:
            try:
                self.run.write_report(report)
                self.run.plot()
                self.run.plot_latency(self.cluster.counters.responses, self.cluster.n)
            except Exception:
                if error is None:
                    raise
        return report

    def _loop(self) -> None:
        cfg, pos = self.cfg, self.position
        while pos.epoch < cfg.epochs and not self._done():
            data = batches(self.data.train_x, self.data.train_y, cfg.batch_size, cfg.seed, pos.epoch,
                           start=pos.batch)
            desc = f"epoch {pos.epoch + 1}/{cfg.epochs}"
            hide = None if cfg.show_progress is None else not cfg.show_progress  # None: only on a terminal
            with progress(data, total=self.steps_per_epoch - pos.batch, desc=desc, disable=hide) as bar:
                for xb, yb in bar:
                    self._in_step = True  # an error from here to the update's end may leave it half applied
                    rec = self.step(xb, yb)
                    self._in_step = False
                    bar.set_postfix(loss=rec["loss"], acc=rec["accuracy"], iter_s=rec["iteration_s"])
                    self._after_iteration()
                    if self._done():
                        break
            if pos.batch == self.steps_per_epoch:
                self._end_epoch()

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.position.iteration >= self.cfg.max_steps

    def step(self, xb: Tensor, yb: Tensor) -> dict[str, Any]:
        """One training iteration on batch (xb, yb); advances the position and returns its record."""
        counters, stats = self.cluster.counters, self.ctx.stats
        c0, s0, sim0, clock0 = counters.snapshot(), stats.snapshot(), counters.sim_time_s, self.cluster.now()
        start = time.perf_counter()
        self.model.train()
        self.opt.zero_grad()
        logits = self.model(xb)
        loss = self.task.loss(logits, yb)
        loss.backward()
        self.opt.step()
        wall = time.perf_counter() - start
        s1 = stats.snapshot()
        phases = {p: s1[p] - s0[p] for p in PHASES}
        phases["master_other_s"] = max(wall - sum(phases.values()), 0.0)  # activations, loss, autograd
        c1 = counters.snapshot()
        pos = self.position
        rec = {
            "kind": "iteration",
            "iteration": pos.iteration + 1,
            "epoch": pos.epoch,
            "batch": pos.batch,
            "loss": float(loss.detach()),
            "accuracy": float(self.task.correct(logits, yb)) / max(yb.numel(), 1),
            "lr": lr_at(self.opt.cfg, self.opt.steps - 1),
            "wall_s": wall,
            "sim_s": counters.sim_time_s - sim0,
            "bytes_to_workers": c1["bytes_to_workers"] - c0["bytes_to_workers"],
            "bytes_from_workers": c1["bytes_from_workers"] - c0["bytes_from_workers"],
            "bytes_sent_once": c1["bytes_sent_once"] - c0["bytes_sent_once"],
            "rows_encoded": s1["rows_encoded"] - s0["rows_encoded"],
            "rows_decoded": s1["rows_decoded"] - s0["rows_decoded"],
            "rounds": s1["rounds"] - s0["rounds"],
            **phases,
        }
        rec.update(self.task.metrics(rec["loss"]))
        rec["iteration_s"] = self.cluster.now() - clock0  # the cluster's clock: simulated or wall
        pos.iteration += 1
        pos.batch += 1
        self.history.append(rec)
        if self.run is not None:
            self.run.log(rec)
        return rec

    def _after_iteration(self) -> None:
        self.maintainer.steps = self.position.iteration
        for info in self.maintainer.step():
            if self.run is not None:
                self.run.log({"kind": "repair", **info})
        if self.maintainer.spare == 0 and not self._exhausted_saved:
            if self.cfg.checkpoint_path is not None:  # no redundancy left: save while we still can
                self.save_checkpoint()
            self._exhausted_saved = True
        every = self.cfg.checkpoint_every
        if every is not None and self.position.iteration % every == 0:
            self.save_checkpoint()
        for callback in self.callbacks:
            callback(self)
        if self._stop_requested:
            raise KeyboardInterrupt  # train() saves the checkpoint

    def _end_epoch(self) -> None:
        pos = self.position
        recs = [r for r in self.history if r["epoch"] == pos.epoch]
        test_loss, test_acc = self.evaluate()
        rec = {"kind": "epoch", "epoch": pos.epoch, "iteration": pos.iteration, "test_loss": test_loss,
               "test_accuracy": test_acc, **self.task.metrics(test_loss, "test_")}
        if recs:
            rec["train_loss"] = sum(r["loss"] for r in recs) / len(recs)
            rec["train_accuracy"] = sum(r["accuracy"] for r in recs) / len(recs)
        self.epochs.append(rec)
        if self.run is not None:
            self.run.log(rec)
        if self.cfg.show_progress:
            print(f"epoch {pos.epoch + 1}: test accuracy {100 * test_acc:.2f}%, test loss {test_loss:.4f}")
        pos.epoch, pos.batch = pos.epoch + 1, 0

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, chunk: int = 2048) -> tuple[float, float]:
        """(test loss, test accuracy) of the plain model decoded from the workers (DEU) or the master."""
        plain = plain_model(self.model).eval()
        x, y = self.data.test_x, self.data.test_y
        loss_sum, correct = 0.0, 0
        for i in range(0, x.shape[0], chunk):
            logits = plain(x[i:i + chunk])
            loss_sum += float(self.task.loss(logits, y[i:i + chunk], reduction="sum"))
            correct += int(self.task.correct(logits, y[i:i + chunk]))
        n = max(y.numel(), 1)  # scored positions: samples, or samples x tokens
        return loss_sum / n, correct / n

    # --------------------------------------------------------------- repair
    def repair_dead(self) -> list[dict[str, Any]]:
        """Respawn and repair every dead worker now (``Maintainer.repair_dead``); log each repair."""
        self.maintainer.steps = self.position.iteration
        done = self.maintainer.repair_dead()
        for info in done:
            if self.run is not None:
                self.run.log({"kind": "repair", **info})
        return done

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Decoded weights, optimizer state (DEU momentum decoded), RNG, data position and config."""
        path = Path(path) if path is not None else self.cfg.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint directory: set run_dir or checkpoint_dir")
        self.last_checkpoint = checkpoint.save(path, resume.take(self))
        self.last_checkpoint_iteration = self._checkpoint_iteration = self.position.iteration
        if self.run is not None:
            self.run.log({"kind": "checkpoint", "iteration": self.position.iteration, "path": str(path)})
        return self.last_checkpoint

    def _emergency_checkpoint(self, err: BaseException) -> str:
        """Save a checkpoint if the weights can still be decoded and no update was half applied (a
        worker failure inside a step comes from its rounds, before the update); say where the latest
        checkpoint is."""
        path = self.cfg.checkpoint_path
        if path is None:
            return "No checkpoint directory was set (use --run-dir or --checkpoint-dir to get one)."
        if self._checkpoint_iteration == self.position.iteration:
            return (f"Checkpoint of iteration {self._checkpoint_iteration} in {path}; resume with --resume "
                    f"{self.last_checkpoint or path}.")
        try:
            if self._in_step and not isinstance(err, ClusterError | DecodeError):
                raise RuntimeError("stopped inside an iteration")
            self.save_checkpoint()
        except Exception as exc:
            why = " ".join(str(exc).split())
            if self.last_checkpoint is None:
                return f"Could not save a checkpoint ({why}) and none was saved earlier."
            return (f"Could not save a checkpoint now ({why}); the latest one (iteration "
                    f"{self.last_checkpoint_iteration}) can be resumed with --resume {self.last_checkpoint}.")
        return (f"Saved a checkpoint at iteration {self.position.iteration} to {path}; resume with "
                f"--resume {path}.")

    @contextlib.contextmanager
    def _interrupt_guard(self) -> Iterator[None]:
        """SIGINT (Ctrl-C) or SIGTERM finishes the current iteration, then stops with a checkpoint
        (a second signal stops at once, with the latest checkpoint)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested, self.stop_signal = True, signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ---------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        """Summary of the run: accuracy, traffic vs the traffic formula, per-phase times."""
        iters = self.history
        count = max(len(iters), 1)
        if not self.epochs or self.epochs[-1]["iteration"] != self.position.iteration:
            test_loss, test_acc = self.evaluate()
        else:
            test_loss, test_acc = self.epochs[-1]["test_loss"], self.epochs[-1]["test_accuracy"]

        def mean(key: str) -> float:
            return sum(r[key] for r in iters) / count

        to_w, from_w = sum(r["bytes_to_workers"] for r in iters), sum(r["bytes_from_workers"] for r in iters)
        formula = {s: predicted_traffic(self.model, scheme=s) for s in SCHEMES} if iters else {}
        return {
            "format": REPORT_FORMAT,
            "status": "completed",
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            **self.task.metrics(test_loss, "test_"),
            "task": self.task.name,
            "train_loss": iters[-1]["loss"] if iters else None,
            "iterations": len(iters),
            "position": dataclasses.asdict(self.position),
            "scheme": self.cfg.scheme,
            "code": repr(self.code),
            "backend": self.cfg.backend,
            "coded_layers": [layer.name for layer in coded_layers(self.model)],
            "bytes_to_workers": to_w,
            "bytes_from_workers": from_w,
            "bytes_to_workers_per_iteration": to_w / count,
            "bytes_from_workers_per_iteration": from_w / count,
            "bytes_sent_once_per_iteration": sum(r["bytes_sent_once"] for r in iters) / count,
            "formula_bytes_per_iteration": formula,
            "mean_iteration_s": mean("iteration_s") if iters else None,
            "mean_wall_iteration_s": mean("wall_s") if iters else None,
            "mean_sim_iteration_s": mean("sim_s") if iters and self.cfg.backend == "inproc" else None,
            "phases_s": {p: mean(p) for p in (*PHASES, "master_other_s")} if iters else {},
            "rows_encoded": sum(r["rows_encoded"] for r in iters),
            "rows_decoded": sum(r["rows_decoded"] for r in iters),
            "repairs": list(self.maintainer.repairs),
            "cluster": self.cluster.counters.snapshot(),
            "cluster_settings": self.cluster.describe(),
            "workers": self.cluster.workers_info(),
            "worker_latency": self.cluster.counters.responses.summary(self.cluster.n,
                                                                      self.cluster.counters.respawned),
            "worker_errors": list(self.cluster.counters.worker_errors),
            "epochs": list(self.epochs),
            "checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint),
        }

    def close(self) -> None:
        """Stop the cluster this trainer started and release the run directory."""
        if self._own_cluster and self.cluster is not None:
            self.cluster.close()
        if self.run is not None:
            self.run.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_cluster(cfg: TrainConfig) -> Cluster:
    """The cluster of ``cfg.backend`` with the configured stragglers / latency model; the backend's
    options that are set (its defaults apply to the others)."""
    latency = straggler_latency(cfg.stragglers, cfg.straggler_delay, cfg.latency, cfg.seed)
    return make_backend(cfg.backend, cfg.n, latency=latency, seed=cfg.seed, compute_dtype=cfg.compute_dtype,
                 **cfg.backend_options())


def train(
    config: TrainConfig, cluster: Cluster | None = None, data: DataBundle | None = None
) -> dict[str, Any]:
    """Train with ``config``; returns the report dict (see ``Trainer.report``)."""
    with Trainer(config, cluster=cluster, data=data) as trainer:
        return trainer.train()


__all__ = ["DTYPES", "Position", "TrainConfig", "Trainer", "make_cluster", "train"]
