"""Ray nodes on distinct addresses: network namespaces joined by veth pairs and a bridge.

The head (and the master) sit on the bridge's address in this namespace; two more Ray nodes run in
namespaces of their own, each on its own address. sazd trains across them with ``tls=True``, the
workers spread one per node; one node's link is cut mid-run (``ip link set ... down``): its worker
is an erasure, respawned on a node still reachable and repaired, and training goes on. At the end
no process, namespace or interface of the test is left. Needs root and network namespaces; skipped
with the reason where they cannot be made. Traffic goes only to addresses inside these namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sazd.runtime.ray import process_tree, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(720)]

TAG = f"szd{os.getpid() % 100000}"  # interface and namespace names: at most 15 characters
SUBNET = f"10.231.{os.getpid() % 200 + 20}"
SRC = Path(__file__).resolve().parents[1] / "src"
RAY = str(Path(sys.executable).parent / "ray")
SYSTEM = json.dumps({"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                     "health_check_timeout_ms": 1000})


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def why_not() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{TAG}x"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def network(nodes: int) -> Iterator[list[str]]:
    """A bridge at SUBNET.1 in this namespace and ``nodes`` namespaces at SUBNET.2, .3, ...; yields
    the namespaces' names. Everything is removed at the end, also on failure."""
    bridge, spaces = f"{TAG}br", [f"{TAG}n{i}" for i in range(nodes)]
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, space in enumerate(spaces):
            outside, inside = f"{TAG}v{i}", f"{TAG}p{i}"
            ip("netns", "add", space)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", space)
            ip("link", "set", outside, "master", bridge, "up")
            ip("netns", "exec", space, "ip", "addr", "add", f"{SUBNET}.{i + 2}/24", "dev", inside)
            ip("netns", "exec", space, "ip", "link", "set", inside, "up")
            ip("netns", "exec", space, "ip", "link", "set", "lo", "up")
        yield spaces
    finally:
        for i, space in enumerate(spaces):
            ip("link", "del", f"{TAG}v{i}", check=False)
            ip("netns", "del", space, check=False)
        ip("link", "del", bridge, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((f"{SUBNET}.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    """Every process of the test cluster alike: sazd importable, no usage statistics, and one
    authentication setting for the nodes and the driver (Ray's token is per user, not per cluster)."""
    return {**os.environ, "PYTHONPATH": str(SRC), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # several nodes (sazd's own default is one)
            "RAY_raylet_start_wait_time_s": "120"}  # a loaded machine registers a node slowly


def ray_node(*args: str, log: Path, space: str | None = None) -> subprocess.Popen:
    """``ray start --block ...`` as a child of ours (never ``ray stop``: it ends every Ray here); its
    output goes to ``log``, shown when a node does not join."""
    prefix = ["ip", "netns", "exec", space] if space else []
    with open(log, "wb") as out:
        return subprocess.Popen([*prefix, RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
                                 *args], env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_started(node: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until ``ray start`` says its node runs. The nodes share this machine's /tmp/ray, and Ray picks
    each node's socket names by looking at what exists there: nodes started at once can pick the
    same name, and one of them then never registers. So they start one after another."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.poll() is None:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"a Ray node did not start within {timeout_s:.0f} s:\n" + tails([log]))


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-1500:]}"
                     for log in logs if log.exists())


DRIVER = """
import itertools, json, os, sys, time
import ray
from sazd.data import batches, load_dataset
from sazd.runtime.ray import RayCluster
from sazd.train.trainer import TrainConfig, Trainer

address, me, stop = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address=address, _node_ip_address=me, log_to_driver=False)  # the master is on the bridge
deadline = time.monotonic() + 300  # a loaded machine starts a node in seconds to minutes
while sum(node["Alive"] for node in ray.nodes()) < 3 and time.monotonic() < deadline:
    time.sleep(0.5)  # the nodes in the namespaces join
print("nodes", sorted(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]), flush=True)
cluster = RayCluster(3, tls=True, worker_timeout_s=30, placement="spread")
print("up", json.dumps(cluster.workers_info()), json.dumps(cluster.describe()), cluster.data_plane_note,
      sep="\\t", flush=True)
data = load_dataset("digits")
cfg = TrainConfig(model="mlp", dataset="digits", hidden=(32, 32), n=3, k=2, backend="ray",
                  batch_size=64, show_progress=False, plan={"fc1": "coded", "fc2": "coded"})
with Trainer(cfg, cluster=cluster, data=data) as trainer:
    for epoch in itertools.count():
        for xb, yb in batches(data.train_x, data.train_y, 64, 0, epoch):
            rec = trainer.step(xb, yb)
            repairs = trainer.repair_dead()
            print("step", json.dumps({"loss": rec["loss"], "repairs": len(repairs),
                                      "alive": cluster.alive()}), flush=True)
            if os.path.exists(stop):
                print("end", json.dumps(cluster.workers_info()), json.dumps(cluster.counters.snapshot()),
                      sep="\\t", flush=True)
                sys.exit(0)
"""


def test_training_across_namespaces_with_tls_survives_a_cut_link(tmp_path):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    ours: list[subprocess.Popen] = []
    seen: set[int] = set()
    with network(2) as spaces:
        try:
            port = free_port()
            logs = [tmp_path / f"ray-node-{i + 1}.log" for i in range(len(spaces) + 1)]
            head = ray_node("--head", "--node-ip-address", f"{SUBNET}.1", "--port", str(port),
                            "--include-dashboard=false", f"--system-config={SYSTEM}", log=logs[0])
            ours.append(head)
            wait_started(head, logs[0], 180)
            for i, space in enumerate(spaces):
                ours.append(ray_node("--address", f"{SUBNET}.1:{port}", "--node-ip-address",
                                     f"{SUBNET}.{i + 2}", space=space, log=logs[i + 1]))
                wait_started(ours[-1], logs[i + 1], 180)
            stop = tmp_path / "stop"
            driver = subprocess.Popen([sys.executable, "-c", DRIVER, f"{SUBNET}.1:{port}", f"{SUBNET}.1",
                                       str(stop)], env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            ours.append(driver)
            lines: list[str] = []

            def read_until(predicate, timeout_s: float) -> bool:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and driver.poll() is None:
                    line = driver.stdout.readline()
                    if line:
                        lines.append(line)
                        for proc in ours:
                            seen.update(p for p, _ in process_tree([proc.pid]))
                        if predicate(lines):
                            return True
                return predicate(lines)

            assert read_until(lambda ls: any(line.startswith("nodes ") for line in ls), 330), lines
            nodes = next(line for line in lines if line.startswith("nodes "))
            joined = all(f"'{SUBNET}.{i}'" in nodes for i in (1, 2, 3))
            assert joined, nodes + tails(logs)  # every node joined
            assert read_until(lambda ls: any(line.startswith("up\t") for line in ls), 180), \
                driver.stderr.read()[-3000:] if driver.poll() is not None else lines
            up = next(line for line in lines if line.startswith("up\t"))
            _, workers, settings, note = up.split("\t")
            workers, settings = json.loads(workers), json.loads(settings)
            assert settings["data_plane"] == "tls"
            assert "the data plane is encrypted (TLS 1.3, generated certificates)" in note
            ips = {w["node_ip"] for w in workers}
            assert ips == {f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"}  # one worker per address
            steps = lambda ls: sum(line.startswith("step ") for line in ls)  # noqa: E731
            assert read_until(lambda ls: steps(ls) >= 5, 120), lines[-5:]
            ip("link", "set", f"{TAG}v0", "down")  # node 1 (SUBNET.2) is cut off mid-run
            cut = steps(lines)
            repaired = lambda ls: any('"repairs": 1' in line for line in ls[cut:])  # noqa: E731
            assert read_until(repaired, 150), lines[-5:]
            after = steps(lines)
            assert read_until(lambda ls: steps(ls) >= after + 5, 120), lines[-5:]
            stop.touch()
            assert read_until(lambda ls: any(line.startswith("end\t") for line in ls), 60), lines[-5:]
            end = next(line for line in lines if line.startswith("end\t"))
            _, workers, counters = end.split("\t")
            workers = json.loads(workers)
            assert f"{SUBNET}.2" not in {w["node_ip"] for w in workers}  # repaired elsewhere
            assert json.loads(counters)["respawns"] >= 1
            driver.wait(60)
            assert driver.returncode == 0, driver.stderr.read()[-3000:]
        finally:
            for proc in ours:
                seen.update(p for p, _ in process_tree([proc.pid]))
            for proc in reversed(ours):  # by PID: only what this test started
                for pid, _ in process_tree([proc.pid]):
                    with contextlib.suppress(OSError):
                        os.kill(pid, 9)
                with contextlib.suppress(Exception):
                    proc.wait(10)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in seen), timeout_s=30)
    temp = Path(os.environ.get("RAY_TMPDIR") or "/tmp", "ray")
    for session in temp.glob(f"session_*_{ours[0].pid}") if ours else []:  # the test cluster's (its head)
        shutil.rmtree(session)
    assert f"{TAG}br" not in ip("link").stdout and TAG not in ip("netns", "list").stdout
