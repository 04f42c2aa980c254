"""`sazd train`: coded model-parallel training from the command line.

    sazd train --model mlp --dataset fashion-mnist --code sazd --n 6 --k 4 --scheme deu \\
               --backend inproc --epochs 1 --stragglers 2 --json out.json

Writes a run directory (config.json, metrics.jsonl, report.json, loss.png, accuracy.png, checkpoint/),
shows a progress bar per epoch and prints the bytes per iteration, measured and by the traffic formula
for both schemes. Bad settings (Adam with DEU, impossible n/k, a bad plan, a foreign --run-dir ...)
exit with code 2 and a one-line message before any worker starts; a failure during training exits
with code 1 (SIGINT/SIGTERM: 130/143) after saving a checkpoint and the report.

With --resume, the checkpoint's settings apply and every flag given on the command line is honoured
(output paths, length, progress) or refused (a change of model, data order or update rule); paths
come only from the command line, never from the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sazd.train import config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting of ``TrainConfig`` (declared in ``sazd.train.config``), and the command's own."""
    config.add_arguments(parser)
    g = parser.add_argument_group("this command")
    g.add_argument("--json", default=None, help="also write the report to this JSON file")
    g.add_argument("--check", action="store_true",
                   help="also train plain PyTorch on the same batches and print the weight difference")


def config_from_args(args: argparse.Namespace) -> config.TrainConfig:
    """A ``TrainConfig`` from parsed flags (with --resume: the checkpoint's, overridden by given flags)."""
    resume = getattr(args, "resume", None)
    if resume is None:
        cfg = config.from_flags(args)
        cfg.run_dir = cfg.run_dir or _new_run_dir()
        return cfg
    # Resume: the checkpoint's settings, each flag given on the command line applied over them (the
    # trainer refuses those that would change the model, data order or update rule); paths come from
    # the command line only.
    from sazd.train import checkpoint
    from sazd.train import resume as resuming

    saved = config.TrainConfig.from_checkpoint(checkpoint.load(resume).meta["config"])
    cfg = config.from_flags(args, saved)
    if cfg.run_dir is None and resuming.resume_dirs(resume)[0] is None:  # a bare checkpoint directory
        cfg.run_dir = _new_run_dir()
    return cfg


def _new_run_dir() -> str:
    base = Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return str(path)


def run(args: argparse.Namespace) -> int:
    from sazd.cli import guarded

    return guarded("sazd train", _run, args)


def _run(args: argparse.Namespace) -> int:
    from sazd.train.rundir import check_output_file, write_json_file
    from sazd.train.trainer import Trainer

    cfg = config_from_args(args)
    if args.check and cfg.resume is not None:
        raise ValueError("--check trains plain PyTorch from the start; it cannot go with --resume")
    if args.json:
        check_output_file(args.json, "--json")
    with Trainer(cfg) as trainer:  # bad input stops here: exit 2, nothing trained, no worker left
        layers = list(trainer.ctx.layers)
        print(f"training {cfg.model} on {cfg.dataset}: code {trainer.code}, scheme {cfg.scheme}, backend "
              f"{cfg.backend}, coded layers {layers}", flush=True)
        try:
            report = trainer.train()
        except KeyboardInterrupt:
            signum = trainer.stop_signal or 2
            print(f"sazd train: stopped by signal {signum} at iteration {trainer.position.iteration}. "
                  f"{trainer.ending}", file=sys.stderr)
            return 128 + signum
        except Exception as err:  # after training began: one line, the checkpoint, the full report
            from sazd.cli import one_line

            ending = "" if trainer.ending in str(err) else f" {trainer.ending}"
            message = one_line(err).rstrip(".")
            print(f"sazd train: failed at iteration {trainer.position.iteration}: {message}.{ending} "
                  f"Report: {Path(cfg.run_dir) / 'report.json'}", file=sys.stderr)
            return 1
        if args.check:
            from sazd.parallel import plain_state_dict
            from sazd.train.reference import reference_run, relative_weight_error

            ref = reference_run(cfg, trainer.data, trainer.position.iteration)
            error = relative_weight_error(plain_state_dict(trainer.model), ref)
            report["check_max_relative_weight_error"] = error
    print_summary(report, cfg)
    if args.json:
        write_json_file(args.json, report)
    return 0


def print_summary(report: dict, cfg) -> None:
    it = report["iterations"]
    clock = "simulated" if cfg.backend == "inproc" else "wall"
    print(f"test accuracy {100 * report['test_accuracy']:.2f}% (loss {report['test_loss']:.4f}) after {it} "
          f"iterations" + (f"; test perplexity {report['test_perplexity']:.2f}" if "test_perplexity" in report
                           else ""))
    if it:
        phases = ", ".join(f"{k.removesuffix('_s')} {1000 * v:.1f}" for k, v in report["phases_s"].items())
        print(f"iteration time: {1000 * report['mean_iteration_s']:.1f} ms ({clock}); "
              f"master wall {1000 * report['mean_wall_iteration_s']:.1f} ms = {phases} ms")
        formula = report["formula_bytes_per_iteration"]
        naive, deu = formula["naive"]["bytes_to_workers"], formula["deu"]["bytes_to_workers"]
        print(f"bytes/iteration to workers: measured {_mb(report['bytes_to_workers_per_iteration'])} "
              f"({cfg.scheme}); formula naive {_mb(naive)}, deu {_mb(deu)} (naive/deu = {naive / deu:.1f}x)")
        print(f"master egress/iteration with each tensor sent once: "
              f"{_mb(report['bytes_sent_once_per_iteration'])} ({cfg.scheme})")
        print(f"bytes/iteration from workers: measured {_mb(report['bytes_from_workers_per_iteration'])}; "
              f"formula {_mb(formula[cfg.scheme]['bytes_from_workers'])}")
    if report.get("workers"):
        from sazd.train.report import latency_table, workers_line

        print(workers_line(report["workers"]))
        if it:
            print(latency_table(report["worker_latency"]))
    if report["repairs"]:
        print(f"repairs: {len(report['repairs'])} (workers {[r['worker'] for r in report['repairs']]})")
    if "check_max_relative_weight_error" in report:
        error = report["check_max_relative_weight_error"]
        print(f"check: max relative weight difference to plain PyTorch {error:.2e}")
    if cfg.run_dir:
        print(f"run directory: {cfg.run_dir}")


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f} MB"

