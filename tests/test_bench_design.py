"""Smoke tests of `sazd bench stability`, `sazd bench codec` and `sazd design` on tiny grids, plus the
shared helpers they rest on (code specs, hard straggler sets, the worst-error measurement)."""

from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch

from sazd import design
from sazd.bench import codec, stability
from sazd.codes import SAZD, Cyclic, Poly
from sazd.codes.base import Code
from sazd.measure.codes import CodeSpec, parse_code_spec
from sazd.measure.decode import Problem, hard_sets, measure_worst, pick_sets


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


class SumCode(Code):
    """A toy systematic (k+1, k) code with one sum parity; its decoder is deliberately wrong (off by
    one whole block) when the missing block is ``bad`` -- so the worst-error search must find it."""

    is_systematic = True

    def __init__(self, k: int, bad: int) -> None:
        super().__init__(k + 1, k)
        self.bad = bad

    def _encode_blocks(self, blocks):
        return [*blocks.unbind(0), blocks.sum(0)]

    def _decode_blocks(self, results, r, out):
        for i in range(self.k):
            out[i] = results.get(i, 0)
        for i in range(self.k):
            if i not in results:
                out[i] = results[self.k] - out.sum(0)
                if i == self.bad:
                    out[i] += results[self.k]  # the planted bug


# ------------------------------------------------------------------ helpers
def test_parse_code_spec_types_and_label():
    spec = parse_code_spec("poly:nodes=chebyshev,systematic=true")
    assert spec == CodeSpec("poly", {"nodes": "chebyshev", "systematic": True})
    assert parse_code_spec("sazd:shift_unit=16").opts == {"shift_unit": 16}
    assert parse_code_spec(spec.label) == spec
    with pytest.raises(ValueError, match="key=value"):
        parse_code_spec("sazd:shift_unit")


def test_hard_sets_cover_every_adjacent_window_of_missing_systematic_blocks():
    code = SAZD(12, 8)
    sets = hard_sets(code)
    assert all(len(s) == code.k and len(set(s)) == code.k for s in sets)
    assert len(set(sets)) == len(sets)
    missing = [set(range(code.n)) - set(s) for s in sets]
    for a in range(code.k - code.m + 1):
        assert set(range(a, a + code.m)) in missing
    sets_all, total, exhaustive = pick_sets(code, samples=5, seed=0)
    assert sets_all[: len(sets)] == sets and total == math.comb(12, 8) and not exhaustive


def test_measure_worst_finds_the_planted_bad_set_and_agrees_with_verify_report():
    code = SumCode(k=4, bad=2)
    problem = Problem.random(rows=4 * 8, cols=3, seed=1)
    sets, _, exhaustive = pick_sets(code, samples=10, seed=0)
    assert exhaustive
    worst = measure_worst(code, problem, sets, torch.float64)
    assert worst.worst_missing == (2,) and worst.worst_error > 0.1
    stopped = measure_worst(code, problem, sets, torch.float64, stop_above=0.1)
    assert stopped.sets_checked < len(sets) and "stopped" in stopped.status

    sazd = SAZD(7, 4, shift_unit=1)
    report = sazd.verify_report(4 * 16, cols=5, inner=64, dtype=torch.float32, seed=3)
    problem = Problem.random(rows=4 * 16, cols=5, inner=64, seed=3)
    mine = measure_worst(sazd, problem, pick_sets(sazd, samples=100, seed=0)[0], torch.float32)
    assert mine.worst_error == pytest.approx(report.worst_error, rel=1e-12)


# ------------------------------------------------------------------ bench stability
def test_stability_quick_writes_table_csv_png_and_json(tmp_path, capsys):
    argv = ["--quick", "--codes", "sazd", "poly:nodes=chebyshev", "--dtypes", "fp32", "--out", str(tmp_path)]
    assert stability.run(parse(stability, argv)) == 0
    table = capsys.readouterr().out
    assert "worst err" in table and "poly:nodes=chebyshev" in table
    with (tmp_path / "stability.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == stability.FIELDS
    assert len(rows) == 2 * 2 * 2 * 2  # codes x k x m x rows
    sazd_rows = [row for row in rows if row["code"] == "sazd"]
    assert all(math.isfinite(float(row["worst_error"])) for row in sazd_rows)
    assert max(float(row["worst_error"]) for row in sazd_rows) < 1e-5
    assert {int(row["overhead_rows"]) for row in rows if row["code"] == "sazd" and row["m"] == "2"} != {0}
    png = (tmp_path / "stability.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000

    argv = ["--codes", "sazd", "--k", "4", "--m", "2", "--rows", "16", "--dtypes", "bf16", "--json"]
    assert stability.run(parse(stability, [*argv, "--out", str(tmp_path)])) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["results"]) == 1
    assert payload["machine"]["nproc"] >= 1
    assert {row["dtype"] for row in payload["results"]} == {"bf16"}
    assert all(isinstance(row["worst_error"], float) for row in payload["results"] if row["code"] == "sazd")


def test_stability_reports_overflow_honestly(tmp_path, capsys):
    # Integer-node Poly at k=12 in bf16 is hopeless; the error must come out huge/inf/nan, not hidden.
    argv = ["--codes", "poly", "--k", "12", "--m", "2", "--rows", "16", "--dtypes", "bf16",
            "--samples", "4", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert stability.run(parse(stability, argv)) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    err = row["worst_error"]
    assert isinstance(err, str) or err > 1e-1


# ------------------------------------------------------------------ bench codec
def test_codec_quick_reports_positive_ratios_and_exact_counters(capsys):
    args = parse(codec, ["--quick", "--json", "--codes", "sazd", "poly", "--repeats", "2"])
    assert codec.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["code"], r["op"]) for r in rows] == [
        (c, op) for c in ("sazd", "poly")
        for op in ("encode", "encode W^T view", "decode 1 missing", "decode 2 missing")
    ]
    assert all(r["gbps"] > 0 and r["clone_gbps"] > 0 and r["vs_clone"] > 0 for r in rows)
    r_block = report["config"]["rows_per_block"]
    out_bytes = report["config"]["rows"] * report["config"]["cols"] * 4
    sazd_decode = [r for r in rows if r["code"] == "sazd" and r["op"].startswith("decode")]
    assert [r["rows_solved"] for r in sazd_decode] == [r_block, 2 * r_block]
    assert all(r["bytes_written"] == out_bytes and r["max_abs_error"] < 1e-4 for r in sazd_decode)
    for sazd_encode in rows[:2]:  # of W by rows, and of W stored transposed: the same blocks' bytes
        assert sazd_encode["rows_written"] == sum(SAZD(10, 8).block_rows(r_block))
    assert {s["vs"] for s in report["speedups"]} == {"poly"}
    assert all(s["speedup"] > 0 for s in report["speedups"])


def test_codec_refuses_impossible_missing_count():
    with pytest.raises(ValueError, match="--missing 3"):
        codec.measure(parse(codec, ["--quick", "--codes", "sazd", "--missing", "3"]))


# ------------------------------------------------------------------ design
FAST = ["--samples", "4", "--bench-mb", "0.05", "--repeats", "1", "--json"]


def test_design_recommends_a_unit_whose_measured_error_meets_the_bound(capsys):
    argv = ["--n", "7", "--k", "4", "--rows", "64", "--units", "1,4", "--families", "sazd", *FAST]
    assert design.run(parse(design, argv)) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["shift_unit"] for c in report["candidates"]] == [1, 4, "auto"]
    best = next(c for c in report["candidates"] if c["design"] == report["recommended"])
    assert best["measured_error"] <= 1e-5 and best["meets"]
    meeting = [c for c in report["candidates"] if c["meets"]]
    assert best["overhead_rows"] == min(c["overhead_rows"] for c in meeting)
    code = SAZD(7, 4, shift_unit=best["shift_unit"])
    assert best["overhead_rows"] == code.overhead_rows(4 * 64)
    assert all(c["predicted_error"] > 0 and c["decode_vs_clone"] > 0 for c in report["candidates"])


def test_design_compares_every_family_and_recommends_the_cheapest_accurate_one(capsys):
    # four parity workers: SAZD's irregular sets fail; the cyclic code meets 1e-5
    argv = ["--n", "8", "--k", "4", "--rows", "40", "--units", "1", "--primes", "2", *FAST, "--samples", "70"]
    design.run(parse(design, argv))
    report = json.loads(capsys.readouterr().out)
    families = [c["family"] for c in report["candidates"]]
    assert families == ["sazd"] * 2 + ["cyclic"] * 3 + ["poly"] * 2 + ["gaussian"] * 2
    assert [c["design"] for c in report["candidates"] if c["family"] == "cyclic"] == [
        "cyclic:q=5", "cyclic:q=7", "cyclic:q=5,rows=consecutive"]
    cyclic = report["candidates"][2]
    assert cyclic["meets"] and cyclic["exhaustive"] and cyclic["sets_checked"] == math.comb(8, 4)
    assert cyclic["overhead_rows"] == Cyclic(8, 4, q=5).overhead_rows(4 * 40) > 0
    meeting = [c for c in report["candidates"] if c["meets"]]
    best = next(c for c in meeting if c["design"] == report["recommended"])
    assert best["overhead_pct"] <= min(c["overhead_pct"] for c in meeting) + 0.005
    assert all(c["predicted_error"] is None for c in report["candidates"] if c["family"] != "sazd")


def test_design_says_so_when_nothing_meets_the_bound(capsys):
    argv = ["--n", "6", "--k", "4", "--rows", "32", "--units", "1", "--max-error", "1e-12", "--samples", "2",
            "--bench-mb", "0.05", "--repeats", "1", "--primes", "1"]  # fmt: skip
    assert design.run(parse(design, argv)) == 1
    out = capsys.readouterr().out
    assert "no design meets" in out and "cyclic:q=5" in out and "gaussian:systematic=true" in out


def test_design_refuses_bad_input():
    with pytest.raises(ValueError, match="--n must be > --k"):
        design.evaluate(parse(design, ["--n", "4", "--k", "4", "--rows", "8"]))
    with pytest.raises(ValueError, match="--units"):
        design.evaluate(parse(design, ["--n", "6", "--k", "4", "--rows", "8", "--units", "1,x"]))
    with pytest.raises(ValueError, match="--families"):
        design.evaluate(parse(design, ["--n", "6", "--k", "4", "--rows", "8", "--families", "sazd,lt"]))


def test_poly_is_a_code_the_commands_can_build():
    assert isinstance(parse_code_spec("poly:nodes=chebyshev").build(10, 8), Poly)
