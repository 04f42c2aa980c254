"""Faults in the middle of a real Ray training run.

- n-k worker actors die mid-run (one through ``RayCluster.kill``, one killed behind the cluster's
  back): the master treats them as erasures, respawns and repairs them, and the run ends exactly where
  an undisturbed run ends (float64: weights to 1e-9, hence the same test accuracy).
- More than n-k die: a ``ClusterError`` that says so and where the latest checkpoint is, never a hang;
  the checkpoint holds exactly the plain-PyTorch weights of its iteration.
- Actors frozen with SIGSTOP: silent past the worker timeout, they are killed (no process left),
  respawned and repaired; a checkpoint due meanwhile is written from the k live workers.
- The Ray control plane killed mid-run, and a cluster address where nothing listens: one line, exit 1,
  promptly, and no process of the run left.
Faults are real signals to the PIDs of the actors and Ray processes the run started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _support import digits_config
from sazd.parallel import plain_state_dict, plain_weights
from sazd.runtime.cluster import ClusterError, Counters
from sazd.runtime.ray import process_tree, wait_until
from sazd.train import checkpoint
from sazd.train.optim import OptimConfig
from sazd.train.reference import reference_run, relative_weight_error
from sazd.train.trainer import TrainConfig, Trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

N, K = 6, 4
PLAN = {"fc1": "coded", "fc2": "coded", "fc3": "coded"}
SGD = OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.fixture(scope="module")
def shared_cluster(ray_session):
    """One set of actors for the module (starting an actor costs a Python process importing torch).

    ``max_backlog=None``: a respawned actor queues its calls while its process starts, which on a
    loaded 2-core machine can take longer than 64 calls; the backlog rule would then kill the new actor
    again (it has its own test in test_runtime_ray.py). ``worker_timeout_s``: a lost answer becomes a
    ClusterError well before pytest's timeout."""
    from sazd.runtime.ray import RayCluster

    cluster = RayCluster(N, worker_timeout_s=60, max_backlog=None)
    yield cluster
    cluster.close()


@pytest.fixture
def cluster(shared_cluster):
    """The shared cluster with all n workers alive (earlier tests kill some) and fresh counters; each
    Trainer loads its own weights (``Worker.load`` replaces blocks and drops their momentum)."""
    shared_cluster.respawn(*(j for j in range(N) if j not in shared_cluster.alive()))
    assert sorted(shared_cluster.wait_all(shared_cluster.submit("set_delay", (1.0,)))) == list(range(N))
    shared_cluster.counters = Counters()
    return shared_cluster


def config(**kw) -> TrainConfig:
    return digits_config(**{"backend": "ray", "base_time_s": None, "n": N, "k": K, "optim": SGD,
                            "max_steps": 30, "epochs": 3, **kw})


def kill_behind_the_back(trainer: Trainer, workers: list[int]) -> None:
    """SIGKILL the actors' processes without telling the cluster, and wait until they are gone, so the
    next round really meets dead actors."""
    pids = [trainer.cluster.pids()[j] for j in workers]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout_s=30)


def at_iteration(t: int, action):
    """A trainer callback that runs ``action(trainer)`` once, after iteration ``t``."""

    def callback(trainer: Trainer) -> None:
        if trainer.position.iteration == t:
            action(trainer)

    return callback


def test_skipped_workers_cost_no_extra_master_egress(digits, cluster):
    """Two actors 20x slower: rounds skip them while they are busy, and with their DEU update they get
    the round's X^T or dY^T, the very object already in Ray's store, so the master's egress per
    iteration equals that of an in-process run in which every worker answers every round."""
    steps = dict(scheme="deu", optim=SGD, max_steps=8, epochs=3)
    with Trainer(digits_config(**steps), data=digits) as tr:  # in-process, constant task time
        tr.train()
        full = [(r["bytes_sent_once"], r["bytes_to_workers"]) for r in tr.history if r["kind"] == "iteration"]
    assert cluster.wait_all(cluster.submit("set_delay", (20.0,), [0, 1])) == {0: 0, 1: 1}
    with Trainer(config(**steps), cluster=cluster, data=digits) as tr:
        tr.train()
        slow = [(r["bytes_sent_once"], r["bytes_to_workers"]) for r in tr.history if r["kind"] == "iteration"]
    assert len(slow) == len(full) == 8
    assert [once for once, _ in slow] == [once for once, _ in full]
    assert [per_worker for _, per_worker in slow] != [per_worker for _, per_worker in full]  # skips happened


@pytest.mark.parametrize("scheme", ["deu", "naive"])
def test_killing_n_minus_k_actors_mid_run_is_repaired_and_changes_nothing(scheme, digits, cluster):
    """30 steps (22 per epoch): the kills land after step 10, before an epoch boundary and its
    evaluation. Worker 5 is a straggler (1000x slower compute) that has fallen behind, so the master
    skips it while others are idle; after the kills it is one of the k workers still alive and must be
    waited for, also in the round where the dead worker 4 is first met."""

    def kill_two(tr: Trainer) -> None:
        tr.cluster.kill(1)  # the cluster knows
        kill_behind_the_back(tr, [4])  # the cluster finds out from the next round's RayActorError
        tr.cluster.submit("set_delay", (1.0,), [5])  # runs after its backlog: still behind next round

    undisturbed_cfg = config(scheme=scheme)
    with Trainer(undisturbed_cfg, cluster=cluster, data=digits) as tr:
        undisturbed = tr.train()
    cfg = config(scheme=scheme)
    assert cluster.wait_all(cluster.submit("set_delay", (1000.0,), [5])) == {5: 5}
    with Trainer(cfg, cluster=cluster, data=digits, callbacks=[at_iteration(10, kill_two)]) as tr:
        report = tr.train()
        reference = reference_run(cfg, tr.data, 30)
        err = relative_weight_error(plain_state_dict(tr.model), reference)
        # decode from a k-set holding both repaired workers: their blocks (and momentum) are right
        repaired_view = dict(plain_state_dict(tr.model), **plain_weights(tr.model, exclude=[0, 2])[0])
        repaired_err = relative_weight_error(repaired_view, reference)
        alive = tr.cluster.alive()
    assert report["iterations"] == 30
    assert sorted(r["worker"] for r in report["repairs"]) == [1, 4], report["cluster"]
    assert all(r["iteration"] in (11, 12) for r in report["repairs"])  # repaired right after they died
    counts = report["cluster"]
    assert counts["respawns"] == 2 and counts["backlog_kills"] == 0 and counts["failed_results"] >= 1
    assert alive == list(range(N))
    assert err < 1e-9 and repaired_err < 1e-9
    assert abs(report["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.003
    assert undisturbed["repairs"] == [] and report["test_accuracy"] > 0.5  # well above chance (0.1)


def test_losing_workers_one_by_one_without_repair_stops_with_an_error_and_a_checkpoint(digits, tmp_path,
                                                                                       cluster):
    """Repair off: after the second death no redundancy is left, so the trainer saves a checkpoint;
    the third death leaves 3 < k alive: a ClusterError naming that checkpoint."""
    kills = {4: 0, 8: 1, 12: 2}

    def kill_next(tr: Trainer) -> None:
        if tr.position.iteration in kills:
            tr.cluster.kill(kills[tr.position.iteration])

    cfg = config(scheme="deu", repair=False, run_dir=str(tmp_path / "run"))
    with Trainer(cfg, cluster=cluster, data=digits, callbacks=[kill_next]) as tr, \
            pytest.raises(ClusterError, match=r"needed 4 answers.*3 of n=6 workers alive") as info:
        tr.train()
    assert f"--resume {tmp_path / 'run' / 'checkpoint'}" in str(info.value)
    assert tr.maintainer.repairs == [] and tr.position.iteration == 12, tr.cluster.counters
    saved = checkpoint.load(tmp_path / "run")
    assert saved.position["iteration"] == 9  # the first iteration that ended with exactly k alive
    assert relative_weight_error(saved.model, reference_run(cfg, tr.data, 9)) < 1e-9


@pytest.mark.parametrize("scheme", ["deu", "naive"])
def test_killing_more_than_n_minus_k_at_once_is_a_clear_error_not_a_hang(scheme, digits, tmp_path,
                                                                         cluster):
    """Three of six actors die at once, faster than repair can act (it needs k live workers): the next
    round fails with a ClusterError. DEU cannot decode any more, so the message points at the latest
    periodic checkpoint (iteration 5); naive still holds the plain weights and saves one at the failure."""
    cfg = config(scheme=scheme, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=5)
    kill_three = at_iteration(7, lambda tr: kill_behind_the_back(tr, [0, 2, 5]))
    with Trainer(cfg, cluster=cluster, data=digits, callbacks=[kill_three]) as tr, \
            pytest.raises(ClusterError, match=r"needed 4 answers.*3 of n=6 workers alive") as info:
        tr.train()
    saved_at = 5 if scheme == "deu" else 7
    message = str(info.value)
    assert f"--resume {tmp_path / 'ckpt'}" in message
    assert ("Could not save a checkpoint now" in message) == (scheme == "deu")
    assert tr.maintainer.repairs == [] and sorted(tr.cluster.alive()) == [1, 3, 4]
    saved = checkpoint.load(tmp_path / "ckpt")
    assert saved.position["iteration"] == saved_at
    assert relative_weight_error(saved.model, reference_run(cfg, tr.data, saved_at)) < 1e-9


def test_frozen_actors_time_out_and_are_repaired_while_a_checkpoint_is_written(digits, tmp_path, cluster):
    """n-k actors frozen (SIGSTOP) just before a due checkpoint: it is written from the k live workers;
    the frozen ones are killed after the worker timeout, respawned and repaired; the run ends where an
    undisturbed run ends."""
    frozen: list[int] = []

    def freeze(tr: Trainer) -> None:
        frozen.extend(tr.cluster.pids()[j] for j in (1, 4))
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

    cfg = config(scheme="deu", max_steps=12, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=5)
    cluster.worker_timeout_s = 2.0
    pause = at_iteration(6, lambda tr: time.sleep(2.5))  # silence past the timeout, however fast the rounds
    try:
        with Trainer(cfg, cluster=cluster, data=digits, callbacks=[at_iteration(4, freeze), pause]) as tr:
            report = tr.train()
            err = relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 12))
    finally:
        cluster.worker_timeout_s = 60.0
    assert report["iterations"] == 12 and err < 1e-9
    assert sorted(r["worker"] for r in report["repairs"]) == [1, 4]
    assert report["cluster"]["timeouts"] == 2
    saved = checkpoint.load(tmp_path / "ckpt")
    assert saved.position["iteration"] == 12  # 5 and 10 were due; the end of the run saved the last
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in frozen), timeout_s=10)
    table = {row["worker"]: row for row in report["worker_latency"]}
    assert table[1]["respawns"] == table[4]["respawns"] == 1 and table[0]["respawns"] == 0
    assert table[1]["failed"] + table[1]["late"] + table[1]["skipped"] >= 1


def test_freezing_more_than_n_minus_k_is_a_clear_error_within_the_timeout(digits, tmp_path, cluster):
    frozen: list[int] = []

    def freeze(tr: Trainer) -> None:
        frozen.extend(tr.cluster.pids()[j] for j in (0, 2, 5))
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

    cfg = config(scheme="deu", max_steps=12)
    cluster.worker_timeout_s = 3.0
    try:
        with Trainer(cfg, cluster=cluster, data=digits, callbacks=[at_iteration(3, freeze)]) as tr:
            start = time.monotonic()
            with pytest.raises(ClusterError, match=r"needed 4 answers.*3 of n=6 workers alive"):
                tr.train()
            assert time.monotonic() - start < 60  # bounded: not a hang
    finally:
        cluster.worker_timeout_s = 60.0
    assert tr.cluster.counters.timeouts == 3
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in frozen), timeout_s=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sazd(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-m", "sazd", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_an_address_where_no_cluster_answers_fails_fast_with_one_line(tmp_path):
    start = time.monotonic()
    proc = sazd("train", "--dataset", "digits", "--address", f"127.0.0.1:{free_port()}", "--run-dir",
                str(tmp_path / "run"))
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("sazd train: failed: no Ray cluster answers at 127.0.0.1:")


def descendants(pid: int) -> set[int]:
    """PIDs of every process below ``pid``."""
    return {p for p, _ in process_tree([pid])} - {pid}


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_losing_the_ray_control_plane_is_one_line_and_leaves_no_process(tmp_path):
    """The run starts its own Ray; its GCS is killed mid-run: exit 1 with one line soon after, and every
    process the run started is gone."""
    run = tmp_path / "run"
    proc = sazd("train", "--dataset", "digits", "--n", "3", "--k", "2", "--epochs", "100",
                "--max-steps", "2000", "--run-dir", str(run), "--no-progress")
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
            seen |= descendants(proc.pid)
            time.sleep(0.2)
        assert (run / "metrics.jsonl").exists(), "training did not start"
        seen |= descendants(proc.pid)
        gcs = [pid for pid in seen if process_name(pid) == "gcs_server"]
        assert len(gcs) == 1
        os.kill(gcs[0], signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=55)  # Ray itself would abort the process after 60 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed < 55
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("sazd train")]
    assert len(lines) == 1 and "gcs_server" in lines[0], err[-2000:]
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in seen), timeout_s=10), \
        [(pid, process_name(pid)) for pid in seen if os.path.exists(f"/proc/{pid}")]


DRIVER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a user's terminal gives it (a shell's
# background job would inherit SIGINT ignored)
from sazd.runtime.ray import start_local_ray
print("starting", flush=True)
start_local_ray(num_cpus=2, object_store_gb=0.2)
print("up", flush=True)
time.sleep(600)
"""


def ray_dirs_of(pid: int) -> list[Path]:
    temp = Path(os.environ.get("RAY_TMPDIR") or "/tmp", "ray")
    return sorted(temp.glob(f"session_*_{pid}"))


def driver() -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


@pytest.mark.parametrize("fault", ["SIGKILL once up", "SIGINT during start-up"])
def test_a_killed_or_interrupted_driver_leaves_no_ray_process_nor_session_dir(fault):
    proc = driver()
    seen: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "starting"
        if fault.startswith("SIGINT"):  # as soon as Ray's first process exists, mid-start
            assert wait_until(lambda: bool(seen.update(descendants(proc.pid)) or any(
                process_name(p) == "gcs_server" for p in seen)), timeout_s=60)
            os.kill(proc.pid, signal.SIGINT)
        else:
            assert proc.stdout.readline().strip() == "up"
            seen |= descendants(proc.pid)
            assert ray_dirs_of(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
    ray_procs = [p for p in seen if process_name(p) in ("gcs_server", "raylet")]
    assert ray_procs  # there was something to clean up
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in seen), timeout_s=30), \
        [(p, process_name(p)) for p in seen if os.path.exists(f"/proc/{p}")]
    assert wait_until(lambda: not ray_dirs_of(proc.pid), timeout_s=15), ray_dirs_of(proc.pid)


def test_the_reaper_removes_only_its_driver_s_ray_processes_and_session_dirs(tmp_path):
    """No Ray here: a shell stands in for the driver, with a child named like a Ray worker and one that
    is not Ray's; the temp dir holds the driver's session, another driver's, and a link to a user's
    directory named like the driver's session."""
    from sazd.runtime.ray import processes

    temp, user = tmp_path / "ray", tmp_path / "user-data"
    temp.mkdir()
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    fake = subprocess.Popen(["bash", "-c", 'exec -a "ray::RayWorker" sleep 300 & sleep 300 & wait'],
                            start_new_session=True)
    assert wait_until(lambda: len(descendants(fake.pid)) == 2, timeout_s=10)
    by_role = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in descendants(fake.pid)}
    ray_like = next(p for p, cmd in by_role.items() if cmd.startswith(b"ray::"))
    other = next(p for p in by_role if p != ray_like)
    reaper = subprocess.Popen([sys.executable, processes.__file__, str(fake.pid), "/nonexistent-ray-dir",
                               str(temp)], stdin=subprocess.PIPE, start_new_session=True)
    time.sleep(1.0)  # it records the driver's Ray processes while the driver lives
    ours, theirs = temp / f"session_1_{fake.pid}", temp / f"session_1_{fake.pid + 1}"
    for path in (ours, theirs):
        path.mkdir()
        (path / "log").write_text("x")
    (temp / f"session_2_{fake.pid}").symlink_to(user)
    (temp / "session_latest").symlink_to(ours)
    time.sleep(0.5)
    try:
        os.kill(fake.pid, signal.SIGKILL)
        fake.wait(10)
        reaper.wait(30)
        assert wait_until(lambda: not os.path.exists(f"/proc/{ray_like}"), timeout_s=10)
        assert os.path.exists(f"/proc/{other}")  # not Ray's: left alone
        assert not ours.exists() and not (temp / "session_latest").is_symlink()
        assert theirs.exists() and (user / "keep.txt").read_text() == "mine"  # never through a link
    finally:
        for pid in (ray_like, other):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        reaper.stdin.close()
        if reaper.poll() is None:
            reaper.kill()


def test_removing_sessions_keeps_another_drivers_latest_link_and_never_follows_a_link(tmp_path):
    from sazd.runtime.ray.processes import remove_sessions

    temp, user = tmp_path / "ray", tmp_path / "user-data"
    temp.mkdir()
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    ours, theirs = temp / "session_1_100", temp / "session_1_200"
    for path in (ours, theirs):
        path.mkdir()
        (path / "log").write_text("x")
    (temp / "session_latest").symlink_to(theirs)
    (ours / "into-user").symlink_to(user)  # a link inside our session: removed, its target kept
    remove_sessions(str(temp), [str(ours)])
    assert not ours.exists()
    assert (temp / "session_latest").is_symlink() and (temp / "session_latest").resolve() == theirs
    assert (theirs / "log").read_text() == "x" and (user / "keep.txt").read_text() == "mine"
