"""`sazd` command line. Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up (imports are lazy so `sazd --help` is fast)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command path -> (module, help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("sazd.train.cli", "train a model with coded model parallelism"),
    ("design",): ("sazd.design", "choose a shift unit: overhead rows and worst decode error"),
    ("bench", "stability"): ("sazd.bench.stability", "worst-case decode error of every code"),
    ("bench", "codec"): ("sazd.bench.codec", "encode/decode throughput vs a plain clone()"),
    ("bench", "train"): ("sazd.bench.train", "iteration time and bytes of naive vs DEU training"),
    ("bench", "runtime"): ("sazd.bench.runtime", "sazd's Ray runtime vs bare Ray, side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sazd", description=__doc__.split("\n")[0])
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
        sub.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
