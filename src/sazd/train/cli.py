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
import dataclasses
import functools
import sys
import time
from pathlib import Path

# Flags that set a field of a nested or derived config value.
OPTIM_FLAGS = ("optimizer", "lr", "momentum", "dampening", "nesterov", "weight_decay", "schedule",
               "step_size",
               "gamma", "clip_norm")
FLAG_FIELDS = {flag: "optim" for flag in OPTIM_FLAGS}
FLAG_FIELDS.update({flag: "code_options" for flag in ("non_systematic", "shift_unit", "nodes")})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="mlp", help="mlp, cnn, resnet or gpt (default mlp)")
    g.add_argument("--hidden", type=_ints, default=None,
                   help="hidden widths, e.g. 1024,1024 (mlp), 128 (cnn), 16,32,64 (resnet stages) or "
                        "128,4,4 (gpt channels,layers,heads)")
    g.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist, mnist, kmnist, digits, idx; text for gpt: pystdlib (Python's own "
                        "sources) or text (--data-dir DIR)")
    g.add_argument("--data-dir", default=None, help="directory with the four IDX files (text: your files)")
    g.add_argument("--train-limit", type=int, default=None, help="use a seeded subset of N training samples")
    g.add_argument("--test-limit", type=int, default=None, help="use a seeded subset of N test samples")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("code and scheme")
    g.add_argument("--code", default="sazd",
                   help="sazd, cyclic, poly, gaussian, uncoded, replication (default sazd)")
    g.add_argument("--n", type=int, default=None, help="workers (default k+2; k for --code uncoded)")
    g.add_argument("--k", type=int, default=4, help="workers whose answers suffice (default 4)")
    g.add_argument("--non-systematic", action="store_true", help="sazd/poly: the non-systematic form")
    g.add_argument("--shift-unit", type=_shift_unit, default=None,
                   help="sazd: shift unit g in rows, or 'auto'")
    g.add_argument("--nodes", default=None, help="poly: evaluation nodes, integer or chebyshev")
    g.add_argument("--scheme", default="deu", choices=["deu", "naive"])
    g.add_argument("--plan", type=_plan, default=None,
                   help="layers to code, e.g. fc1,fc2 (default: every Linear/Conv2d with both widths >= "
                        "--min-features)")
    g.add_argument("--min-features", type=int, default=64)

    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"],
                   help="adam/adamw only with --scheme naive")
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--dampening", type=float, default=0.0)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine"])
    g.add_argument("--step-size", type=int, default=1000, help="step schedule: iterations between decays")
    g.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    g.add_argument("--clip-norm", type=float, default=None,
                   help="clip the global gradient norm (exact in DEU)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations in all")

    g = parser.add_argument_group("cluster")
    g.add_argument("--backend", default="ray", choices=["ray", "inproc"],
                   help="ray (a local Ray cluster starts by itself) or inproc (simulated latency)")
    g.add_argument("--stragglers", type=int, default=0, help="the first S workers are slow")
    g.add_argument("--straggler-delay", type=float, default=5.0, help="slowdown factor of a straggler")
    g.add_argument("--latency", default=None,
                   help="latency model: none | fixed:S:F | shiftexp:RATE[:SHIFT] | dead:I,J[:AFTER]; "
                        "'+' joins several")
    g.add_argument("--network-gbps", type=float, default=None, help="inproc: simulated master link in Gb/s")
    g.add_argument("--base-time", dest="base_time_s", type=float, default=None,
                   help="inproc: constant task time in seconds (deterministic simulated clock)")
    g.add_argument("--device", default="cpu", help="inproc: workers' device (cpu, cuda)")
    g.add_argument("--address", default=None, help="ray: join this Ray cluster")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per worker actor")
    g.add_argument("--placement", default="spread", choices=["spread", "pack"],
                   help="ray: workers on distinct nodes while there are nodes (spread) or packed (pack)")
    g.add_argument("--worker-timeout", dest="worker_timeout_s", type=float, default=None,
                   help="seconds a worker may stay silent before it is killed, respawned and repaired "
                        "(default: 60 on Ray; none in-process, where it counts simulated seconds)")
    g.add_argument("--decode-device", default="auto",
                   help="where the master decodes: auto (its GPU when it has one), cpu, cuda")
    g.add_argument("--compute-dtype", default=None, choices=["bfloat16", "float16"],
                   help="workers' product precision (decoding stays in --dtype)")
    g.add_argument("--no-repair", dest="repair", action="store_false", help="do not respawn dead workers")

    g = parser.add_argument_group("output")
    g.add_argument("--run-dir", default=None, help="run directory (default runs/train-<time>)")
    g.add_argument("--checkpoint-every", type=int, default=None, help="save a checkpoint every N iterations")
    g.add_argument("--checkpoint-dir", default=None, help="default <run-dir>/checkpoint")
    g.add_argument("--resume", default=None, help="resume from a checkpoint (or run) directory")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --run-dir (deletes only the files sazd wrote there)")
    g.add_argument("--json", default=None, help="also write the report to this JSON file")
    g.add_argument("--check", action="store_true",
                   help="also train plain PyTorch on the same batches and print the weight difference")
    g.add_argument("--no-progress", dest="show_progress", action="store_const", const=False, default=None,
                   help="no progress bar")
    for action in parser._actions:  # record which flags were given (with --resume, those are honoured)
        if action.dest != "help":
            action.__class__ = _recording(type(action))
    parser.set_defaults(_given=frozenset())


@functools.cache
def _recording(cls: type[argparse.Action]) -> type[argparse.Action]:
    class Given(cls):  # type: ignore[valid-type,misc]
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace._given = getattr(namespace, "_given", frozenset()) | {self.dest}

    return Given


def _shift_unit(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'auto', got {text!r}") from None


def _plan(text: str) -> dict[str, str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no layer names in {text!r}; give names such as fc1,fc2")
    return dict.fromkeys(names, "coded")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def config_from_args(args: argparse.Namespace):
    """A ``TrainConfig`` from parsed flags (with --resume: the checkpoint's, overridden by given flags)."""
    from sazd.train import checkpoint
    from sazd.train.optim import OptimConfig
    from sazd.train.trainer import BACKEND_OPTIONS, TrainConfig

    options = {}
    if args.non_systematic:
        options["systematic"] = False
    if args.shift_unit is not None:
        options["shift_unit"] = args.shift_unit
    if args.nodes is not None:
        options["nodes"] = args.nodes
    n = args.n if args.n is not None else (args.k if args.code == "uncoded" else args.k + 2)
    optim = OptimConfig(name=args.optimizer, lr=args.lr, momentum=args.momentum, dampening=args.dampening,
                        nesterov=args.nesterov, weight_decay=args.weight_decay, schedule=args.schedule,
                        step_size=args.step_size, gamma=args.gamma, clip_norm=args.clip_norm)
    fresh = TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, train_limit=args.train_limit,
        test_limit=args.test_limit, hidden=args.hidden, code=args.code, n=n, k=args.k, code_options=options,
        scheme=args.scheme, backend=args.backend, stragglers=args.stragglers,
        straggler_delay=args.straggler_delay, latency=args.latency, network_gbps=args.network_gbps,
        base_time_s=args.base_time_s, address=args.address, gpus_per_worker=args.gpus_per_worker,
        placement=args.placement, worker_timeout_s=args.worker_timeout_s, compute_dtype=args.compute_dtype,
        decode_device=args.decode_device,
        device=args.device, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        optim=optim, dtype=args.dtype, seed=args.seed, plan=args.plan, min_features=args.min_features,
        repair=args.repair, run_dir=args.run_dir, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite,
        show_progress=args.show_progress,
    )
    if args.resume is None:
        fresh.run_dir = fresh.run_dir or _new_run_dir()
        return fresh
    # Resume: the checkpoint's settings, each flag given on the command line applied over them (the
    # trainer refuses those that would change the model, data order or update rule); paths come from
    # the command line only.
    saved = TrainConfig.from_checkpoint(checkpoint.load(args.resume).meta["config"])
    for flag in args._given - {"resume", "json", "check"}:
        name = FLAG_FIELDS.get(flag, flag)
        if name == "optim":
            saved.optim = dataclasses.replace(saved.optim, **{flag: getattr(fresh.optim, flag)})
        elif name == "code_options":
            saved.code_options = {**saved.code_options, **_code_option(flag, fresh.code_options)}
        else:
            setattr(saved, name, getattr(fresh, name))
    for name in ("run_dir", "checkpoint_dir", "data_dir", "address", "resume", "overwrite"):
        setattr(saved, name, getattr(fresh, name))
    given = {FLAG_FIELDS.get(flag, flag) for flag in args._given}
    for backend, options in BACKEND_OPTIONS.items():  # on another backend the old one's options lapse
        for name, default in options.items():
            if backend != saved.backend and name not in given:
                setattr(saved, name, default)
    if saved.run_dir is None and checkpoint.resume_dirs(args.resume)[0] is None:  # a bare checkpoint dir
        saved.run_dir = _new_run_dir()
    return saved


def _code_option(flag: str, options: dict) -> dict:
    key = {"non_systematic": "systematic"}.get(flag, flag)
    return {key: options.get(key, True if key == "systematic" else None)}


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
    from sazd.train.report import check_output_file, write_json_file
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

