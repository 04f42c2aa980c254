"""`sazd bench train` on the in-process backend with tiny widths: the command runs, its JSON has the
fields, traffic counters equal the traffic formula exactly, DEU moves fewer bytes than naive once
the layers are wide, and stragglers cost coded training less than uncoded. No wall-clock assertions."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from sazd.bench import train as bench
from sazd.cli import main
from sazd.codes import get_code
from sazd.measure.training import PHASES, measure_training, synthetic_data, worker_clock_cluster
from sazd.parallel import layer_traffic

TINY = ["--backend", "inproc", "--widths", "64,192", "--iterations", "1", "--warmup", "1",
        "--batch-size", "8", "--task-time", "0.05"]


def test_command_json_fields_and_files(tmp_path, capsys) -> None:
    parts = ["--parts", "timing,projection"]
    assert main(["bench", "train", *TINY, *parts, "--json", "--out", str(tmp_path)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == json.loads((tmp_path / "results.json").read_text())
    for key in ("cpu", "nproc", "torch_threads"):
        assert key in rep["machine"]
    assert [(r["width"], r["scheme"]) for r in rep["timing"]] == [(64, "naive"), (64, "deu"),
                                                                  (192, "naive"), (192, "deu")]
    for part in ("timing", "projection"):
        for row in rep[part]:
            assert row["iterations"] == 1
            assert row["mean_s"] > 0 and row["median_s"] > 0
            assert set(row["phases_s"]) == set(PHASES)
            for key in ("bytes_to_workers", "bytes_from_workers", "formula_to_workers",
                        "formula_from_workers"):
                assert row[key] > 0
        assert [r["width"] for r in rep[f"{part}_ratios"]] == [64, 192]
        for ratio in rep[f"{part}_ratios"]:
            assert ratio["speedup_deu"] > 0 and ratio["bytes_ratio"] > 0
    assert all(r["network_gbps"] == 10.0 for r in rep["projection"])
    for part in ("timing", "projection"):  # at width 192 the weights outweigh a batch of 8 by far
        naive, deu = (next(r for r in rep[part] if r["width"] == 192 and r["scheme"] == scheme)
                      for scheme in bench.scheme_names())
        assert deu["bytes_to_workers"] < naive["bytes_to_workers"]
        assert next(r for r in rep[f"{part}_ratios"] if r["width"] == 192)["bytes_ratio"] > 1
    for name in ("timing", "projection"):
        with (tmp_path / f"{name}.csv").open() as f:
            assert len(list(csv.DictReader(f))) == len(rep[name])
    assert "stragglers" not in rep


def test_table_output_names_machine_and_ratios(tmp_path, capsys) -> None:
    assert main(["bench", "train", *TINY, "--parts", "stragglers", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "machine:" in text and " cores, " in text and " threads), " in text and "load average" in text
    assert "with / without stragglers: coded 1.00x, uncoded 5.00x" in text
    rep = json.loads((tmp_path / "results.json").read_text())
    kinds = [(r["kind"], r["n"], r["stragglers"]) for r in rep["stragglers"]]
    assert kinds == [("coded", 6, 0), ("coded", 6, 2), ("uncoded", 4, 0), ("uncoded", 4, 2)]
    with (tmp_path / "stragglers.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def _args(**over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(TINY)
    for key, value in over.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("code", ["sazd", "gaussian"])
@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_bytes_equal_the_formula_exactly(scheme: str, code: str) -> None:
    """With a constant task time every worker is asked every round and the first k answers are workers
    0..k-1 (systematic blocks for SAZD; equal-length blocks for the Gaussian code), so the counters must
    equal the formula to the byte, every iteration."""
    args = _args(batch_size=8, code=code)
    width, iterations = 96, 3
    data = synthetic_data(args.batch_size * (1 + iterations))
    cfg = bench.config(args, width, scheme, "inproc", base_time_s=0.01)
    row = measure_training(cfg, data, warmup=1, iterations=iterations)
    assert row["bytes_exact"] and row["iterations"] == iterations
    assert row["bytes_to_workers"] == row["formula_to_workers"]
    assert row["bytes_from_workers"] == row["formula_from_workers"]
    # the formula itself, by hand for the coded layers fc1 (784 -> 96) and fc2 (96 -> 96), n=6, k=4
    c = get_code(code, n=6, k=4)
    N, s, n = 8, 4, 6
    R = {w: sum(c.block_rows(w // 4)) for w in (96, 784)}
    fwd = n * 784 * N * s + n * 96 * N * s
    bwd = n * 96 * N * s  # fc2's input gradient only: fc1's input is data
    # fc1's input is data: its column copy (784 rows) is neither shipped nor updated
    if scheme == "naive":
        upd = R[96] * 784 * s + R[96] * 96 * s + R[96] * 96 * s
    else:  # encoded dY^T of fc1, and dY^T and X^T of fc2; workers reuse X^T, dY^T from the rounds
        upd = R[96] * N * s + 2 * R[96] * N * s
    assert row["formula_to_workers"] == fwd + bwd + upd
    assert row["formula_from_workers"] == (96 + 96 + 96) * N * s
    # broadcasts (the rounds' X^T, dY^T) leave the master once; per-worker arguments count per worker
    assert row["bytes_sent_once"] == row["formula_sent_once"] == 784 * N * s + 96 * N * s + 96 * N * s + upd


def test_deu_moves_fewer_bytes_than_naive() -> None:
    """By the model's formula at batch 128 for the benchmark MLP 784-W-W-10 (coded: 784->W, W->W; the
    first layer's input is data): from width 256 up DEU sends less, and the gap grows with the width."""
    c = get_code("sazd", n=6, k=4)

    def mlp_traffic(width: int, scheme: str) -> dict[str, int]:
        first = layer_traffic(c, scheme, 784, width, 128, 4, input_grad=False)
        second = layer_traffic(c, scheme, width, width, 128, 4)
        return {key: first[key] + second[key] for key in first}

    ratios, once = [], []
    for width in (256, 1024, 2048, 4096):
        naive, deu = (mlp_traffic(width, scheme) for scheme in ("naive", "deu"))
        assert deu["bytes_from_workers"] == naive["bytes_from_workers"]  # the same products come back
        assert deu["bytes_to_workers"] < naive["bytes_to_workers"]
        assert deu["bytes_sent_once"] < naive["bytes_sent_once"] <= naive["bytes_to_workers"]
        ratios.append((naive["bytes_to_workers"] + naive["bytes_from_workers"])
                      / (deu["bytes_to_workers"] + deu["bytes_from_workers"]))
        once.append((naive["bytes_sent_once"] + naive["bytes_from_workers"])
                    / (deu["bytes_sent_once"] + deu["bytes_from_workers"]))
    assert ratios == sorted(ratios) and once == sorted(once)  # O(W^2) vs O(W): the gap grows with W
    assert all(o > r for o, r in zip(once, ratios, strict=True))  # broadcasts are most of DEU's bytes


def test_simulated_stragglers_cost_coded_less_than_uncoded() -> None:
    """On the workers' simulated clock with a constant task time the figures are exact: coded DEU
    never waits for the S <= n-k stragglers, uncoded waits for every one of their 5x slower tasks."""
    args = _args(stragglers=2, straggler_delay=5.0, task_time=0.05)
    rows = bench.part_stragglers(args, 64, synthetic_data(8 * 3), "inproc")
    ratios = bench.straggler_ratios(rows)
    assert ratios["coded"] <= ratios["uncoded"]
    assert ratios["coded"] == pytest.approx(1.0, rel=1e-9)
    assert ratios["uncoded"] == pytest.approx(5.0, rel=1e-9)
    for row in rows:
        assert row["mean_with_master_s"] == pytest.approx(row["mean_s"] + row["master_s"])
    slow = next(r for r in rows if r["kind"] == "coded" and r["stragglers"] == 2)
    fast = next(r for r in rows if r["kind"] == "coded" and r["stragglers"] == 0)
    assert slow["late_results_discarded"] < fast["late_results_discarded"]  # stragglers are not even asked


def test_worker_clock_ignores_master_time() -> None:
    cluster = worker_clock_cluster(3, base_time_s=0.5)
    cluster.note_master_time(10.0)
    assert cluster.clock == 0.0
    with pytest.raises(ValueError, match="seconds"):
        cluster.note_master_time(-1.0)


@pytest.mark.parametrize("flags, match", [
    (["--stragglers", "3"], "--stragglers 3"),
    (["--widths", "32"], "--widths"),
    (["--parts", "timing,bogus"], "--parts"),
    (["--iterations", "0"], "--iterations"),
    (["--network-gbps", "0"], "--network-gbps"),
])
def test_bad_arguments_are_clear_errors(flags: list[str], match: str, capsys) -> None:
    assert main(["bench", "train", *TINY, *flags]) == 2  # one line on stderr, exit status 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err
