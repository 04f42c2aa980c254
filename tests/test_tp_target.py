"""Time to a target in `sazd bench tp`: when a phase reaches it, the seconds summed from the measured
steps, "not reached" said as such, both sides evaluating the same model alike, and bad flags refused."""

from __future__ import annotations

import json
import math

import pytest

from sazd.bench.tp.report import sweeps, table, to_target
from sazd.bench.tp.target import Schedule, Target, time_to_target
from sazd.cli import main


def test_a_target_is_reached_at_the_first_evaluation_that_meets_it():
    acc = Target("accuracy", 0.75, every=5, max_steps=12)
    assert acc.reached(0.75) and not acc.reached(0.7499)
    assert [s for s in range(1, 13) if acc.evaluates_at(s)] == [5, 10, 12]  # and after the last step
    assert acc.first_reached([(5, 0.6), (10, 0.8), (12, 0.7)]) == 10
    assert acc.first_reached([(5, 0.6), (10, 0.7)]) is None
    loss = Target("loss", 2.5, every=1, max_steps=3)
    assert loss.reached(2.4) and not loss.reached(2.6)
    assert loss.first_reached([(1, 3.0), (2, 2.5)]) == 2


def test_time_to_target_sums_the_steps_up_to_it():
    steps = [0.5, 0.1, 0.2, 0.4]
    assert time_to_target(steps, 3) == pytest.approx(0.8)
    assert time_to_target(steps, None) is None
    with pytest.raises(ValueError, match="not measured"):
        time_to_target(steps, 5)


def test_schedule_stops_once_reached_and_the_measured_steps_ran():
    schedule = Schedule(Target("accuracy", 0.5, every=2, max_steps=20), min_steps=6)
    stopped = None
    for step in range(1, 21):
        if schedule.evaluates(step):
            schedule.record(step, loss=1.0, accuracy=0.1 * step)  # 0.5 first met at step 5: evaluated at 6
        if schedule.done(step):
            stopped = step
            break
    assert schedule.evals == [(2, 0.2), (4, 0.4), (6, pytest.approx(0.6))]
    assert schedule.reached_at == 6 and stopped == 6
    late = Schedule(Target("accuracy", 0.5, every=2, max_steps=20), min_steps=10)
    late.record(2, loss=1.0, accuracy=0.9)
    assert late.reached_at == 2 and not late.evaluates(4) and not late.done(9) and late.done(10)
    plain = Schedule(None, min_steps=4)
    assert not plain.evaluates(4) and not plain.done(100)


@pytest.mark.parametrize("metric, value", [("accuracy", 0.0), ("accuracy", 1.5), ("accuracy", math.nan),
                                           ("loss", -1.0), ("loss", math.inf)])
def test_a_target_out_of_range_is_refused(metric, value):
    with pytest.raises(ValueError, match="--target"):
        Target(metric, value, every=1, max_steps=1)


def _row(side: str, step_s: list[float], evals: list, reached: int | None, stopped: str | None = None
         ) -> dict:
    return {"side": side, "workers": 2, "p50_s": 0.01, "p95_s": 0.01, "cost_worker_s": 0.02, "slowed": {},
            "repairs": 0, "neighbour": None, "stopped": stopped, "step_s": step_s, "evals": evals,
            "steps_to_target": reached, "time_to_target_s": time_to_target(step_s, reached)}


def test_table_and_sweep_show_the_time_to_target_and_what_was_not_reached():
    target = {"metric": "accuracy", "value": 0.75}
    phases = [{"straggler": {"kind": "none"}, "sweep": "factor", "x": 1.0,
               "rows": [_row("TP k=2", [0.1] * 4, [[2, 0.5], [4, 0.8]], 4),
                        _row("sazd(4,2)", [0.2] * 4, [[2, 0.5], [4, 0.8]], 4)]},
              {"straggler": {"kind": "slow", "worker": 1, "factor": 4.0}, "sweep": "factor", "x": 4.0,
               "rows": [_row("TP k=2", [0.4] * 4, [[2, 0.5], [4, 0.8]], 4),
                        _row("sazd(4,2)", [0.1] * 4, [[2, 0.5], [4, 0.8]], 4)]},
              {"straggler": {"kind": "slow", "worker": 1, "factor": 10.0}, "sweep": "factor", "x": 10.0,
               "rows": [_row("TP k=2", [0.5] * 4, [[2, 0.5], [4, 0.6]], None),
                        _row("sazd(4,2)", [0.1] * 4, [[2, 0.5], [4, 0.8]], 4)]}]
    text = table(phases, target)
    assert "to accuracy 0.75" in text.splitlines()[0]
    assert "| 0.80 s (4 steps) | 2.00 |" in text  # sazd's 4 x 0.2 s against TP's 4 x 0.1 s
    assert "| not reached in 4 steps | - |" in text
    assert to_target(_row("TP k=2", [0.1] * 3, [[3, 0.1]], None, stopped="rank 1 died")) == \
        "not reached in 3 steps (stopped)"
    assert "to accuracy" not in table(phases)  # no target, no column
    sweep = sweeps(phases)["factor"]
    assert sweep["time_to_target_s"] == {"TP k=2": pytest.approx([0.4, 1.6, None]),
                                         "sazd(4,2)": pytest.approx([0.8, 0.4, 0.4])}
    # sazd 0.4 s slower at factor 1, 1.2 s faster at 4: they cross at 1 + 3 x 0.4 / 1.6
    assert sweep["crossover_time_to_target"] == {"sazd(4,2)": pytest.approx(1.75)}


@pytest.mark.slow
def test_quick_run_times_each_side_to_the_target_from_its_own_steps(tmp_path, ray_session):
    out = tmp_path / "out"
    assert main(["bench", "tp", "--quick", "--target", "0.15", "--eval-every", "2", "--out", str(out)]) == 0
    result = json.loads((out / "tp-results.json").read_text())
    assert result["target"] == {"metric": "accuracy", "value": 0.15, "every": 2, "max_steps": 300,
                                "eval_limit": 256}
    rows = [row for phase in result["phases"] for row in phase["rows"]]
    first = rows[0]["evals"]
    for row in rows:
        assert row["stopped"] is None and len(row["iteration_s"]) == 3
        steps = row["steps_to_target"]
        assert steps == next(s for s, acc in row["evals"] if acc >= 0.15)  # the first evaluation that met it
        assert row["time_to_target_s"] == pytest.approx(sum(row["step_s"][:steps]))
        assert len(row["step_s"]) == max(steps, 4)  # stopped there, after the 1 + 3 steps of every phase
        # both sides train the same model from the seed in every phase: the same evaluations
        assert [s for s, _ in row["evals"]] == [s for s, _ in first]
        assert [acc for _, acc in row["evals"]] == pytest.approx([acc for _, acc in first], abs=2 / 256)
    assert set(result["sweeps"]["factor"]["crossover_time_to_target"]) == {"sazd(4,2)", "sazd uncoded"}
    assert "| to accuracy 0.15 |" in (out / "tp-report.md").read_text()
    assert (out / "tp-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_target_out_of_reach_is_not_reached_on_either_side(ray_session):
    from sazd.bench.tp.sides import SazdSide, TPSide, Workload
    from sazd.stragglers import NoStraggler

    work = Workload(model="mlp", hidden=(64, 64), dataset="synthetic", train_limit=256, batch_size=32,
                    warmup=1, iterations=2, target=Target("accuracy", 1.0, every=2, max_steps=5))
    for side in (TPSide(2, timeout_s=240), SazdSide("sazd", 3, 2)):
        (row,) = side.run(work, [NoStraggler()])
        assert row.stopped is None and len(row.step_s) == 5  # up to --max-steps, then given up
        assert [s for s, _ in row.evals] == [2, 4, 5] and all(acc < 1.0 for _, acc in row.evals)
        assert row.steps_to_target is None and row.time_to_target is None
        assert to_target(row.to_dict()) == "not reached in 5 steps"


@pytest.mark.parametrize("flags, words", [
    (["--target", "1.5"], "--target"), (["--target", "0"], "--target"), (["--target", "nan"], "--target"),
    (["--target", "x"], "--target"), (["--model", "gpt", "--target", "-2"], "--target"),
    (["--target", "0.7", "--eval-every", "0"], "--eval-every"),
    (["--target", "0.7", "--max-steps", "5"], "--max-steps"),
    (["--target", "0.7", "--eval-limit", "0"], "--eval-limit"),
    (["--eval-every", "5"], "--target"), (["--max-steps", "50"], "--target"),
])
def test_bad_target_flags_one_line_exit_2(flags, words, capsys):
    try:
        status = main(["bench", "tp", *flags])
    except SystemExit as exit_:  # refused by the argument parser
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
