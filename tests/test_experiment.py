"""`sazd experiment accuracy|speed|stability` on tiny grids: outputs, oracles, resume, refusals, bad flags."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from sazd.cli import main
from sazd.codes import get_code
from sazd.experiment import common, stability

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
