"""`sazd` command line. Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up (imports are lazy so `sazd --help` is fast).

Every command speaks the same way: bad input (a flag's value, a file, a checkpoint) is one line on
stderr naming the problem and the fix, exit status 2, argparse's own errors included (every integer
flag counts something and must be >= 0, every number flag must be finite); a runtime failure (cluster
lost, decoding refused, a disk that fails, any other error: set SAZD_DEBUG=1 for its traceback) is one
line and exit status 1; an interrupt exits with 130."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

# command path -> (module, help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("sazd.train.cli", "train a model with coded model parallelism"),
    ("design",): ("sazd.design", "choose a shift unit: overhead rows and worst decode error"),
    ("bench", "stability"): ("sazd.bench.stability", "worst-case decode error of every code"),
    ("bench", "codec"): ("sazd.bench.codec", "encode/decode throughput vs a plain clone()"),
    ("bench", "train"): ("sazd.bench.train", "iteration time and bytes of naive vs DEU training"),
    ("bench", "runtime"): ("sazd.bench.runtime", "sazd's Ray runtime vs bare Ray, side by side"),
    ("bench", "tp"): ("sazd.bench.tp.command", "PyTorch tensor parallelism vs sazd, same stragglers"),
    ("experiment", "accuracy"): ("sazd.experiment.accuracy", "accuracy of each code under stragglers"),
    ("experiment", "speed"): ("sazd.experiment.speed", "naive vs DEU, coded vs uncoded speed"),
    ("experiment", "stability"): ("sazd.experiment.stability", "decode-error maps and storage overhead"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sazd", description=__doc__.split("\n")[0])
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, (module, help_text) in COMMANDS.items():
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text)
        sub.set_defaults(_module=module, _prog=sub.prog)
        importlib.import_module(module).add_arguments(sub)
        for action in sub._actions:
            action.type = {int: count, float: finite}.get(action.type, action.type)
    return parser


def count(text: str) -> int:
    """An integer flag: a count, size, index or seed, so >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def guarded(prog: str, fn: Callable[[Any], int | None], args: Any) -> int:
    """``fn(args)`` with the exit-status convention of the module docstring."""
    from sazd.codes.base import DecodeError
    from sazd.runtime.cluster import ClusterError

    try:
        return int(fn(args) or 0)
    except (ClusterError, DecodeError) as err:
        print(f"{prog}: failed: {one_line(err)}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{prog}: failed: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("SAZD_DEBUG"):
            raise
        print(f"{prog}: failed: {type(err).__name__}: {one_line(err)} (SAZD_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    return guarded(args._prog, importlib.import_module(args._module).run, args)
