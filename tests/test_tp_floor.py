"""The compute floor of `sazd bench tp`: counters to compute per iteration, floor and ratios, and the
table and report showing them."""

from __future__ import annotations

import pytest

from sazd.bench.tp import floor
from sazd.bench.tp.floor import add_work_ratios, cores, floor_fields, sazd_compute, tp_compute
from sazd.bench.tp.report import markdown, table


def test_sazd_compute_sums_the_workers_alive_throughout_and_the_master():
    before = {0: {"compute_s": 1.0, "updates_applied": 6}, 1: {"compute_s": 2.0, "updates_applied": 6},
              2: {"compute_s": 5.0, "updates_applied": 6}}
    after = {0: {"compute_s": 1.4, "updates_applied": 12}, 1: {"compute_s": 2.2, "updates_applied": 12},
             2: {"compute_s": 0.1, "updates_applied": 1}}  # worker 2 was respawned: left out
    work = sazd_compute(before, after, [0, 1], master_s=[0.01, 0.03])
    assert work["workers_s"] == pytest.approx((0.4 + 0.2) / 2)
    assert work["master_s"] == pytest.approx(0.02)
    assert work["compute_s"] == pytest.approx(0.32)
    assert work["updates"] == {0: 6, 1: 6} and work["counted"] == [0, 1]
    assert work["cpu_s"] is None  # no master CPU given: no CPU figure
    assert sazd_compute(before, after, [], [0.01])["compute_s"] is None
    assert sazd_compute(before, after, [0], [])["compute_s"] is None


def test_sazd_cpu_is_the_workers_process_cpu_and_the_masters_per_iteration():
    before = {0: {"compute_s": 1.0, "updates_applied": 0, "process_s": 10.0},
              1: {"compute_s": 2.0, "updates_applied": 0, "process_s": 20.0}}
    after = {0: {"compute_s": 1.4, "updates_applied": 4, "process_s": 11.0},
             1: {"compute_s": 2.2, "updates_applied": 4, "process_s": 20.6}}
    work = sazd_compute(before, after, [0, 1], master_s=[0.01, 0.03], master_cpu_s=0.8)
    assert work["cpu_s"] == pytest.approx((1.0 + 0.6 + 0.8) / 2)
    assert work["compute_s"] == pytest.approx((0.4 + 0.2) / 2 + 0.02)


def test_cpu_ratio_is_against_the_tp_row_too():
    rows = [{"side": "TP k=4", "compute_per_iteration_s": 0.04, "cpu_per_iteration_s": 0.05},
            {"side": "sazd(6,4)", "compute_per_iteration_s": 0.04, "cpu_per_iteration_s": 0.1},
            {"side": "sazd uncoded", "compute_per_iteration_s": 0.03, "cpu_per_iteration_s": None}]
    add_work_ratios(rows)
    assert [r["cpu_vs_tp"] for r in rows] == [1.0, pytest.approx(2.0), None]
    assert [r["work_vs_tp"] for r in rows] == [1.0, 1.0, pytest.approx(0.75)]


def test_a_worker_respawned_or_dead_in_between_is_not_counted():
    start = {"counters": {0: {}, 1: {}, 2: {}, 3: {}}, "incarnation": [0, 0, 1, 0]}
    end = {"counters": {0: {}, 1: {}, 2: {}}, "incarnation": [0, 1, 1, 0]}  # 1 respawned, 3 dead
    assert floor.alive_throughout(start, end) == [0, 2]


def test_tp_compute_sums_each_ranks_mean_step():
    assert tp_compute([[0.01, 0.03], [0.02, 0.02, 0.02]]) == pytest.approx(0.04)
    assert tp_compute([[0.01], []]) is None
    assert tp_compute([]) is None


def test_floor_is_compute_over_cores_and_the_median_over_it():
    fields = floor_fields(0.08, 4, p50_s=0.05)
    assert fields == {"compute_per_iteration_s": 0.08, "cores": 4, "floor_s": pytest.approx(0.02),
                      "over_floor": pytest.approx(2.5)}
    assert floor_fields(None, 2, 0.05)["floor_s"] is None
    assert floor_fields(0.0, 2, 0.05)["over_floor"] is None
    assert floor_fields(0.08, 4, None)["over_floor"] is None
    with pytest.raises(ValueError, match="cores"):
        floor_fields(0.08, 0, 0.05)
    assert cores() >= 1


def test_work_ratio_is_against_the_tp_row_of_the_phase():
    rows = [{"side": "TP k=4", "compute_per_iteration_s": 0.04},
            {"side": "sazd(6,4)", "compute_per_iteration_s": 0.07},
            {"side": "sazd uncoded", "compute_per_iteration_s": None}]
    add_work_ratios(rows)
    assert [r["work_vs_tp"] for r in rows] == [1.0, pytest.approx(1.75), None]
    lone = [{"side": "sazd(6,4)", "compute_per_iteration_s": 0.07}]
    add_work_ratios(lone)
    assert lone[0]["work_vs_tp"] is None


def _row(side: str, p50: float, compute: float) -> dict:
    return {"side": side, "workers": 4, "p50_s": p50, "p95_s": p50, "cost_worker_s": 4 * p50, "slowed": {},
            "repairs": 0, "neighbour": None, "stopped": None, "profile": {}, **floor_fields(compute, 2, p50)}


def test_table_and_report_show_work_floor_and_ratios():
    rows = [_row("TP k=4", 0.030, 0.040), _row("sazd(6,4)", 0.050, 0.070)]
    add_work_ratios(rows)
    phases = [{"straggler": {"kind": "none"}, "sweep": "factor", "x": 1.0, "rows": rows}]
    text = table(phases)
    head = text.splitlines()[0]
    assert "work ms" in head and "floor ms" in head and "p50 / floor" in head and "work / TP" in head
    assert "| 70.0 | 35.0 | 1.43 | 1.75 |" in text  # sazd: 70 ms of work on 2 cores, 50 ms median
    result = {"title": "t", "command": "c", "machine": "m", "uptime_before": "1", "uptime_after": "1",
              "straggler_note": "s", "phases": phases, "sweeps": {}, "cores": 2, "floor_note": "the floor"}
    assert "Compute floor (2 cores): the floor" in markdown(result)
