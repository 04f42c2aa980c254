"""The straggler mechanisms that TP and sazd share (sazd.stragglers) and the random latency models."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sazd.runtime.latency import Pareto, SlowCalls, parse_latency
from sazd.stragglers import (
    DeadWorker,
    NoisyNeighbour,
    NoStraggler,
    RandomDelays,
    Recorder,
    SlowWorker,
    cgroup_dir,
    from_dict,
    straggle,
)

ALL = [NoStraggler(), SlowWorker(2, 3.0), RandomDelays("calls", {"prob": 0.3, "factor": 4.0}, seed=5),
       RandomDelays("shiftexp", {"shift": 1.0, "rate": 2.0}, seed=1), RandomDelays("pareto", {"alpha": 1.5}),
       DeadWorker(1, 4), NoisyNeighbour(0, 0.25)]


def test_pareto_is_seeded_heavy_tailed_and_at_least_one():
    a, b = Pareto(alpha=1.5, seed=3), Pareto(alpha=1.5, seed=3)
    draws = [a.slowdown(w, t) for w in range(3) for t in range(2000)]
    assert draws == [b.slowdown(w, t) for w in range(3) for t in range(2000)]
    assert min(draws) >= 1.0
    # P(factor > 10) = 10^-1.5 ~ 3.2 %: a tail an exponential of the same median would not have
    share = sum(d > 10 for d in draws) / len(draws)
    assert 0.015 < share < 0.05
    assert Pareto(alpha=1.5, seed=4).slowdown(0, 0) != a.slowdown(0, 0)


def test_slow_calls_hit_the_asked_share_of_calls():
    model = SlowCalls(prob=0.25, factor=5.0, seed=0)
    draws = [model.slowdown(w, t) for w in range(4) for t in range(2000)]
    assert set(draws) == {1.0, 5.0}
    assert 0.22 < draws.count(5.0) / len(draws) < 0.28
    assert all(SlowCalls(prob=0.0, factor=5.0).slowdown(0, t) == 1.0 for t in range(100))


@pytest.mark.parametrize("spec, cls", [("pareto:2", Pareto), ("slowcalls:0.5:3", SlowCalls)])
def test_new_latency_specs_parse(spec, cls):
    assert isinstance(parse_latency(spec, seed=1), cls)


@pytest.mark.parametrize("spec", ["pareto:0", "pareto:-1", "pareto", "slowcalls:1.5:3", "slowcalls:0.5:0.5",
                                  "slowcalls:0.5", "slowcalls:x:2"])
def test_bad_latency_specs_are_refused(spec):
    with pytest.raises(ValueError, match="latency spec"):
        parse_latency(spec)


@pytest.mark.parametrize("straggler", ALL, ids=lambda s: s.kind)
def test_every_straggler_survives_the_trip_to_a_rank(straggler):
    again = from_dict(straggler.to_dict())
    assert again == straggler
    a, b = straggler.latency().bind(4), again.latency().bind(4)
    # the TP rank rebuilds the model from JSON: the same factors and deaths for every (worker, call)
    assert [a.slowdown(w, t) for w in range(4) for t in range(50)] == \
        [b.slowdown(w, t) for w in range(4) for t in range(50)]
    pairs = [(w, t) for w in range(4) for t in range(50)]
    assert [a.fails(*wt) for wt in pairs] == [b.fails(*wt) for wt in pairs]


@pytest.mark.parametrize("spec", [{}, {"kind": "meteor"}, {"kind": "slow", "worker": 1}, {"kind": "slow",
                         "worker": -1, "factor": 2.0}, {"kind": "slow", "worker": 1, "factor": 0.5},
                         {"kind": "random", "model": "gamma"}, {"kind": "random", "model": "pareto",
                         "options": {"beta": 1}}, {"kind": "noisy", "worker": 0, "share": 0},
                         {"kind": "dead", "worker": 0, "after": -1}, ["slow"]])
def test_hostile_straggler_dicts_are_refused(spec):
    with pytest.raises(ValueError):
        from_dict(spec)


def test_recorder_counts_exactly_the_named_worker():
    recorder = Recorder(SlowWorker(2, 3.0).latency()).bind(5)
    factors = {(w, t): recorder.slowdown(w, t) for w in range(5) for t in range(10)}
    assert dict(recorder.slowed) == {2: 10}
    assert dict(recorder.extra) == {2: 20.0}
    assert all(f == (3.0 if w == 2 else 1.0) for (w, _), f in factors.items())
    dead = Recorder(DeadWorker(1, 4).latency()).bind(3)
    assert [(w, t) for w in range(3) for t in range(6) if dead.fails(w, t)] == [(1, 4), (1, 5)]
    assert not dead.fails(1, 5, incarnation=1)  # the repaired worker is a new machine


def test_recorder_counts_calls_from_the_phase_start():
    model = RandomDelays("calls", {"prob": 0.5, "factor": 3.0}, seed=2).latency()
    recorder = Recorder(model, start={0: 40, 1: 7})
    # worker 0's task 40 is the phase's call 0: the draw a TP rank makes at its step 0
    assert [recorder.slowdown(0, 40 + t) for t in range(20)] == [model.slowdown(0, t) for t in range(20)]
    assert [recorder.slowdown(1, 7 + t) for t in range(20)] == [model.slowdown(1, t) for t in range(20)]
    dead = Recorder(DeadWorker(1, 2).latency(), start={1: 7})
    assert [t for t in range(7, 12) if dead.fails(1, t)] == [9, 10, 11]
    assert Recorder(SlowWorker(1, 2.0).latency(), start={1: 7}).slowdown(1, 3) == 2.0  # respawned: from 0


def test_straggle_sleeps_factor_minus_one_times_the_compute():
    assert straggle(1.0, 0.5) == 0.0
    assert straggle(3.0, 0.01) == pytest.approx(0.02)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="factor"):
            straggle(bad, 0.01)


def _spinning() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"],
                            stdin=subprocess.DEVNULL)


def test_noisy_neighbour_by_cgroup_holds_exactly_the_named_process():
    if cgroup_dir() is None:
        pytest.skip("no cgroup CPU controller this process may write (needs root); the busy-process test "
                    "covers the fallback")
    target, other = _spinning(), _spinning()
    try:
        neighbour = NoisyNeighbour(1, share=0.25)
        with neighbour.around({0: other.pid, 1: target.pid}) as done:
            assert done is not None and done.cgroup is not None and "25%" in done.method
            procs = (done.cgroup / "cgroup.procs").read_text().split()
            assert procs == [str(target.pid)]
            quota = done.cgroup / "cpu.cfs_quota_us"
            if quota.exists():
                assert int(quota.read_text()) == 25_000
        assert not done.cgroup.exists()  # removed afterwards, the process back in its parent group
        with NoisyNeighbour(3).around({0: other.pid}) as nothing:  # worker 3 is not among them
            assert nothing is None
    finally:
        for p in (target, other):
            p.kill()
            p.wait(timeout=10)


def test_noisy_neighbour_by_busy_process_shares_the_named_core():
    target = _spinning()
    try:
        with NoisyNeighbour(0).attach(target.pid, prefer_cgroup=False) as done:
            assert done.busy_pid is not None and "busy process" in done.method
            assert os.sched_getaffinity(done.busy_pid) == os.sched_getaffinity(target.pid) == {done.core}
            busy = done.busy_pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(busy):
            time.sleep(0.05)
        assert not _alive(busy)
    finally:
        target.kill()
        target.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
