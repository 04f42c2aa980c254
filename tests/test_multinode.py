"""A real multi-node Ray cluster on this machine: a head and two more nodes (one raylet each), all on
127.0.0.1, joined by ``sazd train --address``.

- Placement ``spread`` puts the n = 3 workers on the 3 distinct nodes; report.json says where.
- One node's raylet is killed (SIGKILL) mid-run: its worker is an erasure, respawned on a surviving
  node and repaired; training goes on until it is interrupted (SIGINT), with a report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# A lost node is declared dead after about 3 x 0.5 s of missed health checks.
SYSTEM = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 500}


@pytest.fixture(scope="module")
def nodes():
    """A 3-node cluster for the module: (cluster, [node for each]). Not connected to this process."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1,
                                      "include_dashboard": False, "_system_config": SYSTEM})
    others = [cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, [cluster.head_node, *others]
    cluster.shutdown()


def sazd_train(address: str, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    args = ["train", "--dataset", "digits", "--hidden", "64,64", "--min-features", "16", "--n", "3",
            "--k", "2", "--address", address, "--run-dir", str(run), "--no-progress",
            "--worker-timeout", "20", *extra]
    return subprocess.Popen([sys.executable, "-m", "sazd", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(run: Path) -> list[str]:
    path = run / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def iterations(lines: list[str], after: str | None = None) -> int:
    """Iteration records in ``lines`` (only those after the first record of kind ``after``)."""
    if after is not None:
        marks = [i for i, line in enumerate(lines) if f'"kind": "{after}"' in line]
        lines = lines[marks[0] + 1:] if marks else []
    return sum('"kind": "iteration"' in line for line in lines)


def wait_for(run: Path, predicate, proc: subprocess.Popen, timeout_s: float = 150) -> bool:
    """Poll the run's metrics until ``predicate(lines)``, the run ends, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        if predicate(rows(run)):
            return True
        time.sleep(0.1)
    return predicate(rows(run))


def test_spread_puts_each_worker_on_its_own_node(nodes, tmp_path):
    cluster, _ = nodes
    run = tmp_path / "spread"
    proc = sazd_train(cluster.address, run, "--max-steps", "3")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    workers = json.loads((run / "report.json").read_text())["workers"]
    assert len({w["node_id"] for w in workers}) == 3 and "workers on 3 node(s)" in out
    assert all(w["node_ip"] == "127.0.0.1" and w["device"] == "cpu" for w in workers)
    assert "share a node" not in err


def test_spread_placement_and_a_lost_node_is_repaired(nodes, tmp_path):
    cluster, members = nodes
    raylet = members[2].all_processes["raylet"][0].process
    lost_node = members[2].node_id
    run = tmp_path / "run"
    proc = sazd_train(cluster.address, run, "--epochs", "1000", "--max-steps", "1000000")
    try:
        assert wait_for(run, lambda rows: iterations(rows) >= 10, proc), "too slow to start"
        os.kill(raylet.pid, signal.SIGKILL)  # the node is lost with the worker on it
        # training goes on: the lost worker is repaired, then more iterations follow
        assert wait_for(run, lambda rows: iterations(rows, after="repair") >= 20, proc), "no repair"
        proc.send_signal(signal.SIGINT)  # stops after the current iteration, with a report
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "stopped by signal 2" in err, err[-3000:]
    report = json.loads((run / "report.json").read_text())
    workers = report["workers"]
    assert [w["index"] for w in workers] == [0, 1, 2]
    assert lost_node not in {w["node_id"] for w in workers}  # the replacement runs on a surviving node
    [repair] = report["repairs"]
    lost_worker = repair["worker"]
    assert report["worker_latency"][lost_worker]["respawns"] == 1
    assert report["cluster_settings"]["placement"] == "spread"
    assert len({w["node_id"] for w in workers}) == 2  # the two surviving nodes
