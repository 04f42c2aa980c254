"""`sazd experiment accuracy|speed|stability` on tiny grids: outputs, oracles, resume, refusals, bad flags."""

from __future__ import annotations

import csv
import json
import math
import os
import select
import subprocess
import sys

import pytest
import torch

from sazd.cli import main
from sazd.codes import get_code
from sazd.experiment import common, stability
from sazd.files import LOCK_NAME

STAB = ["experiment", "stability", "--codes", "sazd,poly", "--ks", "2", "--ms", "1,2", "--rows", "16",
        "--dtypes", "float32", "--shift-units", "auto,1", "--shift-k", "2", "--samples", "2"]


def _cells(out):
    return [json.loads(line) for line in (out / common.CELLS).read_text().splitlines()]


def test_stability_outputs_match_the_codes_own_certificates(tmp_path, capsys):
    out = tmp_path / "stab"
    assert main([*STAB, "--out", str(out)]) == 0
    for name in ("results.csv", "results.json", "report.md", "stability_float32.png", "shift_units.png"):
        assert (out / name).stat().st_size > 0, name
    cells = _cells(out)
    assert len(cells) == 2 * 2 + 2 * 2  # codes x m, shift units x m
    for c in cells:
        opts = {"sazd": {"systematic": True}, "poly": {"nodes": "integer"}}[c["code"]]
        if c["shift_unit"]:
            opts["shift_unit"] = c["shift_unit"] if c["shift_unit"] == "auto" else int(c["shift_unit"])
        code = get_code(c["code"], n=c["k"] + c["m"], k=c["k"], **opts)
        received = [j for j in range(code.n) if j not in c["worst_missing"]]
        assert c["error"] == pytest.approx(code.certify(received, c["k"] * 16, torch.float32).error)
        n = code.n
        sets = ([j for j in range(n) if j not in (a, b)] for a in range(n) for b in range(a, n))
        every = [code.certify(s, c["k"] * 16, torch.float32).error for s in sets if len(s) == code.k]
        assert c["error"] == pytest.approx(max(every))  # n, k so small that every set was tried
        assert c["overhead"] == pytest.approx((sum(code.block_rows(16)) - code.n * 16) / (code.n * 16))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(cells)
    report = (out / "report.md").read_text()
    assert "Machine:" in report and "## Conclusion" in report and "stability_float32.png" in report


def test_resume_reruns_only_missing_cells(tmp_path, monkeypatch):
    out = tmp_path / "stab"
    assert main([*STAB, "--out", str(out)]) == 0
    lines = (out / common.CELLS).read_text().splitlines()
    (out / common.CELLS).write_text("\n".join(lines[:-2]) + "\n" + lines[-1][:10])  # lost 1, cut 1 short
    calls = []
    real = stability.measure

    def counting(cell, samples):
        calls.append(cell["key"])
        return real(cell, samples)

    monkeypatch.setattr(stability, "measure", counting)
    assert main([*STAB, "--out", str(out)]) == 0
    assert sorted(calls) == sorted(json.loads(line)["key"] for line in lines[-2:])
    calls.clear()
    assert main([*STAB, "--out", str(out)]) == 0
    assert calls == []  # everything done: nothing rerun


def test_bad_flags_and_foreign_directories_exit_2_with_one_line(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([*STAB, "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and len(err.splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    for argv, flag in ((["experiment", "stability", "--ks", "0"], "--ks"),
                       (["experiment", "accuracy", "--codes", "nosuchcode"], "--codes"),
                       (["experiment", "accuracy", "--seeds", "0"], "--seeds"),
                       (["experiment", "speed", "--backends", "mpi"], "--backends"),
                       (["experiment", "speed", "--ns", "2"], "--ns")):
        assert main([*argv, "--out", str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new").exists()
    other = tmp_path / "stab"
    assert main([*STAB, "--out", str(other)]) == 0
    assert main(["experiment", "speed", "--out", str(other)]) == 2  # another experiment's directory
    assert "stability" in capsys.readouterr().err


def test_spread_and_ties():
    a, b = common.Spread.of([0.80, 0.82, 0.81]), common.Spread.of([0.79, 0.80, 0.81])
    assert common.compare(a, b) == "tie"
    assert common.compare(a, common.Spread.of([0.50, 0.52, 0.51])) == "a"
    assert common.compare(common.Spread.of([0.1, 0.1]), a) == "n/a"  # fewer than 3 seeds: no verdict
    assert a.mean == pytest.approx(0.81) and a.half_range == pytest.approx(0.01)


def test_code_list_comes_from_the_registry():
    from sazd.codes import CODE_NAMES

    assert {v.name for v in common.variants().values()} <= set(CODE_NAMES)
    with pytest.raises(ValueError, match="--codes"):
        common.pick_variants("sazd,nosuch")


@pytest.mark.slow
def test_accuracy_records_refusals_and_worst_sets(tmp_path):
    out = tmp_path / "acc"
    argv = ["experiment", "accuracy", "--out", str(out), "--dataset", "digits", "--models", "mlp",
            "--hidden", "64", "--ks", "8", "--codes", "sazd,poly", "--regimes", "worst", "--seeds", "1",
            "--epochs", "1", "--max-steps", "2", "--samples", "2"]
    assert main(argv) == 0
    cells = {(c["code"], c["dtype"]): c for c in _cells(out)}
    for code_label in ("sazd", "poly"):
        c = cells[code_label, "float32"]
        v = common.variants()[code_label]
        code = v.build(10, 8)
        received = [j for j in range(10) if j not in c["stragglers"]]
        assert len(c["stragglers"]) == 2
        certified = code.certify(received, 64, torch.float32).error
        assert common.read_error(c["decode_error"]) == pytest.approx(certified)
    assert cells["sazd", "float32"]["status"] == "ok" and 0 <= cells["sazd", "float32"]["test_accuracy"] <= 1
    poly = cells["poly", "float32"]
    assert not common.read_error(poly["decode_error"]) < 1  # integer nodes at k = 8: undecodable
    assert poly["status"] == "refused" and "refus" in poly["message"].lower()
    # bf16 worker products: trained, next to the certified bf16 error of the same set
    assert cells["sazd", "bfloat16"]["status"] in ("ok", "unstable")
    assert cells["poly", "bfloat16"]["status"] == "refused"
    report = (out / "report.md").read_text()
    assert "refused" in report and "Claim 1" in report and (out / "accuracy.png").is_file()


@pytest.mark.slow
def test_speed_bytes_follow_the_formula_and_uncoded_stops_on_a_dead_worker(tmp_path):
    out = tmp_path / "speed"
    argv = ["experiment", "speed", "--out", str(out), "--models", "mlp", "--widths", "64", "--batches", "16",
            "--ns", "4", "--backends", "inproc", "--stragglers", "none,dead", "--iterations", "1",
            "--warmup", "0"]
    assert main(argv) == 0
    cells = _cells(out)
    # on the workers' clock with a constant task time every worker is asked every round and the
    # systematic blocks answer first, so the bytes are the formula's; on the measured clock of the
    # sweep a loaded machine may reorder answers, so there only the naive/DEU order is asserted
    steady = [c for c in cells if c["part"] == "stragglers" and c["stragglers"] == "none"]
    assert len(steady) == 2 and all(c["bytes_to_workers"] == c["formula_to_workers"] for c in steady)
    sweep = {(c["scheme"], c["coded"]): c for c in cells if c["part"] == "sweep"}
    assert sweep["naive", True]["bytes_to_workers"] > 2 * sweep["deu", True]["bytes_to_workers"]
    dead = {c["coded"]: c for c in cells if c["part"] == "stragglers" and c["stragglers"] == "dead"}
    assert dead[True]["status"] == "ok" and dead[False]["status"] == "stopped"
    proj = [c for c in cells if c["part"] == "projection"]
    assert all(c["link_s"] > 0 for c in proj)
    for name in ("deu_sweep.png", "phases.png", "report.md", "results.csv", "results.json"):
        assert (out / name).is_file()
    assert "projection, not a measurement" in (out / "report.md").read_text()
    assert not any(math.isnan(c.get("iteration_s", 0.0)) for c in cells)


def test_accuracy_judges_the_gpt_by_validation_loss(tmp_path):
    out = tmp_path / "gpt"
    argv = ["experiment", "accuracy", "--out", str(out), "--models", "gpt", "--hidden", "64", "--ks", "2",
            "--codes", "sazd,poly", "--regimes", "worst", "--dtypes", "float32", "--seeds", "3",
            "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--train-limit", "32",
            "--test-limit", "32", "--samples", "2"]
    assert main(argv) == 0
    cells = _cells(out)
    assert len(cells) == 2 * 3 and all(c["status"] == "ok" for c in cells)
    for c in cells:
        assert math.isfinite(c["test_loss"]) and c["test_loss"] > 0  # bytes: a loss, not an accuracy
    summary = json.loads((out / "results.json").read_text())
    claim = summary["claims"][0]
    assert claim["metric"] == "loss" and claim["vs_poly"] in ("SAZD better", "poly better", "tie")
    sazd = [c["test_loss"] for c in cells if c["code"] == "sazd"]
    assert claim["sazd"]["mean"] == pytest.approx(sum(sazd) / 3)
    report = (out / "report.md").read_text()
    assert "val loss (nats/byte)" in report and "pystdlib" in report and "lower is better" in report
    lower, higher = common.Spread.of([1.0, 1.01, 1.02]), common.Spread.of([2.0, 2.01, 2.02])
    assert common.compare(lower, higher, higher_is_better=False) == "a"


# ------------------------------------------------------------------ hostile: flags, links, locks
@pytest.mark.parametrize("argv, flag", [
    (["experiment", "accuracy", "--parity", "40"], "--ks/--parity"),
    (["experiment", "accuracy", "--ks", "2,31", "--codes", "sazd"], "--ks/--parity"),
    (["experiment", "speed", "--ns", "4,40"], "--ns"),
    (["experiment", "stability", "--ms", "1,40"], "--ks/--ms"),
    (["experiment", "stability", "--shift-k", "40"], "--shift-k/--ms"),
    (["experiment", "accuracy", "--dtypes", "float32,int8"], "--dtypes"),
    (["experiment", "speed", "--task-time", "0"], "--task-time"),
])
def test_out_of_range_flags_are_refused_before_the_directory_is_made(tmp_path, capsys, argv, flag):
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err, err
    assert not out.exists()


def _started(out, experiment="stability"):
    """A directory an interrupted `sazd experiment` left: its marker and nothing else."""
    out.mkdir()
    (out / common.MARKER).write_text(experiment + "\n")
    return out


@pytest.mark.parametrize("name", ["report.md", common.CELLS, "results.json", common.MARKER])
def test_a_link_in_the_directory_is_never_written_through(tmp_path, capsys, name):
    users = tmp_path / "users-file.txt"
    users.write_text("the user's own words\n")
    out = _started(tmp_path / "stab")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(users)
    assert main([*STAB, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "link" in err and name in err, err
    assert users.read_text() == "the user's own words\n"
    assert sorted(p.name for p in out.iterdir()) == sorted({common.MARKER, name})  # nothing else made


def test_a_hard_link_in_the_directory_is_never_appended_to(tmp_path, capsys):
    users = tmp_path / "users-file.txt"
    users.write_text("the user's own words\n")
    out = _started(tmp_path / "stab")
    os.link(users, out / common.CELLS)
    assert main([*STAB, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hard link" in err and common.CELLS in err, err
    assert users.read_text() == "the user's own words\n"


def test_out_that_is_a_link_or_holds_a_fifo_is_refused(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert main([*STAB, "--out", str(tmp_path / "alias")]) == 2
    assert "link" in capsys.readouterr().err and not any(real.iterdir())
    out = _started(tmp_path / "fifo")
    os.mkfifo(out / common.CELLS)  # reading it would block for ever
    assert main([*STAB, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a plain file" in err, err


def _hold_lock(directory):
    """Another process that owns ``directory`` (a DirLock) until its stdin closes; returns it once the
    lock is held (bounded wait)."""
    code = ("import sys; from sazd.files import DirLock; lock = DirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    ready = select.select([proc.stdout], [], [], 60)[0]
    assert ready and proc.stdout.readline().strip() == "held"
    return proc


def test_a_directory_another_process_holds_is_refused_naming_it(tmp_path, capsys):
    out = _started(tmp_path / "stab")
    holder = _hold_lock(out)
    try:
        assert main([*STAB, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by process {holder.pid}" in err, err
        assert not (out / common.CELLS).exists()  # the holder's directory was not touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main([*STAB, "--out", str(out)]) == 0  # once the holder is gone the run proceeds
    assert not (out / LOCK_NAME).exists()  # and leaves no lock behind


def test_a_stale_lock_is_taken_over_and_said(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    out = _started(tmp_path / "stab")
    (out / LOCK_NAME).write_text(f"{dead.pid}\n")
    assert main([*STAB, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"locked by process {dead.pid}, which is no longer running" in err


def test_two_experiments_on_one_out_never_both_write(tmp_path):
    """Two processes started together on one directory: each either finishes alone (0) or is refused
    (2) while the other holds it, and the cells are written once each."""
    out = tmp_path / "stab"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-m", "sazd", *STAB, "--out", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 2]), results
    for rc, err in results:
        assert rc == 0 or "in use by process" in err, err
    keys = [c["key"] for c in _cells(out)]
    assert len(keys) == len(set(keys))  # no cell written twice: never two writers at once
