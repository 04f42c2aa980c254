"""Coded training end to end: data, model, cluster, the iteration loop, metrics, repair, checkpoints.

``train(TrainConfig(...)) -> report`` or ``Trainer(config).train()``. Each iteration:
zero_grad -> forward (coded rounds) -> loss -> backward (coded rounds) -> optimizer step (DEU: encoded
updates to the workers; naive: re-encode and ship) -> repair respawned workers -> maybe checkpoint.
Per iteration it records loss, batch accuracy, traffic (from the cluster's counters), master phases
and, on the in-process backend, the simulated iteration time; per epoch the test accuracy of the plain
model decoded from the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sazd.codes import DecodeError, get_code
from sazd.data import DataBundle, batches, load_dataset, num_batches
from sazd.maintain import CodedState, Maintainer
from sazd.models import MODELS, build_model, task_of
from sazd.parallel import (
    DEFAULT_SCHEME,
    SCHEMES,
    coded_layers,
    context,
    load_weights,
    parallelize,
    plain_model,
    predicted_traffic,
    resolve_plan,
)
from sazd.parallel.plan import check_decode_device
from sazd.runtime.cluster import Cluster, ClusterError
from sazd.train import checkpoint
from sazd.train.optim import CodedOptimizer, OptimConfig, lr_at
from sazd.train.report import (
    REPORT_FORMAT,
    WRITTEN,
    RunDir,
    check_writable,
    plot_latency,
    progress,
    to_jsonable,
)

BACKENDS = ("inproc", "ray")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Fields that must match a checkpoint's to resume it (they fix the model, data order and update rule).
RESUME_FIELDS = ("model", "dataset", "train_limit", "hidden", "code", "n", "k", "code_options", "scheme",
                 "batch_size", "optim", "dtype", "seed", "plan", "min_features")
PHASES = ("encode_s", "decode_s", "worker_s", "update_s")
# TrainConfig fields that configure one backend, with their defaults (unset).
BACKEND_OPTIONS = {
    "inproc": {"network_gbps": None, "base_time_s": None, "device": "cpu"},
    "ray": {"address": None, "gpus_per_worker": 0.0, "placement": "spread"},
}
WORKER_TIMEOUT_S = {"inproc": None, "ray": 60.0}  # unset: none in-process (simulated task times may be long)
BACKEND_FIXED = {"inproc": {"master_time": "measured"}, "ray": {}}  # what the trainer always wants


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI fills it from flags, tests build it directly."""

    model: str = "mlp"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    hidden: tuple[int, ...] | None = None
    code: str = "sazd"
    n: int = 6
    k: int = 4
    code_options: dict[str, Any] = field(default_factory=dict)  # e.g. systematic, shift_unit, nodes
    scheme: str = DEFAULT_SCHEME.name
    backend: str = "ray"
    stragglers: int = 0  # the first S workers are slow ...
    straggler_delay: float = 5.0  # ... by this factor
    latency: str | None = None  # a latency spec (sazd.runtime.latency), combined with the stragglers
    network_gbps: float | None = None  # inproc: simulated master link
    base_time_s: float | None = None  # inproc: constant task time (deterministic simulated clock)
    address: str | None = None  # ray: join this cluster
    gpus_per_worker: float = 0.0  # ray
    placement: str = "spread"  # ray: workers on distinct nodes ("spread") or packed ("pack")
    # a worker silent this long is an erasure; None: 60 s on Ray, none in-process (else simulated seconds)
    worker_timeout_s: float | None = None
    compute_dtype: str | None = None  # workers' product precision: bfloat16, float16 (None: as the blocks)
    device: str = "cpu"  # inproc workers' device
    decode_device: str = "auto"  # where the master decodes: auto (its GPU when it has one), cpu, cuda
    epochs: int = 1
    max_steps: int | None = None  # stop after this many iterations in all (tests, quick looks)
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)
    dtype: str = "float32"
    seed: int = 0
    plan: dict[str, str] | None = None
    min_features: int = 64
    repair: bool = True  # respawn and repair dead workers after each iteration
    run_dir: str | None = None
    checkpoint_dir: str | None = None  # default: <run_dir>/checkpoint
    checkpoint_every: int | None = None  # iterations
    resume: str | None = None
    overwrite: bool = False  # replace an earlier run in run_dir (only the files sazd wrote there)
    show_progress: bool | None = None  # None: only on a terminal

    def validate(self) -> TrainConfig:
        """Check every setting that can be checked without data or workers; clear ValueErrors that name
        the setting by its command-line flag."""
        for name, choices in (("model", MODELS), ("scheme", SCHEMES), ("backend", BACKENDS),
                              ("dtype", DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name, low, optional in (("epochs", 1, False), ("batch_size", 1, False), ("seed", 0, False),
                                    ("min_features", 1, False), ("max_steps", 1, True),
                                    ("checkpoint_every", 1, True), ("train_limit", 1, True),
                                    ("test_limit", 1, True)):
            value = getattr(self, name)
            if not (optional and value is None) and (type(value) is not int or value < low):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}"
                                 f"{' (or unset)' if optional else ''}, got {value!r}")
        if type(self.stragglers) is not int or not 0 <= self.stragglers <= self.n:
            raise ValueError(f"--stragglers must be in [0, n={self.n}] (an integer), got {self.stragglers!r}")
        for name, low, optional in (("straggler_delay", 1.0, False), ("network_gbps", 0.0, True),
                                    ("base_time_s", 0.0, True), ("gpus_per_worker", 0.0, False)):
            value = getattr(self, name)
            strict = name == "network_gbps"  # a link of 0 Gb/s carries nothing
            ok = (isinstance(value, int | float) and math.isfinite(value)
                  and (value > low if strict else value >= low))
            if not (optional and value is None) and not ok:
                flag = {"base_time_s": "base-time"}.get(name, name.replace("_", "-"))
                raise ValueError(f"--{flag} must be a finite number {'>' if strict else '>='} {low:g}, "
                                 f"got {value!r}")
        if self.plan is not None and not self.plan:
            raise ValueError("--plan names no layers; give layer names such as fc1,fc2 or leave --plan out")
        self.backend_options()  # flags of the other backend are errors
        if self.checkpoint_every is not None and self.checkpoint_path is None:
            raise ValueError("checkpoint_every needs a place to write: with --checkpoint-every, set "
                             "--run-dir or --checkpoint-dir")
        if self.overwrite and self.resume is not None:
            raise ValueError("--overwrite starts a new run over an earlier one; it cannot go with --resume")
        self._check_device()
        if self.placement not in ("spread", "pack"):
            raise ValueError(f"placement must be 'spread' or 'pack', got {self.placement!r}")
        timeout = self.worker_timeout_s
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"--worker-timeout must be a number of seconds > 0, got {timeout!r}")
        self.make_code()  # bad n/k or code options
        from sazd.runtime.latency import straggler_latency

        straggler_latency(self.stragglers, self.straggler_delay, self.latency, self.seed).bind(self.n)
        self.optim.validate(self.scheme)
        return self

    def backend_options(self) -> dict[str, Any]:
        """The options of ``backend`` (``BACKEND_OPTIONS``); a set option of the other backend is a
        ValueError rather than silently ignored."""
        for backend, options in BACKEND_OPTIONS.items():
            if backend == self.backend:
                continue
            for name, default in options.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name}={getattr(self, name)!r} applies to backend {backend!r} only; "
                                     f"this run uses {self.backend!r}: drop it or pick that backend")
        return {**{name: getattr(self, name) for name in BACKEND_OPTIONS[self.backend]},
                **BACKEND_FIXED[self.backend]}

    def _check_device(self) -> None:
        check_decode_device(self.master_decode_device())
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"--device {self.device!r} is not a device ({err}); use cpu or cuda") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: only cpu and cuda are supported")
        if device.type == "cuda" and self.backend == "inproc":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                raise ValueError(f"--device {self.device}: this machine has {count} usable CUDA device(s); "
                                 "use --device cpu" + (f" or cuda:0..{count - 1}" if count else ""))

    def master_decode_device(self) -> str | None:
        """The device the master decodes on: ``decode_device``, where "auto" is its GPU when it has one."""
        if self.decode_device == "auto":
            return "cuda" if torch.cuda.is_available() else None
        return self.decode_device

    @classmethod
    def from_checkpoint(cls, d: Any) -> TrainConfig:
        """A config read from a checkpoint: every field present, of its declared type, and valid;
        otherwise a ``CheckpointError`` naming the field."""
        checkpoint.check_fields("config", d, cls)
        checkpoint.check_fields("config.optim", d["optim"], OptimConfig)
        try:  # (the device is this machine's business: checked once the command line's flags apply)
            cfg = cls.from_dict(d)
            dataclasses.replace(cfg, device="cpu", decode_device="auto").validate()
            return cfg
        except ValueError as err:
            raise checkpoint.CheckpointError(f"checkpoint field config: {err}") from None

    @property
    def checkpoint_path(self) -> Path | None:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        return None if self.run_dir is None else Path(self.run_dir) / "checkpoint"

    def make_code(self):
        return get_code(self.code, n=self.n, k=self.k, **self.code_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        optim = dict(d.pop("optim", {}))
        if "betas" in optim:
            optim["betas"] = tuple(optim["betas"])
        if d.get("hidden") is not None:
            d["hidden"] = tuple(d["hidden"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known}, optim=OptimConfig(**optim))


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
        ckpt = None
        if cfg.resume:  # an untrusted input: verified, then every field checked; it chooses no path
            found = checkpoint.find(cfg.resume)
            ckpt = checkpoint.load(found)
            _check_resumable(cfg, TrainConfig.from_checkpoint(ckpt.meta["config"]))
            if cfg.run_dir is None:  # where the user pointed: the directory resumed from
                run_dir, ckpt_dir = checkpoint.resume_dirs(cfg.resume)
                cfg.run_dir = run_dir and str(run_dir)
                cfg.checkpoint_dir = cfg.checkpoint_dir or (ckpt_dir and str(ckpt_dir))
        cfg.validate()
        self.code = cfg.make_code()
        self.dtype = DTYPES[cfg.dtype]
        self.data = (data or load_dataset(cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.test_limit,
                                          cfg.seed, self.dtype)).to(dtype=self.dtype)
        self.steps_per_epoch = num_batches(self.data.n_train, cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size={cfg.batch_size} exceeds the {self.data.n_train} training samples")
        if cfg.optim.schedule == "cosine" and cfg.optim.total_steps is None:  # the run's length in epochs
            total = ckpt.meta["config"]["optim"]["total_steps"] if ckpt else self.steps_per_epoch * cfg.epochs
            cfg.optim = dataclasses.replace(cfg.optim, total_steps=total)
        self.cfg = cfg
        self.model = build_model(cfg.model, self.data.in_shape, self.data.num_classes, hidden=cfg.hidden,
                                 seed=cfg.seed, dtype=self.dtype)
        self.task = task_of(self.model)  # what the output scores: the loss and metrics follow it
        resolve_plan(self.model, cfg.plan, cfg.min_features)  # a bad plan fails before any worker starts
        self.data_summary = {"n_train": self.data.n_train, "n_test": self.data.n_test,
                             "in_shape": list(self.data.in_shape), "num_classes": self.data.num_classes,
                             "mean": self.data.mean, "std": self.data.std}
        if ckpt is not None:
            self._check_checkpoint(ckpt)
        self.run_id = ckpt.meta["run_id"] if ckpt is not None else uuid.uuid4().hex
        self._claim_outputs(resumed=ckpt is not None)  # before any worker starts
        self.cluster = cluster if cluster is not None else make_cluster(cfg)
        try:
            parallelize(self.model, self.code, self.cluster, plan=cfg.plan, scheme=cfg.scheme,
                        min_features=cfg.min_features, decode_device=cfg.master_decode_device())
            self.ctx = context(self.model)
            self.opt = CodedOptimizer(self.model, cfg.optim)
            self.maintainer = Maintainer(self.model, repair=cfg.repair)
            self.position = Position()
            if ckpt is not None:
                self._restore(ckpt)
        except BaseException:
            if cluster is None:
                self.cluster.close()
            raise
        self._own_cluster = cluster is None
        self.resumed_from = None if ckpt is None else dict(ckpt.position)
        self.callbacks = list(callbacks or [])
        self.history: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._checkpoint_iteration = -1
        self._stop_requested = False
        self.stop_signal: int | None = None  # SIGINT or SIGTERM, when one stopped the run
        self.ending = ""  # how an interrupted or failed run ended: where its checkpoint is
        self._in_step = False
        self._exhausted_saved = False

    def _check_checkpoint(self, ckpt: checkpoint.Checkpoint) -> None:
        """Every tensor and field of ``ckpt`` against this model, optimizer, data and config."""
        cfg = self.cfg
        template = checkpoint.Checkpoint(
            model={k: v.detach() for k, v in self.model.state_dict().items()}, rng=torch.get_rng_state(),
            optim={name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad},
            meta={"data": to_jsonable(self.data_summary)}, columns=ckpt.columns)  # columns: in _restore
        checkpoint.check(ckpt, template, self.steps_per_epoch, cfg.optim.name, cfg.optim.momentum)

    def _claim_outputs(self, resumed: bool) -> None:
        """Check (and claim) the run and checkpoint directories: sazd writes only where it may."""
        cfg = self.cfg
        run_dir, ckpt = (Path(p) if p else None for p in (cfg.run_dir, cfg.checkpoint_path))
        if ckpt is not None:
            near = run_dir is not None and (ckpt.resolve() == run_dir.resolve() or (run_dir.resolve()
                                           in ckpt.resolve().parents and ckpt.name in WRITTEN
                                           and ckpt.parent.resolve() == run_dir.resolve()))
            if near or (run_dir is not None and ckpt.resolve() in run_dir.resolve().parents):
                raise ValueError(f"--checkpoint-dir {ckpt} would overwrite the run directory {run_dir} or "
                                 "its files; leave --checkpoint-dir out (default RUN_DIR/checkpoint) or "
                                 "choose a directory outside the run directory")
        if run_dir is not None:
            RunDir.check(run_dir, self.run_id, resume=resumed, overwrite=cfg.overwrite)
        if ckpt is not None:
            for path in (ckpt, ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")):
                checkpoint.check_owned(path, None if cfg.overwrite else self.run_id)
            check_writable(ckpt, "--checkpoint-dir")
        # checked: now claim them (with --overwrite, an earlier run's files go: only those sazd wrote)
        self.run = RunDir(run_dir, self.run_id, resume=resumed, overwrite=cfg.overwrite) if run_dir else None
        if ckpt is not None and cfg.overwrite:
            checkpoint.remove(ckpt)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the report (also written to the run directory).

        However the run ends (done, SIGINT/SIGTERM, workers lost, any error) it leaves a checkpoint
        (of the weights now if they can still be decoded and the state is between iterations, else the
        latest one; ``self.ending`` says which) and a report in the run directory."""
        cfg = self.cfg
        if self.run is not None:
            self.run.write_config(cfg.to_dict())
            if self.resumed_from is not None:
                self.run.log({"kind": "resume", **self.resumed_from})
        try:
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
                      "position": dataclasses.asdict(self.position), "checkpoint": self.last_checkpoint}
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
                plot_latency(self.run.path, self.cluster.counters.responses, self.cluster.n)
            except Exception:
                if error is None:
                    raise
        return report

    def _loop(self) -> None:
        cfg, pos = self.cfg, self.position
        while pos.epoch < cfg.epochs and not self._done():
            bar = progress(batches(self.data.train_x, self.data.train_y, cfg.batch_size, cfg.seed, pos.epoch,
                                   start=pos.batch),
                           total=self.steps_per_epoch - pos.batch, desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
                           disable=None if cfg.show_progress is None else not cfg.show_progress)
            with bar:
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
        schedule = self.cluster.schedule_state()
        state = self.maintainer.state(blocks=True)  # one round of the workers: blocks and decoded state
        optim_tensors, optim_meta = self.opt.plain_state(state.momentum)
        meta = {"run_id": self.run_id, "position": dataclasses.asdict(self.position), "optim": optim_meta,
                "config": to_jsonable(self.cfg.to_dict()), "code": repr(self.code),
                "data": to_jsonable(self.data_summary), "schedule": schedule}
        ckpt = checkpoint.Checkpoint(model=state.model, optim=optim_tensors, meta=meta,
                                     rng=torch.get_rng_state(), columns=state.columns, coded=state.blocks)
        self.cluster.load_schedule_state(schedule)  # saving's own rounds leave no trace in the schedule
        self.last_checkpoint = checkpoint.save(path, ckpt)
        self._checkpoint_iteration = self.position.iteration
        if self.run is not None:
            self.run.log({"kind": "checkpoint", "iteration": self.position.iteration, "path": str(path)})
        return self.last_checkpoint

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        """Load a checkpoint that ``_check_checkpoint`` accepted: weights, optimizer, RNG, position and
        the cluster's schedule (latency models and faults continue where they were)."""
        layers = coded_layers(self.model)
        coded = {f"{layer.name}.weight" for layer in layers}
        momentum = {key.split("/")[0]: t for key, t in ckpt.optim.items()
                    if key.split("/")[0] in coded and key.endswith("/momentum_buffer")}
        columns = {}
        if self.ctx.scheme.decodes_weight:
            for layer in layers:
                col = layer.keys[1]
                columns[col] = layer.matrices(torch.zeros(layer.weight_shape, dtype=self.dtype))[col]
                if momentum:
                    columns[f"{col}/momentum_buffer"] = columns[col]
        else:
            momentum = {}  # naive: the torch optimizer holds the momentum
        checkpoint.check_tensors("columns", ckpt.columns, columns)
        self.maintainer.load_state(CodedState(ckpt.model, momentum, ckpt.columns, ckpt.coded))
        self.opt.load_master_state(ckpt.optim, ckpt.meta["optim"])
        torch.set_rng_state(ckpt.rng)
        self.position = Position(**ckpt.meta["position"])
        try:
            schedule = ckpt.meta["schedule"]
            self.cluster.load_schedule_state(schedule)
        except ValueError as err:
            raise checkpoint.CheckpointError(f"checkpoint field {err}") from None
        self._load_coded(ckpt.coded, [j for j in range(self.code.n) if j not in schedule["dead"]])
        if not self.code.can_decode(self.cluster.alive()):  # lost past decoding when it was saved:
            state = self.cluster.schedule_state()  # those workers come back as fresh ones, weights shipped
            for j in state["dead"]:
                self.cluster.respawn(j)
                state["incarnation"][j], state["tasks"][j] = state["incarnation"][j] + 1, 0
            load_weights(self.model, ckpt.model, momentum or None, columns=ckpt.columns or None)
            self._load_coded(ckpt.coded, [j for j in range(self.code.n) if j not in state["dead"]])
            self.cluster.load_schedule_state({**state, "dead": []})
        else:
            self.cluster.load_schedule_state(schedule)  # the loads above leave no trace in the schedule

    def _load_coded(self, coded: dict[str, Tensor], workers: list[int]) -> None:
        """DEU: give ``workers`` (those alive when the checkpoint was saved) their coded blocks exactly
        as saved, after checking them against the blocks just encoded (names, shapes, dtypes)."""
        if not self.ctx.scheme.decodes_weight:
            checkpoint.check_tensors("coded", coded, {})
            return
        states = self.cluster.wait_all(self.cluster.submit("state", (None,), workers))
        want = {f"{j}/{key}{suffix}": t for j in workers for key, t in states[j]["weights"].items()
                for suffix in ("", "/momentum_buffer") if not suffix or f"{j}/{key}{suffix}" in coded}
        checkpoint.check_tensors("coded", coded, want)  # momentum only where a worker had one
        args = {j: ({key: coded[f"{j}/{key}"] for key in states[j]["weights"]},
                    {key: coded[f"{j}/{key}/momentum_buffer"] for key in states[j]["weights"]
                     if f"{j}/{key}/momentum_buffer" in coded}) for j in workers}
        self.cluster.wait_all(self.cluster.submit("load", args, workers))

    def _emergency_checkpoint(self, err: BaseException) -> str:
        """Save a checkpoint if the weights can still be decoded and no update was half applied (a
        worker failure inside a step comes from its rounds, before the update); say where the latest
        checkpoint is."""
        path = self.cfg.checkpoint_path
        if path is None:
            return "No checkpoint directory was set (use --run-dir or --checkpoint-dir to get one)."
        if self._checkpoint_iteration == self.position.iteration:
            return (f"Checkpoint of iteration {self._checkpoint_iteration} in {path}; resume with --resume "
                    f"{path}.")
        try:
            if self._in_step and not isinstance(err, ClusterError | DecodeError):
                raise RuntimeError("stopped inside an iteration")
            self.save_checkpoint()
        except Exception as exc:
            why = " ".join(str(exc).split())
            if self.last_checkpoint is None:
                return f"Could not save a checkpoint ({why}) and none was saved earlier."
            return (f"Could not save a checkpoint now ({why}); the latest one (iteration "
                    f"{self._checkpoint_iteration}) can be resumed with --resume {self.last_checkpoint}.")
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
        if self._own_cluster:
            self.cluster.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_cluster(cfg: TrainConfig) -> Cluster:
    """The cluster of ``cfg.backend`` with the configured stragglers / latency model."""
    from sazd.runtime import make_cluster as _make
    from sazd.runtime.latency import straggler_latency

    latency = straggler_latency(cfg.stragglers, cfg.straggler_delay, cfg.latency, cfg.seed)
    timeout = WORKER_TIMEOUT_S[cfg.backend] if cfg.worker_timeout_s is None else cfg.worker_timeout_s
    return _make(cfg.backend, cfg.n, latency=latency, seed=cfg.seed, worker_timeout_s=timeout,
                 compute_dtype=cfg.compute_dtype, **cfg.backend_options())


def _check_resumable(cfg: TrainConfig, saved: TrainConfig) -> None:
    ours, theirs = to_jsonable(cfg.to_dict()), to_jsonable(saved.to_dict())
    if cfg.optim.total_steps is None:  # filled in from the run's length when the checkpoint's run began
        ours["optim"]["total_steps"] = theirs["optim"]["total_steps"]
    diff = [f"{name}: run {ours[name]!r} vs checkpoint {theirs[name]!r}"
            for name in RESUME_FIELDS if ours[name] != theirs[name]]
    if diff:
        raise ValueError("cannot resume: the run's settings differ from the checkpoint's (" + "; ".join(diff)
                         + "); resume with the checkpoint's settings")


def train(
    config: TrainConfig, cluster: Cluster | None = None, data: DataBundle | None = None
) -> dict[str, Any]:
    """Train with ``config``; returns the report dict (see ``Trainer.report``)."""
    with Trainer(config, cluster=cluster, data=data) as trainer:
        return trainer.train()


__all__ = ["BACKENDS", "DTYPES", "Position", "TrainConfig", "Trainer", "make_cluster", "train"]
