"""``zoo.measure_step``: what `sazd bench train --model` reports for a third-party model's coded step."""

from __future__ import annotations

import math

import pytest

from sazd.models import zoo


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_measure_step_reports_consistent_times_and_phases(scheme: str) -> None:
    row = zoo.measure_step("transformer-encoder", scheme, warmup=1, iterations=3, batch_size=2)
    assert row["scheme"] == scheme and row["iterations"] == 3
    assert 0 < row["coded"] <= row["total"] and row["float64_error"] < 1e-10
    for key in ("plain_step_s", "coded_step_s", "plain_best_s", "coded_best_s", "coded_mean_s"):
        assert row[key] > 0, key
    assert row["plain_best_s"] <= row["plain_step_s"] and row["coded_best_s"] <= row["coded_step_s"]
    assert math.isclose(row["ratio"], row["coded_step_s"] / row["plain_step_s"])
    assert math.isclose(row["ratio_best"], row["coded_best_s"] / row["plain_best_s"])
    phases = row["phases_s"]
    assert set(phases) == set(zoo.STEP_PHASES)
    assert all(phases[p] > 0 for p in ("encode_s", "worker_s", "decode_s"))
    assert math.isclose(sum(phases.values()), row["coded_mean_s"], rel_tol=1e-9)
