"""In-process cluster: first-k under simulated latency, ordering, erasures, counters, network model."""

from __future__ import annotations

import time

import pytest
import torch

from sazd.parallel.context import PreferredWait
from sazd.runtime import (
    ClusterError,
    Combined,
    DeadWorkers,
    FixedStragglers,
    InProcessCluster,
    LatencyModel,
    NoDelay,
    SGDStep,
    ShiftedExponential,
    make_cluster,
    parse_latency,
    straggler_latency,
)
from sazd.runtime.cluster import Answers, Broadcast, PerWorker, choose_ready
from sazd.runtime.worker import Worker

N, K, ROWS, COLS, BATCH = 6, 4, 8, 5, 3


def loaded_cluster(**opts) -> tuple[InProcessCluster, list[torch.Tensor]]:
    cluster = InProcessCluster(N, **opts)
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64) for _ in range(N)]
    cluster.wait_all(cluster.submit("load", [({"w": b},) for b in blocks]))
    return cluster, blocks


def training_loop(cluster: InProcessCluster, steps: int, k: int) -> float:
    """Rounds as the trainer runs them: compute on ready workers, first k, updates to every live one."""
    x = torch.ones(COLS, BATCH, dtype=torch.float64)
    left, right = torch.ones(ROWS, 1, dtype=torch.float64), torch.ones(1, COLS, dtype=torch.float64)
    start = cluster.clock
    for _ in range(steps):
        cluster.first_k(cluster.submit("matmul", ("w", x), cluster.ready_workers(k)), k)
        cluster.submit("sgd", ([("w", SGDStep(lr=1e-3), left.T, right)],))
    return cluster.clock - start


def test_first_k_picks_fast_workers_and_results_are_real():
    cluster, blocks = loaded_cluster(latency=FixedStragglers(count=2, factor=5), base_time_s=0.01)
    x = torch.randn(COLS, BATCH, dtype=torch.float64)
    got = cluster.first_k(cluster.submit("matmul", ("w", x)), K)
    assert sorted(got) == [2, 3, 4, 5]  # the first S=2 ids are the stragglers
    for j, y in got.items():
        torch.testing.assert_close(y, blocks[j] @ x, rtol=0, atol=0)
    assert cluster.counters.late_results_discarded == 2


def test_stragglers_within_n_minus_k_cost_nothing_but_uncoded_pays():
    def sim_time(n: int, k: int, stragglers: int) -> float:
        cluster = InProcessCluster(n, latency=straggler_latency(stragglers, 5.0), base_time_s=0.01)
        cluster.wait_all(cluster.submit("load", ({"w": torch.zeros(ROWS, COLS, dtype=torch.float64)},)))
        return training_loop(cluster, steps=20, k=k)

    clean, coded = sim_time(6, 4, 0), sim_time(6, 4, 2)
    assert coded <= 1.2 * clean
    uncoded_clean, uncoded = sim_time(4, 4, 0), sim_time(4, 4, 2)
    assert uncoded >= 3 * uncoded_clean


def test_straggler_applies_every_update_in_order():
    cluster, blocks = loaded_cluster(latency=FixedStragglers([0], factor=50), base_time_s=0.01)
    step = SGDStep(lr=0.1, momentum=0.9)
    x = torch.randn(COLS, BATCH, dtype=torch.float64)
    expected, buf = blocks[0].clone(), None
    for t in range(5):
        left = torch.full((ROWS, 1), float(t + 1), dtype=torch.float64)
        right = torch.arange(COLS, dtype=torch.float64).reshape(1, COLS) * (t - 2)
        cluster.first_k(cluster.submit("matmul", ("w", x)), K)  # worker 0 is always late
        cluster.submit("sgd", ([("w", step, left.T, right)],))
        grad = left @ right
        buf = grad.clone() if buf is None else buf.mul_(0.9).add_(grad)
        expected -= 0.1 * buf
    assert cluster.clock < cluster.busy_until(0)  # still behind, but consistent
    state = cluster.wait_all(cluster.submit("state", (), [0]))[0]
    torch.testing.assert_close(state["weights"]["w"], expected, rtol=1e-12, atol=1e-12)
    assert cluster.workers[0].updates_applied == 5


def test_dead_worker_is_an_erasure():
    cluster, blocks = loaded_cluster(latency=DeadWorkers([1], after_calls=1), base_time_s=0.01)
    x = torch.randn(COLS, BATCH, dtype=torch.float64)
    got = cluster.first_k(cluster.submit("matmul", ("w", x)), K)
    assert 1 not in got and len(got) == K
    assert cluster.alive() == [0, 2, 3, 4, 5]
    assert cluster.counters.failed_results == 1
    cluster.respawn(1)  # a respawned worker is a new machine: healthy, empty
    assert cluster.alive() == list(range(N))
    assert cluster.wait_all(cluster.submit("state", (), [1]))[1]["weights"] == {}
    cluster.wait_all(cluster.submit("load", ({"w": blocks[1]},), [1]))
    got = cluster.first_k(cluster.submit("matmul", ("w", x), [1]), 1)
    torch.testing.assert_close(got[1], blocks[1] @ x)


def test_several_workers_respawn_together_each_fresh_and_ids_are_checked():
    cluster, _ = loaded_cluster(base_time_s=0.01)
    cluster.kill(2)
    cluster.respawn(2, 4)  # a live one is replaced too
    assert cluster.alive() == list(range(N)) and cluster.counters.respawns == 2
    states = cluster.wait_all(cluster.submit("state", (), [2, 4]))
    assert states[2]["weights"] == states[4]["weights"] == {}
    for bad in ((1, 1), (N,), (-1,)):
        with pytest.raises(ValueError, match="distinct ids"):
            cluster.respawn(*bad)
    cluster.respawn()  # nothing to do
    assert cluster.counters.respawns == 2


def test_kill_fails_in_flight_calls():
    cluster, _ = loaded_cluster(base_time_s=0.01)
    round_ = cluster.submit("matmul", ("w", torch.ones(COLS, 1, dtype=torch.float64)))
    cluster.kill(2)
    cluster.kill(4)
    got = cluster.first_k(round_, K)
    assert sorted(got) == [0, 1, 3, 5]
    assert cluster.counters.failed_results == 2


def test_too_many_dead_raises_cluster_error():
    cluster, _ = loaded_cluster(latency="dead:0,1,2", base_time_s=0.01)
    with pytest.raises(ClusterError, match=r"needed 4 answers.*3 of n=6 workers alive"):
        cluster.first_k(cluster.submit("matmul", ("w", torch.ones(COLS, 1, dtype=torch.float64))), K)


def test_enough_predicate_replaces_count():
    cluster, _ = loaded_cluster(latency=FixedStragglers([0, 1], factor=3), base_time_s=0.01)
    # e.g. replication: needs worker 0 or 1 among the answers, whatever the count
    got = cluster.first_k(cluster.submit("ping", ()), K, enough=lambda ws: 0 in ws or 1 in ws)
    assert 0 in got and len(got) == 5
    assert cluster.clock == pytest.approx(0.03 + 0.03)  # the straggler's load, then its ping


def test_byte_counters_are_exact():
    cluster = InProcessCluster(N, latency=FixedStragglers(count=2, factor=5), base_time_s=0.01)
    blocks = [torch.zeros(10, 4, dtype=torch.float32) for _ in range(N)]  # 160 bytes each
    cluster.wait_all(cluster.submit("load", [({"w": b},) for b in blocks]))
    assert cluster.counters.bytes_to_workers == N * 160
    assert cluster.counters.bytes_from_workers == 0  # load answers an int
    x = torch.zeros(4, 3, dtype=torch.float32)  # 48 bytes, broadcast: counted once per worker
    cluster.first_k(cluster.submit("matmul", ("w", x)), K)
    assert cluster.counters.bytes_to_workers == N * 160 + N * 48
    assert cluster.counters.bytes_from_workers == K * 10 * 3 * 4  # late answers are not fetched
    assert cluster.counters.calls == 2 * N and cluster.counters.rounds == 2


def test_a_tensor_leaves_the_master_once_while_it_lives_unmodified():
    cluster, _ = loaded_cluster()
    once = cluster.counters.bytes_sent_once
    assert once == N * ROWS * COLS * 8  # n distinct blocks
    x = torch.randn(COLS, BATCH, dtype=torch.float64)
    cluster.wait_all(cluster.submit("matmul", ("w", x), [0, 1]))  # broadcast: once
    cluster.wait_all(cluster.submit("matmul", [("w", x)] * N, [2, 3]))  # same tensor per worker: 0
    assert cluster.counters.bytes_sent_once == once + x.numel() * 8
    x.mul_(2)  # modified in place: it must leave again
    got = cluster.wait_all(cluster.submit("matmul", ("w", x), [4]))
    assert cluster.counters.bytes_sent_once == once + 2 * x.numel() * 8
    torch.testing.assert_close(got[4], cluster.workers[4].weights["w"] @ x)
    y = x.clone()  # equal values, another tensor: sent
    cluster.wait_all(cluster.submit("matmul", ("w", y), [5]))
    assert cluster.counters.bytes_sent_once == once + 3 * x.numel() * 8
    assert cluster.counters.bytes_to_workers == N * ROWS * COLS * 8 + 6 * x.numel() * 8  # per worker


def test_network_model_adds_bytes_over_bandwidth():
    cluster = InProcessCluster(1, network_gbps=1.0, base_time_s=0.0)
    x = torch.zeros(1000, 1000, dtype=torch.float32)  # 4e6 bytes
    cluster.wait_all(cluster.submit("load", ({"w": x},)))
    assert cluster.clock == pytest.approx(4e6 / 1.25e8)
    start = cluster.clock
    cluster.first_k(cluster.submit("matmul", ("w", x[:, :10])), 1)  # in 40 kB, out 40 kB
    assert cluster.clock - start == pytest.approx(2 * 4e4 / 1.25e8)
    # a broadcast to n workers crosses the master's link n times
    wide = InProcessCluster(3, network_gbps=1.0, base_time_s=0.0)
    wide.wait_all(wide.submit("load", ({"w": x},)))
    assert wide.clock == pytest.approx(3 * 4e6 / 1.25e8)


def test_ready_workers_skips_laggards_and_tops_up():
    cluster, _ = loaded_cluster(latency=FixedStragglers([0, 1], factor=10), base_time_s=0.01)
    cluster.first_k(cluster.submit("ping", ()), K)
    # k idle ones: one worker a call behind is asked too (tie: lower id), so a stall within the
    # round is never waited for; topping up to 5 asks both
    assert cluster.ready_workers(K) == [0, 2, 3, 4, 5]
    assert cluster.ready_workers(5) == [0, 1, 2, 3, 4, 5]
    cluster.first_k(cluster.submit("ping", (), [0, 2, 3, 4, 5]), K)
    assert cluster.ready_workers(K) == [1, 2, 3, 4, 5]  # worker 0, two calls behind, gets no more
    cluster.note_master_time(1.0)
    assert cluster.ready_workers(K) == list(range(N))  # caught up


@pytest.mark.parametrize(("behind", "k", "in_line", "asked"), [
    ({0: (0, 0.0), 1: (0, 0.0), 2: (0, 0.0)}, 2, [], [0, 1, 2]),  # every idle one
    ({0: (0, 0.0), 1: (0, 0.0), 2: (1, 0.5), 3: (1, 0.2)}, 2, [2, 3], [0, 1, 3]),  # in line: soonest done
    ({0: (0, 0.0), 1: (0, 0.0), 2: (1, 0.5), 3: (1, 0.2)}, 2, [2], [0, 1, 2]),  # 3 is stuck, not late
    ({0: (0, 0.0), 1: (0, 0.0), 2: (2, 0.1)}, 2, [], [0, 1]),  # further behind: left alone
    ({0: (0, 0.0), 1: (3, 0.1), 2: (2, 0.9)}, 2, [], [0, 2]),  # too few idle: the fewest calls behind
    ({0: (0, 0.0), 1: (1, 0.9), 2: (1, 0.9)}, 1, [1, 2], [0, 1]),
    ({0: (0, 0.0), 1: (0, 0.0), 2: (0, 0.0), 3: (1, 0.1)}, 2, [3], [0, 1, 2]),  # a spare already idle
])
def test_a_round_asks_one_more_than_k_where_a_worker_one_call_behind_can_take_it(behind, k, in_line, asked):
    assert choose_ready(behind, k, in_line) == asked


def test_backlog_beyond_limit_kills_the_worker():
    cluster, _ = loaded_cluster(latency=FixedStragglers([5], factor=100), base_time_s=0.01, max_backlog=3)
    for _ in range(4):
        cluster.first_k(cluster.submit("ping", ()), K)
    assert 5 in cluster.alive()  # 3 pings still queued: at the limit
    cluster.first_k(cluster.submit("ping", ()), K)  # 4 queued when this round is sent: over it
    assert 5 not in cluster.alive()
    assert cluster.counters.backlog_kills == 1


def test_simulated_time_is_measured_when_no_base_time():
    # factor 100: a healthy worker's first call of a round can measure several times its usual time
    cluster, _ = loaded_cluster(latency=FixedStragglers(count=2, factor=100))
    big = torch.randn(COLS, 20000, dtype=torch.float64)
    cluster.first_k(cluster.submit("matmul", ("w", big)), K)
    assert cluster.clock > 0
    assert cluster.busy_until(0) > cluster.clock  # a straggler finishes after the k-th answer


def test_errors_are_clear():
    with pytest.raises(ValueError, match="n must be"):
        InProcessCluster(0)
    cluster, _ = loaded_cluster()
    with pytest.raises(ValueError, match="not a public Worker method"):
        cluster.submit("_timed", ())
    with pytest.raises(ValueError, match="per-worker list has 2 entries"):
        cluster.submit("ping", [(), ()])
    with pytest.raises(ValueError, match="workers must be distinct"):
        cluster.submit("ping", (), [0, 0])
    with pytest.raises(KeyError, match="holds no block"):
        cluster.submit("matmul", ("nope", torch.ones(1)))
    for nice in (0, 20, -5, 1.5, True, "19"):  # refused before anything changes
        with pytest.raises(ValueError, match=r"integer in 1\.\.19"):
            cluster.submit("lower_cpu_priority", (nice,))
    cluster.spare([4, 5])  # in-process: nothing to lower, the ids are still checked
    with pytest.raises(ValueError, match="distinct ids"):
        cluster.spare([6])
    round_ = cluster.submit("ping", ())
    cluster.wait_all(round_)
    with pytest.raises(ValueError, match="already gathered"):
        cluster.wait_all(round_)
    cluster.close()
    with pytest.raises(ClusterError, match="closed"):
        cluster.submit("ping", ())
    with pytest.raises(ValueError, match="backend must be"):
        make_cluster("mpi", 3)


def test_make_cluster_inproc():
    cluster = make_cluster("inproc", 3, latency="fixed:1:2", base_time_s=0.5, network_gbps=10)
    cluster.first_k(cluster.submit("ping", ()), 2)
    assert cluster.clock == pytest.approx(0.5)
    info = cluster.describe()
    assert info["latency"] == "fixed stragglers [0] x2" and info["network_gbps"] == pytest.approx(10)


# ------------------------------------------------------------------ latency models
def test_parse_latency_specs():
    assert isinstance(parse_latency("none"), NoDelay)
    fixed = parse_latency("fixed:2:5").bind(6)
    assert fixed.slow_workers() == [0, 1] and fixed.slowdown(1, 7) == 5 and fixed.slowdown(2, 0) == 1
    shift = parse_latency("shiftexp:2:1.5", seed=3)
    assert isinstance(shift, ShiftedExponential) and shift.rate == 2 and shift.shift == 1.5
    dead = parse_latency("dead:0,3:2")
    assert dead.fails(3, 2) and not dead.fails(3, 1) and not dead.fails(1, 5) and not dead.fails(3, 2, 1)
    both = parse_latency("fixed:1:3+dead:2").bind(4)
    assert isinstance(both, Combined) and both.slowdown(0, 0) == 3 and both.fails(2, 0)
    for bad in ["fixed:2", "slow:1", "fixed:a:2", "fixed:1:0.5", "shiftexp:-1", "dead:1,1"]:
        with pytest.raises(ValueError, match="latency spec"):
            parse_latency(bad)
    with pytest.raises(ValueError, match="exceeds the number of workers"):
        parse_latency("fixed:7:2").bind(6)


def test_shifted_exponential_is_seeded_and_order_free():
    a, b = ShiftedExponential(rate=2.0, seed=1), ShiftedExponential(rate=2.0, seed=1)
    forward = [a.slowdown(w, t) for w in range(3) for t in range(50)]
    backward = [b.slowdown(w, t) for w in reversed(range(3)) for t in reversed(range(50))]
    assert forward == list(reversed(backward))
    assert min(forward) >= 1.0 and len(set(forward)) == len(forward)
    other = ShiftedExponential(rate=2.0, seed=2)
    assert forward != [other.slowdown(w, t) for w in range(3) for t in range(50)]
    mean = sum(ShiftedExponential(rate=2.0, seed=0).slowdown(0, t) for t in range(4000)) / 4000
    assert mean == pytest.approx(1.5, rel=0.1)


def test_straggler_latency_helper():
    assert isinstance(straggler_latency(0, 5.0), NoDelay)
    model = straggler_latency(2, 3.0, spec="dead:5").bind(6)
    assert model.slowdown(0, 0) == 3 and model.slowdown(2, 0) == 1 and model.fails(5, 0)
    with pytest.raises(ValueError, match="--stragglers"):
        straggler_latency(-1, 5.0)


@pytest.mark.parametrize("step", [
    SGDStep(lr=0.1),
    SGDStep(lr=0.1, weight_decay=0.01),
    SGDStep(lr=0.1, momentum=0.9),
    SGDStep(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    SGDStep(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
])
def test_sgd_from_factors_equals_torch_sgd(step):
    """Three steps of Worker.sgd (gradient formed inside the update, or sent whole) == torch.optim.SGD."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
    worker, param = Worker(0), torch.nn.Parameter(w0.clone())
    worker.load({"w": w0, "v": w0 * 2})
    twin = torch.nn.Parameter(w0 * 2)
    opt = torch.optim.SGD([param, twin], lr=step.lr, momentum=step.momentum, dampening=step.dampening,
                          nesterov=step.nesterov, weight_decay=step.weight_decay)
    for t in range(3):
        left = torch.randn(ROWS, BATCH, generator=gen, dtype=torch.float64)
        inputs = torch.randn(COLS, BATCH, generator=gen, dtype=torch.float64)
        if t == 1:  # the block's last input, kept by the worker
            worker.matmul("w", inputs)
        factored = ("w", step, left.T, None if t == 1 else inputs.T)  # both as rows
        assert worker.sgd([factored, ("v", step, left @ inputs.T)]) == 2 * (t + 1)
        param.grad = twin.grad = left @ inputs.T
        opt.step()
    torch.testing.assert_close(worker.weights["w"], param.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(worker.weights["v"], twin.detach(), rtol=1e-12, atol=1e-12)


def test_compute_asks_every_live_worker_again_when_a_worker_of_the_round_dies():
    """The one retry policy: the round asks the ready workers (straggler 0, one call behind, with
    them; straggler 1 is left out); workers 2 and 3 die in it, so three answers are not enough and
    every live worker is asked once more."""
    latency = Combined([FixedStragglers([0, 1], factor=10), DeadWorkers([2, 3], after_calls=2)])
    cluster, blocks = loaded_cluster(latency=latency, base_time_s=0.01)
    cluster.first_k(cluster.submit("ping", Broadcast(())), K)
    x = torch.ones(COLS, BATCH, dtype=torch.float64)
    assert cluster.ready_workers(K) == [0, 2, 3, 4, 5]
    answers = cluster.compute("matmul", Broadcast(("w", x)), K)
    assert answers.workers == frozenset({0, 1, 4, 5}) and len(answers.results) == K
    assert all(torch.equal(r, blocks[j] @ x) for j, r in answers.results.items())
    cluster.kill(4)
    with pytest.raises(ClusterError, match="needed 4 answers"):
        cluster.compute("matmul", Broadcast(("w", x)), K)


def test_master_time_is_measured_noted_or_ignored_by_the_cluster_alone():
    slept = 0.05
    clocks = {}
    for mode in ("measured", "explicit", "ignored"):
        cluster = InProcessCluster(2, base_time_s=0.0, master_time=mode)
        cluster.first_k(cluster.submit("ping", Broadcast(())), 1)
        time.sleep(slept)  # master work between two calls
        cluster.first_k(cluster.submit("ping", Broadcast(())), 1)
        cluster.note_master_time(1000.0)  # counts in "explicit" mode only: no double counting
        clocks[mode] = cluster.clock
    assert slept <= clocks["measured"] < 1000.0
    assert clocks["explicit"] == 1000.0 and clocks["ignored"] == 0.0
    with pytest.raises(ValueError, match="master_time"):
        InProcessCluster(2, master_time="sometimes")


def test_per_worker_arguments_are_explicit():
    cluster, blocks = loaded_cluster()
    x = torch.ones(COLS, 1, dtype=torch.float64)
    got = cluster.wait_all(cluster.submit("matmul", PerWorker({j: ("w", x * j) for j in range(N)})))
    assert all(torch.equal(got[j], blocks[j] @ (x * j)) for j in range(N))
    with pytest.raises(ValueError, match="no argument tuple for workers"):
        cluster.submit("matmul", PerWorker({0: ("w", x)}))


def test_worker_counts_its_compute_and_updates_not_its_other_calls():
    worker = Worker(0)
    worker.load({"w": torch.randn(64, 64, dtype=torch.float64)})
    fresh = worker.counters()
    assert (fresh["compute_s"], fresh["updates_applied"]) == (0.0, 0)
    assert fresh["process_s"] > 0  # this process's CPU so far (an in-process worker shares the master's)
    x = torch.randn(64, 32, dtype=torch.float64)
    for _ in range(20):
        worker.matmul("w", x)
    after_products = worker.counters()["compute_s"]
    assert after_products > 0
    worker.ping()
    worker.state(["w"])
    assert worker.counters()["compute_s"] == after_products  # only products and updates count
    worker.sgd([("w", SGDStep(lr=0.1), torch.randn(32, 64, dtype=torch.float64), None)])
    assert worker.counters()["updates_applied"] == 1
    assert worker.counters()["compute_s"] > after_products


class StallOnce(LatencyModel):
    """Worker ``worker``'s task ``task`` takes ``factor`` times longer; every other task is on time."""

    def __init__(self, worker: int, task: int, factor: float) -> None:
        self.worker, self.task, self.factor = worker, task, factor

    def slowdown(self, worker: int, task: int) -> float:
        return self.factor if (worker, task) == (self.worker, self.task) else 1.0

    def describe(self) -> str:
        return f"worker {self.worker} stalls at task {self.task}"


def test_a_worker_that_stalls_in_a_round_of_exactly_k_idle_ones_is_not_waited_for():
    """Stragglers 4 and 5 are a call behind, so only k workers are idle; one of the stragglers is asked
    too, and when worker 0 stalls within the round the answers come from the others."""
    latency = Combined([FixedStragglers([4, 5], factor=10), StallOnce(0, task=2, factor=1e6)])
    cluster, blocks = loaded_cluster(latency=latency, base_time_s=0.01)
    cluster.first_k(cluster.submit("ping", Broadcast(())), K)
    x = torch.ones(COLS, BATCH, dtype=torch.float64)
    answers = cluster.compute("matmul", Broadcast(("w", x)), K)
    assert answers.workers == frozenset({0, 1, 2, 3, 4})
    assert sorted(answers.results) == [1, 2, 3, 4] and 0 in cluster.alive()
    assert all(torch.equal(r, blocks[j] @ x) for j, r in answers.results.items())


def test_declared_spares_run_first_in_every_burst_and_the_rest_take_turns(monkeypatch):
    """The call run first in a burst measures slow (cold caches after the master's own work), an
    artifact of running the workers one after another: the spares take it, and the preferred workers
    take turns at running right after them, so that none of them is made a permanent straggler."""
    cluster, _ = loaded_cluster()
    cluster.spare([4, 5])
    order: list[int] = []
    for worker in cluster.workers:
        real = worker.matmul
        monkeypatch.setattr(worker, "matmul", lambda key, x, real=real, j=worker.index: order.append(j) or
                            real(key, x))
    x = torch.ones(COLS, BATCH, dtype=torch.float64)
    firsts = []
    for _ in range(N):
        order.clear()
        cluster.first_k(cluster.submit("matmul", ("w", x)), N)
        assert sorted(order[:2]) == [4, 5] and sorted(order[2:]) == [0, 1, 2, 3]
        firsts.append(order[2])
    assert set(firsts) == {0, 1, 2, 3}  # each preferred worker ran first after the spares in some round
    with pytest.raises(ValueError, match="distinct ids"):
        cluster.spare([6])


@pytest.mark.parametrize(("patience_s", "answered"), [(0.0, [1, 2, 3, 4]), (1e-4, [1, 2, 3, 4]),
                                                      (1e-3, [0, 1, 2, 3])])
def test_a_round_waits_its_patience_for_a_preferred_answer_in_place_of_a_spares(patience_s, answered):
    """Worker 0 answers 0.5 ms after the others (a 1.05x slowdown of 10 ms): within the patience its
    answer replaces spare 4's, and the clock moves to it; beyond it, the spare's answer stands."""
    cluster, blocks = loaded_cluster(latency=FixedStragglers([0], factor=1.05), base_time_s=0.01,
                                     master_time="measured")
    cluster.spare([4, 5])
    x = torch.ones(COLS, BATCH, dtype=torch.float64)
    sent = cluster.now()
    got = cluster.first_k(cluster.submit("matmul", Broadcast(("w", x))), K, patience_s=patience_s)
    assert sorted(got) == answered
    assert all(torch.equal(r, blocks[j] @ x) for j, r in got.items())
    waited = 0 in got
    assert cluster.now() - sent >= (0.0105 if waited else 0.01)
    assert cluster.counters.late_results_discarded == 2


def test_patience_never_waits_where_it_cannot_pay_or_for_whom_cannot_answer():
    x = torch.ones(COLS, BATCH, dtype=torch.float64)

    def answered(cluster: InProcessCluster, enough=None) -> list[int]:
        cluster.spare([4, 5])
        round_ = cluster.submit("matmul", Broadcast(("w", x)))
        return sorted(cluster.first_k(round_, K, enough, patience_s=1.0))

    late_zero = FixedStragglers([0], factor=1.05)
    # a reproducible clock (master_time "explicit"): the decode saved is not on it, the wait would be
    assert answered(loaded_cluster(latency=late_zero, base_time_s=0.01)[0]) == [1, 2, 3, 4]
    # a code that names its decodable sets (``enough``): no swap
    measured = loaded_cluster(latency=late_zero, base_time_s=0.01, master_time="measured")[0]
    assert answered(measured, lambda w: len(w) >= K) == [1, 2, 3, 4]
    # a dead preferred worker is not waited for
    cluster = loaded_cluster(base_time_s=0.01, master_time="measured")[0]
    cluster.kill(0)
    assert answered(cluster) == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "1", True, None])
def test_a_bad_patience_is_refused_before_the_round_is_taken(bad):
    cluster, _ = loaded_cluster(base_time_s=0.01, master_time="measured")
    round_ = cluster.submit("matmul", Broadcast(("w", torch.ones(COLS, BATCH, dtype=torch.float64))))
    with pytest.raises(ValueError, match=r"patience_s must be a number of seconds >= 0"):
        cluster.first_k(round_, K, patience_s=bad)
    assert len(cluster.first_k(round_, K)) == K  # the round is still there to take


def test_a_wait_in_vain_lasts_its_whole_patience_on_the_clock_as_on_ray():
    """Worker 0 answers at 5 s (a 5x straggler of 1 s calls): a patience of 2 s does not reach it,
    and the master, having waited, is at 3 s at least (on Ray the deadline passes the same way)."""
    cluster, _ = loaded_cluster(latency=FixedStragglers([0], factor=5.0), base_time_s=1.0,
                                master_time="measured")
    cluster.spare([4, 5])
    sent = cluster.now()
    x = torch.ones(COLS, BATCH, dtype=torch.float64)
    got = cluster.first_k(cluster.submit("matmul", Broadcast(("w", x))), K, patience_s=2.0)
    assert sorted(got) == [1, 2, 3, 4]
    assert cluster.now() - sent >= 3.0


def test_the_preferred_wait_is_the_measured_decode_saving_and_pauses_while_it_does_not_pay():
    wait = PreferredWait(4)
    every = frozenset(range(6))
    copies = Answers(dict.fromkeys(range(4)), every)
    decoded = Answers(dict.fromkeys([1, 2, 3, 4]), every)
    assert wait.patience_s("fc1.row") == 0.0  # nothing measured yet
    wait.record("fc1.row", copies, 0.0, 0.001)
    assert wait.patience_s("fc1.row") == 0.0  # one kind only
    wait.record("fc1.row", decoded, 0.0, 0.003)
    assert wait.patience_s("fc1.row") == pytest.approx(0.002)
    assert wait.patience_s("fc2.row") == 0.0  # per block key
    wait.record("fc1.row", decoded, 0.0, 0.005)  # the averages move: 0.2 of the newest
    assert wait.patience_s("fc1.row") == pytest.approx(0.0024)
    paused = []
    for _ in range(16):  # worker 0 asked and waited for in vain, round after round (a straggler)
        patience = wait.patience_s("fc1.row")
        paused.append(patience == 0.0)
        wait.record("fc1.row", decoded, patience, 0.003)
    # four waits in vain bring the share that paid below one half; then pauses of 1, 2, 4, 8 rounds
    assert paused == [False] * 4 + [True, False, True, True, False] + [True] * 4 + [False, True, True]
    asked_without_zero = Answers(dict.fromkeys([1, 2, 3, 4]), frozenset(range(1, 6)))
    wait.record("fc1.row", copies, 0.002, 0.001)  # a probe that brought them: the pause ends
    assert wait.patience_s("fc1.row") > 0
    wait.record("fc1.row", asked_without_zero, 0.002, 0.003)  # 0 not asked (busy): no wait in vain
    assert wait.patience_s("fc1.row") > 0
