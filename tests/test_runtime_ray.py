"""Ray backend: first-k with real slow actors, update order, actor deaths, respawn, clean close."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from sazd.runtime import ClusterError, FixedStragglers, SGDStep, make_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

N, K, ROWS, COLS, BATCH = 6, 4, 512, 512, 128
SLOW = 5000.0  # a slow actor sleeps 4999x its compute time per call


@pytest.fixture(scope="module")
def cluster(ray_session):
    # worker 0 is slowed by the latency model, worker 1 by set_delay in the first test
    cluster = make_cluster("ray", N, worker_timeout_s=60, latency=FixedStragglers([0], factor=SLOW))
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def blocks(cluster):
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(ROWS, COLS, generator=gen) for _ in range(N)]
    assert sorted(cluster.wait_all(cluster.submit("load", [({"w": b},) for b in blocks]))) == list(range(N))
    return blocks


def set_delay(cluster, factor: float, workers: list[int]) -> None:
    assert sorted(cluster.wait_all(cluster.submit("set_delay", (factor,), workers))) == sorted(workers)


def test_first_k_skips_slow_actors_and_matches_local(cluster, blocks):
    set_delay(cluster, SLOW, [1])
    x = torch.randn(COLS, BATCH)
    got = cluster.first_k(cluster.submit("matmul", ("w", x)), K)
    assert sorted(got) == [2, 3, 4, 5]
    for j, y in got.items():
        torch.testing.assert_close(y, blocks[j] @ x)
    # the slow ones are still busy, a single call behind: only one of them is the next round's spare
    assert cluster.ready_workers(K) == [0, 2, 3, 4, 5]
    assert cluster.counters.bytes_from_workers == K * ROWS * BATCH * 4  # late answers never fetched
    # workers 0 and 1 stay busy for seconds: the next tests use the others


def test_a_worker_gets_each_tensor_as_it_was_at_submit(cluster, blocks):
    x = torch.randn(COLS, BATCH)
    want = {j: blocks[j] @ x for j in (2, 3)}
    before = cluster.counters.bytes_sent_once
    round_ = cluster.submit("matmul", ("w", x), [2, 3])
    x.add_(1.0)  # changed at once: the workers still multiply what was submitted
    for j, y in cluster.wait_all(round_).items():
        torch.testing.assert_close(y, want[j])
    for _ in range(2):  # the changed tensor leaves the master once more, then never again
        again = cluster.wait_all(cluster.submit("matmul", [("w", x)] * N, [4, 5]))
        for j, y in again.items():
            torch.testing.assert_close(y, blocks[j] @ x)
    assert cluster.counters.bytes_sent_once - before == 2 * x.numel() * x.element_size()


def test_an_argument_that_cannot_be_sent_is_a_type_error_at_submit(cluster):
    alive, before = cluster.alive(), cluster.counters.snapshot()
    with pytest.raises(TypeError, match=r"submit 'load': cannot send tuple to a worker"):
        cluster.submit("load", ({"w": torch.ones(2, 2)}, lambda: 0), [2, 3])
    assert cluster.alive() == alive and cluster.counters.snapshot() == before  # nobody asked, nothing counted


def test_slow_actor_applies_updates_in_order(cluster, blocks):
    set_delay(cluster, 20.0, [2])
    step = SGDStep(lr=0.1, momentum=0.9)
    x = torch.randn(COLS, BATCH)
    expected, buf, probes = blocks[2].clone(), None, []
    for t in range(4):
        left = torch.randn(ROWS, BATCH, generator=torch.Generator().manual_seed(t))
        right = x.T * (t - 1.5)
        cluster.submit("sgd", ([("w", step, left.T, right)],), [2])
        grad = left @ right
        buf = grad.clone() if buf is None else buf.mul_(0.9).add_(grad)
        expected -= 0.1 * buf
        probes.append((cluster.submit("matmul", ("w", x), [2]), expected @ x))
    for round_, want in probes:  # each product saw exactly the updates sent before it
        torch.testing.assert_close(cluster.wait_all(round_)[2], want, rtol=1e-4, atol=1e-3)
    state = cluster.wait_all(cluster.submit("state", (), [2]))[2]
    torch.testing.assert_close(state["weights"]["w"], expected, rtol=1e-5, atol=1e-5)
    blocks[2].copy_(expected)
    set_delay(cluster, 1.0, [2])


def test_dead_actor_is_an_erasure_and_respawn_is_empty(cluster, blocks, ray_session):
    from ray._private import state

    from sazd.runtime.ray import wait_until

    x = torch.randn(COLS, BATCH)
    victim, pid = cluster.actors[4]._actor_id.hex(), cluster.pids()[4]
    ray_session.kill(cluster.actors[4], no_restart=True)  # dies behind the cluster's back
    assert wait_until(lambda: state.actors()[victim]["State"] == "DEAD", timeout_s=20)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout_s=20)
    failed_before = cluster.counters.failed_results
    # its result is "ready" at once, as an error: an erasure, not an answer
    with pytest.raises(ClusterError, match=r"needed 2 answers, got 1 from 2 workers asked \(1 failed\)"):
        cluster.first_k(cluster.submit("matmul", ("w", x), [2, 4]), 2)
    assert 4 not in cluster.alive() and cluster.counters.failed_results == failed_before + 1
    set_delay(cluster, SLOW, [3])
    round_ = cluster.submit("matmul", ("w", x), [2, 3, 5])  # 0 and 1 are still slow
    cluster.kill(3)  # killed while its call runs
    assert 3 not in cluster.alive()
    cluster.respawn(3)  # before the round is gathered
    assert sorted(cluster.wait_all(round_)) == [2, 5]  # the old actor's call failed...
    assert 3 in cluster.alive()  # ...which does not condemn the new actor
    cluster.respawn(4)
    for j in (3, 4):
        assert cluster.wait_all(cluster.submit("state", (), [j]))[j]["weights"] == {}
        cluster.wait_all(cluster.submit("load", ({"w": blocks[j]},), [j]))
    assert {3, 4} <= set(cluster.alive())  # (the slow 0 and 1 may time out on a loaded machine)
    got = cluster.first_k(cluster.submit("matmul", ("w", x), [3, 4]), 2)
    for j in (3, 4):
        torch.testing.assert_close(got[j], blocks[j] @ x)


def test_backlog_over_limit_kills_the_actor(cluster, blocks):
    cluster.max_backlog = 2
    set_delay(cluster, SLOW, [5])
    x = torch.randn(COLS, BATCH)
    for _ in range(3):
        cluster.submit("matmul", ("w", x), [5])
    try:
        assert 5 not in cluster.ready_workers(K)
        assert 5 not in cluster.alive() and cluster.counters.backlog_kills == 1
    finally:
        cluster.max_backlog = 64


def live(cluster, workers: list[int]) -> None:
    cluster.respawn(*(j for j in workers if j not in cluster.alive()))


@pytest.mark.parametrize("backend", ["inproc", "ray"])
def test_worker_errors_reach_the_master_naming_worker_and_method(backend, cluster):
    """A fire-and-forget load that fails on one worker (nobody fetches its result) makes that worker an
    erasure by the next round, recorded with worker and method; a call every worker fails raises the
    workers' own exception type, with worker and method in a note."""
    c = cluster if backend == "ray" else make_cluster("inproc", N)
    live(c, [2, 3, 4])
    before = len(c.counters.worker_errors)
    block = torch.eye(4)
    c.submit("load", {2: ({"e": block},), 3: ("not a dict of blocks",), 4: ({"e": block},)}, [2, 3, 4])
    got = c.wait_all(c.submit("ping", (), [2, 3, 4]))  # the next round: 3's answer is not taken
    assert sorted(got) == [2, 4] and 3 not in c.alive()
    x = torch.ones(4, 1)
    error = c.counters.worker_errors[before]
    assert (error["worker"], error["method"]) == (3, "load") and "AttributeError" in error["error"]
    with pytest.raises(KeyError, match="holds no block 'nope'") as info:
        c.first_k(c.submit("matmul", ("nope", x), [2, 4]), 1)
    assert any("worker" in note and "'matmul'" in note for note in info.value.__notes__)
    assert 2 in c.alive() and 4 in c.alive()  # the call was wrong, not the workers
    live(c, [3])


def test_a_frozen_worker_times_out_and_the_round_goes_on(cluster, blocks):
    """SIGSTOP on an actor's process: after worker_timeout_s it is killed (an erasure, its process gone)
    and the round completes with the others."""
    import signal

    from sazd.runtime.ray import wait_until

    live(cluster, [2, 3, 4, 5])
    for j in (2, 3, 4, 5):
        cluster.wait_all(cluster.submit("load", ({"w": blocks[j]},), [j]))
    pid = cluster.pids()[5]
    cluster.worker_timeout_s = 2.0
    try:
        os.kill(pid, signal.SIGSTOP)
        x = torch.randn(COLS, BATCH)
        got = cluster.first_k(cluster.submit("matmul", ("w", x), [2, 3, 4, 5]), 3)  # 5 may be among them
        got = cluster.first_k(cluster.submit("matmul", ("w", x), [2, 3, 4, 5]), 4)
    except ClusterError as err:
        assert "needed 4 answers" in str(err) and "(1 failed)" in str(err)
    else:
        raise AssertionError(f"a frozen worker answered: {sorted(got)}")
    finally:
        cluster.worker_timeout_s = 60.0
    assert 5 not in cluster.alive() and cluster.counters.timeouts >= 1
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout_s=20)
    live(cluster, [5])
    cluster.wait_all(cluster.submit("load", ({"w": blocks[5]},), [5]))
    assert cluster.pids()[5] != pid


def test_workers_report_where_they_run(cluster, ray_session):
    infos = cluster.workers_info()
    node_ids = {node["NodeID"] for node in ray_session.nodes() if node["Alive"]}
    assert [w["index"] for w in infos] == list(range(N))
    assert all(w["node_id"] in node_ids and w["device"] == "cpu" and w["node_ip"] for w in infos)
    # each froze what its start-up built (Ray's and torch's objects) out of the garbage collector's passes
    assert all(cluster._info[j]["frozen_objects"] > 10_000 for j in range(N))
    # the workers of a Ray we started compete for the CPU at the master's level (Ray's default: 15)
    levels = set()
    for pid in cluster.pids():
        with contextlib.suppress(ProcessLookupError):  # killed by an earlier test
            levels.add(os.getpriority(os.PRIO_PROCESS, pid))
    assert levels == {os.getpriority(os.PRIO_PROCESS, 0)}


def test_too_many_dead_is_a_clear_error_not_a_hang(cluster, ray_session):
    from sazd.runtime.ray import wait_until

    pids = [cluster.pids()[j] for j in (0, 1, 2)]
    for j in (0, 1, 2):
        ray_session.kill(cluster.actors[j], no_restart=True)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 30)  # really dead
    with pytest.raises(ClusterError, match=r"needed 4 answers.*failed.*3 of n=6 workers alive"):
        cluster.first_k(cluster.submit("matmul", ("w", torch.ones(COLS, 1))), K)
    assert cluster.alive() == [3, 4, 5]


def test_asking_for_missing_gpus_is_a_clear_error(ray_session):
    with pytest.raises(ValueError, match=r"gpus_per_worker=1: 2 workers need 2 GPU .* has 0"):
        make_cluster("ray", 2, gpus_per_worker=1)
    assert ray_session.is_initialized()


def test_close_leaves_no_actors_and_keeps_shared_ray(cluster, ray_session):
    from ray._private import state

    from sazd.runtime.ray import wait_until

    assert cluster.describe()["backend"] == "ray" and cluster.describe()["nodes"] >= 1
    ids = {a._actor_id.hex() for a in cluster.actors}
    pids = [state.actors()[i]["Pid"] for i in ids]
    cluster.close()
    assert wait_until(lambda: all(state.actors()[i]["State"] == "DEAD" for i in ids), timeout_s=20)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout_s=20)
    assert ray_session.is_initialized()  # the session's Ray was reused, not shut down
    with pytest.raises(ClusterError, match="closed"):
        cluster.submit("ping", ())


def test_inproc_worker_timeout_acts_on_the_simulated_clock():
    """Parity with Ray: a worker busy with one call longer than worker_timeout_s (simulated) is killed
    at that moment, whether the round needs it (then the round fails) or not (then it is late, and the
    next look at the cluster after the timeout kills it)."""
    c = make_cluster("inproc", N, latency=FixedStragglers([0], factor=100), base_time_s=0.01,
                     worker_timeout_s=0.5)
    c.wait_all(c.submit("load", ({"w": torch.eye(2)},)))
    x = torch.ones(2, 1)
    got = c.first_k(c.submit("matmul", ("w", x)), N - 1)
    assert 0 not in got and c.counters.timeouts == 0  # late, not yet silent for 0.5 s
    c.note_master_time(0.6)
    assert 0 not in c.ready_workers(K) and c.counters.timeouts == 1
    c.respawn(0)
    c.wait_all(c.submit("load", ({"w": torch.eye(2)},), [0]))
    with pytest.raises(ClusterError, match=r"needed 6 answers.*\(1 failed\)"):
        c.first_k(c.submit("matmul", ("w", x)), N)
    assert c.counters.timeouts == 2
    [row] = [r for r in c.counters.responses.summary(N, c.counters.respawned) if r["worker"] == 0]
    assert row["late"] == 1 and row["failed"] == 1 and row["respawns"] == 1 and row["answered"] == 0


def test_a_run_reports_workers_and_their_answer_times(digits, tmp_path):
    from _support import digits_config
    from sazd.train.trainer import Trainer

    cfg = digits_config(max_steps=4, stragglers=1, run_dir=str(tmp_path / "run"))
    with Trainer(cfg, data=digits) as tr:
        report = tr.train()
    assert [w["index"] for w in report["workers"]] == list(range(cfg.n))
    rows = {r["worker"]: r for r in report["worker_latency"]}
    totals = {sum(r[key] for key in ("answered", "late", "skipped", "failed")) for r in rows.values()}
    assert len(totals) == 1 and totals.pop() > 0  # every worker has one entry per compute round
    assert rows[0]["answered"] == 0  # the straggler's answers are never among the first k
    assert all(rows[j]["answered"] > 0 and rows[j]["median_s"] > 0 for j in (1, 2, 3, 4))
    assert (tmp_path / "run" / "latency.png").stat().st_size > 1000


def rep_plane(out):
    import json

    return json.loads(out.read_text())["plane"]


def test_bench_runtime_reports_the_round_the_iterations_and_the_floor(ray_session, tmp_path, capsys):
    import json

    from sazd.cli import main

    out = tmp_path / "runtime.json"
    flags = ["--n", "3", "--k", "2", "--rows", "64", "--cols", "64", "--batch", "8", "--rounds", "3",
             "--widths", "64", "--warmup", "1", "--iterations", "2", "--json", str(out)]
    assert main(["bench", "runtime", *flags]) == 0
    printed = capsys.readouterr().out
    assert "sazd/bare = " in printed and "Ray/floor" in printed
    assert "data plane, round" in printed and "data plane, one connection" in printed
    for mode in ("memory", "hmac", "tls"):  # each data-plane mode measured, side by side
        assert rep_plane(out)[mode]["round_median_s"] > 0 and rep_plane(out)[mode]["throughput_best_mb_s"] > 0
    assert rep_plane(out)["setup"]["memory_workers"] == 3  # the default cluster's workers map the arena
    assert rep_plane(out)["setup"]["memory_answers"] == 3  # and answer through their own
    rep = json.loads(out.read_text())
    assert rep["round"]["payload"] == {"rows": 64, "cols": 64, "batch": 8, "n": 3, "k": 2}
    assert rep["round"]["sazd"]["median_s"] > 0 and rep["round"]["bare"]["median_s"] > 0
    [row] = rep["iteration"]
    assert row["width"] == 64 and row["floor"]["cores"] >= 1
    for key in ("ratio_start", "ratio_steady", "ratio_sim_start", "ratio_sim_steady", "ratio_floor"):
        assert row[key] > 0
    # wall time against wall time; the in-process side at the process's own threads, Ray's master at
    # what its workers leave it
    assert row["ratio_steady"] == pytest.approx(row["ray"]["steady_s"] / row["inproc"]["steady_s"])
    assert row["inproc"]["threads"] == torch.get_num_threads() >= row["ray"]["threads"] >= 1
    assert row["inproc"]["sim_steady_s"] < row["inproc"]["steady_s"]  # simulated: workers in parallel
    # the floor is the in-process master's work plus all workers' compute (core-seconds) over the cores
    threads = min(row["inproc"]["threads"], row["floor"]["cores"])
    want = row["inproc"]["master_s"] + row["inproc"]["worker_s"] * threads / row["floor"]["cores"]
    assert row["floor"]["floor_s"] == pytest.approx(want)


def test_the_master_leaves_the_workers_on_its_machine_their_cores(ray_session):
    from sazd.runtime.placement import master_threads, usable_cores

    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        c = make_cluster("ray", 2, worker_timeout_s=60)
        try:  # the workers run here with one thread each
            want = max(1, usable_cores() - 2)
            assert c.master_threads == want == torch.get_num_threads()
            assert c.describe()["master_threads"] == want
            with c.between_rounds():  # no round in flight: the workers here idle, every core for the master
                assert torch.get_num_threads() == usable_cores()
            assert torch.get_num_threads() == want
        finally:
            c.close()
        assert torch.get_num_threads() == usable_cores()  # given back
    finally:
        torch.set_num_threads(before)
    assert master_threads(cores=16, worker_threads_here=6, current=8) == 8  # never more than it had
    assert master_threads(cores=16, worker_threads_here=6, current=16) == 10
    assert master_threads(cores=2, worker_threads_here=6, current=2) == 1  # at least one
    assert master_threads(cores=4, worker_threads_here=0, current=4) == 4  # workers elsewhere


def _niceness(pid: int) -> set[int]:
    """The CPU niceness of every thread of process ``pid``."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            out.add(os.getpriority(os.PRIO_PROCESS, int(tid)))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads threads' niceness from /proc (Linux)")
def test_spare_workers_run_at_the_lowest_priority_where_cores_are_shared(ray_session):
    from torch import nn

    import sazd
    from sazd.codes import get_code
    from sazd.parallel import Coded
    from sazd.runtime.placement import SPARE_NICE, spare_nice, usable_cores

    # 4 workers, 2 of them spare, and the master on this machine: lowered where the processes
    # outnumber its cores and the spares do not
    base = int(os.environ.get("RAY_worker_niceness", os.getpriority(os.PRIO_PROCESS, 0)))  # noqa: SIM112 (as Ray started)
    want = base if spare_nice(usable_cores(), processes=5, spares=2) is None else max(base, SPARE_NICE)
    assert spare_nice(cores=2, processes=7, spares=2) == SPARE_NICE
    assert spare_nice(cores=16, processes=7, spares=2) is None  # a core each
    assert spare_nice(cores=2, processes=6, spares=1) is None  # one spare would leave a core idle
    c = make_cluster("ray", 4, worker_timeout_s=60)
    try:
        model = sazd.parallelize(nn.Sequential(nn.Linear(8, 8)), get_code("sazd", n=4, k=2), c,
                                 plan={"0": Coded()})
        pids = c.pids()
        assert [_niceness(pid) for pid in pids] == [{base}, {base}, {want}, {want}]  # SAZD(4,2)'s parities
        x = torch.randn(4, 8)
        assert torch.allclose(model(x), x @ model[0].weight.detach().T + model[0].bias.detach(), atol=1e-5)
        c.respawn(3)  # a respawned spare is lowered too
        assert c.pids()[3] != pids[3] and _niceness(c.pids()[3]) == {want}
        with pytest.raises(ValueError, match="distinct ids"):
            c.spare([4])
        with pytest.raises(ValueError, match=r"1\.\.19"):  # what a worker accepts (checked before acting)
            c.wait_all(c.submit("lower_cpu_priority", (0,), [3]))
    finally:
        c.close()


def test_the_wrapped_private_ray_api_works_on_the_pinned_ray(ray_session):
    """The only two uses of Ray's private API (sazd.runtime.ray.bootstrap), against the pinned Ray."""
    from sazd.runtime.ray.bootstrap import ping_gcs, ray_processes

    assert ray_session.__version__ == "2.60.0"  # the pin in pyproject.toml; re-check both on a bump
    names = {name for name, proc in ray_processes() if proc.poll() is None}
    assert {"gcs_server", "raylet"} <= names
    ping_gcs(5.0)  # answers (raises if the GCS did not)


def test_a_round_waits_its_patience_for_the_preferred_workers_and_not_for_a_dead_one(ray_session):
    """SAZD-style preference on real actors: workers 2 and 3 are spares; worker 0 answers about 20x
    late. With patience the round returns the answers of 0 and 1 (spares' answers that came first are
    replaced and counted late); a dead preferred worker is not waited for."""
    c = make_cluster("ray", 4, worker_timeout_s=60)
    try:
        c.spare([2, 3])
        gen = torch.Generator().manual_seed(0)
        blocks = [torch.randn(256, 256, generator=gen) for _ in range(4)]
        c.wait_all(c.submit("load", [({"w": b},) for b in blocks]))
        set_delay(c, 20.0, [0])
        x = torch.randn(256, 64)
        got = c.first_k(c.submit("matmul", ("w", x)), 2, patience_s=30.0)
        assert sorted(got) == [0, 1]
        for j, y in got.items():
            torch.testing.assert_close(y, blocks[j] @ x)
        c.kill(0)
        got = c.first_k(c.submit("matmul", ("w", x), [1, 2, 3]), 2, patience_s=30.0)
        assert 1 in got and len(got) == 2
    finally:
        c.close()
