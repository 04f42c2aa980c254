"""The measurement library under `sazd bench` and `sazd experiment` (sazd.measure): its table printer,
timing loop, decode-error search, machine description and bounded Ray join; the layering it stands for
(no import between bench/ and experiment/, `sazd --help` free of torch); and the bench commands'
outputs against links."""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sazd
from sazd.cli import main
from sazd.codes import get_code
from sazd.measure.decode import pick_sets, worst_certified_set
from sazd.measure.machine import machine, machine_line
from sazd.measure.table import csv_text, table
from sazd.measure.timing import Timed, alternate

SRC = Path(sazd.__file__).parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


# ------------------------------------------------------------------ the library
def test_table_aligns_text_and_writes_markdown_and_csv():
    rows = [["sazd", 1.5], ["poly:nodes=chebyshev", 12]]
    text = table(["code", "x"], rows).splitlines()
    assert text[0] == "                code    x" and set(text[1]) == {"-"}
    assert text[3] == "poly:nodes=chebyshev   12" and len({len(line) for line in text}) == 1
    assert table(["code", "x"], rows, markdown=True).splitlines() == [
        "| code | x |", "|---|---|", "| sazd | 1.5 |", "| poly:nodes=chebyshev | 12 |"]
    dicts = [{"a": 1, "b": "x,y"}, {"a": 2, "c": 3}]
    assert list(csv.DictReader(io.StringIO(csv_text(dicts)))) == [
        {"a": "1", "b": "x,y", "c": ""}, {"a": "2", "b": "", "c": "3"}]


def test_alternate_runs_every_op_once_per_repeat_in_alternating_order():
    calls: list[str] = []
    prepared: list[int] = []
    ops = [Timed(name, lambda name=name: calls.append(name)) for name in "abc"]
    alternate(ops, repeats=3, warmup=1, before_repeat=prepared.append)
    assert calls == list("abc" "cba" "abc" "cba")  # warmup first, then forwards and backwards
    assert prepared == [0, 1, 2, 3]
    for op in ops:
        assert len(op.times) == 3 and 0 <= op.best_s <= op.median_s


def test_worst_certified_set_is_the_largest_certificate_over_the_sets():
    code = get_code("poly", n=10, k=8)  # integer nodes: some sets are far worse than others
    received, err, errors = worst_certified_set(code, 64, torch.float32, samples=12, seed=0)
    sets = [s for s in pick_sets(code, 12, 0)[0] if code.can_decode(s)]
    assert len(errors) == len(sets) and err == max(errors)
    assert code.certify(received, 64, torch.float32).error == pytest.approx(err)
    assert min(errors) < err  # the search tells sets apart


def test_machine_says_where_the_figures_came_from():
    m = machine()
    assert m["nproc"] == os.cpu_count() and m["torch"] == torch.__version__
    assert m["torch_threads"] == torch.get_num_threads() and m["device"] == "cpu"
    line = machine_line(m)
    assert f"{m['nproc']} cores" in line and "load average" in line and m["date_utc"] in line


# ------------------------------------------------------------------ the layering
def _sazd_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("sazd")}


@pytest.mark.parametrize("package, other", [("bench", "experiment"), ("experiment", "bench"),
                                            ("measure", "bench"), ("measure", "experiment")])
def test_no_import_between_bench_and_experiment_and_the_library_below_both(package, other):
    for path in (SRC / package).glob("*.py"):
        bad = {m for m in _sazd_imports(path) if m == f"sazd.{other}" or m.startswith(f"sazd.{other}.")}
        assert not bad, f"{path.name} imports {bad}"


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys; from sazd.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_joining_a_ray_cluster_nobody_runs_is_bounded_and_one_line(tmp_path):
    """`--address` of nothing: a one-line failure, quickly, before anything is measured."""
    argv = [sys.executable, "-m", "sazd", "bench", "train", "--backend", "ray", "--address", "127.0.0.1:9",
            "--widths", "64", "--iterations", "1", "--parts", "timing", "--out", str(tmp_path / "out")]
    out = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "127.0.0.1:9" in out.stderr, out.stderr
    assert not any((tmp_path / "out").glob("*")), "nothing is written when nothing was measured"


# ------------------------------------------------------------------ bench outputs never follow a link
def test_bench_stability_refuses_a_linked_out_before_measuring(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert main(["bench", "stability", "--quick", "--codes", "sazd", "--out", str(tmp_path / "alias")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "link" in err and "--out" in err, err
    assert not any(real.iterdir())


def test_bench_stability_never_writes_through_a_link_inside_out(tmp_path, capsys):
    users = tmp_path / "users.csv"
    users.write_text("mine\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stability.csv").symlink_to(users)
    assert main(["bench", "stability", "--quick", "--codes", "sazd", "--out", str(out)]) == 2
    assert "stability.csv" in capsys.readouterr().err and users.read_text() == "mine\n"


def test_bench_train_refuses_a_link_in_out_before_training(tmp_path, capsys):
    users = tmp_path / "users.json"
    users.write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(users)
    argv = ["bench", "train", "--backend", "inproc", "--widths", "64", "--iterations", "1", "--parts",
            "projection", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json" in err and "projection" not in err, err
    assert users.read_text() == "{}"


def test_bench_runtime_refuses_a_linked_json_before_starting_ray(tmp_path, capsys):
    users = tmp_path / "users.json"
    users.write_text("{}")
    (tmp_path / "link.json").symlink_to(users)
    assert main(["bench", "runtime", "--json", str(tmp_path / "link.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json" in err and "link" in err, err
    assert users.read_text() == "{}" and json.loads(users.read_text()) == {}


@pytest.mark.slow
def test_a_ray_session_leaves_no_process_of_its_ray_behind():
    """A local Ray started for a measurement: inside, its processes run below ours; after the session
    none of them is left (shut down, or killed after the bounded shutdown)."""
    code = ("import os, ray; from sazd.measure.ray_session import ray_session; "
            "from sazd.runtime.ray_backend import process_tree\n"
            "with ray_session():\n"
            "    assert ray.is_initialized()\n"
            "    below = [p for p, _ in process_tree([os.getpid()]) if p != os.getpid()]\n"
            "    print(' '.join(map(str, below)), flush=True)\n"
            "print('after', ray.is_initialized(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    inside, after = out.stdout.strip().splitlines()
    pids = [int(p) for p in inside.split()]
    assert pids and after == "after False"  # Ray ran below us, and was shut down
    assert not [p for p in pids if Path(f"/proc/{p}").exists()], "a Ray process outlived the session"


@pytest.mark.parametrize("argv", [
    ["bench", "runtime", "--json", "/proc/sazd-nowhere/out.json"],
    ["bench", "runtime", "--json", "/proc/out.json"],
    ["bench", "train", "--backend", "inproc", "--widths", "64", "--out", "/proc/sazd-nowhere"],
    ["bench", "stability", "--quick", "--codes", "sazd", "--out", "/dev/null/sazd"],
    ["experiment", "stability", "--quick", "--out", "/proc/sazd-nowhere"],
])
def test_an_unwritable_output_is_refused_before_any_work(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write in" in err and "choose a writable place" in err, err


def test_imports_inside_functions_only_in_the_modules_help_loads():
    """A module imports sazd modules at its top, unless ``sazd --help`` loads it: those defer what
    would bring torch in."""
    code = ("import sys; from sazd.cli import build_parser; build_parser(); "
            "print(' '.join(sorted(m for m in sys.modules if m == 'sazd' or m.startswith('sazd.'))))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    light = set(out.stdout.split())
    offenders = []
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom | ast.Import)]
                names = [n.module for n in inner if isinstance(n, ast.ImportFrom) and n.module]
                names += [a.name for n in inner if isinstance(n, ast.Import) for a in n.names]
                if any(name == "sazd" or name.startswith("sazd.") for name in names) and module not in light:
                    offenders.append(f"{module}.{node.name}")
    assert not offenders, offenders
