"""The shared-memory lanes: the master's arena, a worker's read-only map of it (in another process),
a worker's own arena for its answers (the master's map of it, the regions reused once read),
the channel's shared slots (hostile ones included), and a real Ray cluster whose workers on this
machine take their tensors from it, training exactly as plain PyTorch does, with it and without."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.runtime import RayCluster, wire
from sazd.runtime.arena import (
    CHECK_BYTES,
    MIN_TENSOR_BYTES,
    Arena,
    ArenaError,
    Lease,
    MappedArena,
)
from sazd.runtime.channel import Channel, Encoded, Reply, Sealed, WorkerLost, _worker_handshake, encode, serve
from sazd.runtime.transport import TcpTransport

KEY = b"a" * 32
CALLS = frozenset({"echo"})


def echo(method: str, slowdown: float, args: tuple):
    return args


def placed(arena: Arena, t: torch.Tensor, lease: Lease | None = None) -> tuple[torch.Tensor, int]:
    copy = arena.place(t, lease or Lease())
    assert copy is not None
    return copy, arena.offset_of(copy)


def test_a_placed_tensor_is_read_back_exactly_by_another_process():
    arena = Arena(1 << 22)
    t = torch.randn(256, 96, dtype=torch.float64)
    copy, offset = placed(arena, t)
    assert torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()
    reader = ("import sys, json, torch\nfrom sazd.runtime.arena import MappedArena\n"
              "arena = MappedArena(json.loads(sys.argv[1]))\n"
              "t = torch.empty(256, 96, dtype=torch.float64)\narena.fill(t, int(sys.argv[2]))\n"
              "sys.stdout.buffer.write(t.numpy().tobytes())\n")
    out = subprocess.run([sys.executable, "-c", reader, json.dumps(arena.spec()), str(offset)],
                         capture_output=True, check=True, timeout=120)
    assert out.stdout == t.numpy().tobytes()
    arena.close()


def test_small_tensors_stay_on_the_socket_and_what_does_not_fit_is_not_placed():
    arena = Arena(CHECK_BYTES + 32 + 2 * MIN_TENSOR_BYTES)  # room for two regions after the check
    lease = Lease()
    assert arena.place(torch.zeros(MIN_TENSOR_BYTES // 4 - 1), lease) is None  # below the threshold
    first, _ = placed(arena, torch.ones(MIN_TENSOR_BYTES // 4), lease)
    second, _ = placed(arena, torch.full((MIN_TENSOR_BYTES // 4,), 2.0), lease)
    assert arena.place(torch.ones(MIN_TENSOR_BYTES // 4), lease) is None  # full: the socket takes it
    assert arena.placed_bytes == 2 * MIN_TENSOR_BYTES == arena.in_use()
    assert bool((first == 1).all()) and bool((second == 2).all())  # neither written over
    assert arena.offset_of(torch.ones(3)) is None  # not in the arena
    arena.close()


def test_a_region_is_reused_only_when_its_submit_is_done_sending_and_every_call_holding_it_is_done():
    arena = Arena(1 << 22)
    x = torch.randn(MIN_TENSOR_BYTES // 4)
    answered, lost, lease = Reply(), Reply(), Lease()
    held, start = placed(arena, x, lease)
    lease.hold(answered)
    lease.hold(lost)
    assert placed(arena, x)[1] >= start + x.numel() * 4  # the submit is still sending: held
    lease.close()
    answered.value, answered.done = "ok", True
    assert placed(arena, x)[1] >= start + x.numel() * 4  # one call still unanswered: held
    lost.fail(WorkerLost("worker 1: connection lost"))  # a lost call is done with it too
    again, offset = placed(arena, -x)
    assert offset == start  # first fit: the freed region, whose bytes are now the new tensor's
    assert torch.equal(again, -x) and torch.equal(held, -x)
    arena.close()


def a_spec_of(arena: Arena, **change) -> dict:
    return {**arena.spec(), **change}


@pytest.mark.parametrize("change, why", [
    ({"check": "00" * CHECK_BYTES}, "its check differs"),
    ({"size": (1 << 20) * 2}, "is not a 2097152-byte memory file"),
    ({"path": "/proc/0/fd/3"}, "not on the writer's machine"),
    ({"extra": 1}, "not an arena description"),
    ({"size": "1048576"}, "not an arena description"),
    ({"check": "0" * 3}, "not an arena description"),
])
def test_a_worker_refuses_an_arena_that_is_not_the_master_s(change, why):
    arena = Arena(1 << 20)
    with pytest.raises(ArenaError, match=why):
        MappedArena(a_spec_of(arena, **change))
    arena.close()


def test_a_plain_file_an_unsealed_memory_file_a_fifo_or_a_link_is_never_mapped_and_never_waited_on(
        tmp_path):
    plain = tmp_path / "arena"
    plain.write_bytes(bytes(1 << 16))
    link = tmp_path / "link"
    link.symlink_to(plain)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    unsealed = os.memfd_create("not-sealed")
    os.ftruncate(unsealed, 1 << 16)
    try:
        for path in (str(plain), str(link), f"/proc/{os.getpid()}/fd/{unsealed}", str(fifo), "/dev/zero"):
            with pytest.raises(ArenaError, match=r"not sealed|cannot map|is not a 65536-byte"):
                MappedArena({"path": path, "size": 1 << 16, "check": "00" * CHECK_BYTES})
    finally:
        os.close(unsealed)
    assert plain.read_bytes() == bytes(1 << 16)  # only read


@pytest.mark.parametrize("offset", [0, CHECK_BYTES - 1, (1 << 20) - 8, 1 << 39, True])
def test_a_region_outside_the_arena_or_over_its_check_is_refused(offset):
    arena = Arena(1 << 20)
    mapped = MappedArena(arena.spec())
    with pytest.raises(ValueError, match="outside the"):
        mapped.fill(torch.empty(16), offset)
    arena.close()


@pytest.fixture
def lane():
    """A worker end in this process that maps the master's arena, and the master's channel to it."""
    arena = Arena(1 << 24)
    runs: list = []

    def handle(method, slowdown, args):
        runs.append(method)
        return args

    link = Channel(0, serve("127.0.0.1", KEY, handle, CALLS, None, MappedArena(arena.spec())), KEY,
                   threading.Condition())
    yield arena, link, runs
    link.close()
    arena.close()


def wait_done(reply: Reply, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not reply.done and time.monotonic() < deadline:
        time.sleep(0.005)
    assert reply.done


def test_large_tensors_travel_through_the_arena_and_arrive_exactly(lane):
    arena, link, runs = lane
    lease = Lease()
    x, small = torch.randn(256, 128, dtype=torch.float64), torch.randn(4)
    call = encode(("w", placed(arena, x, lease)[0], small), arena=arena, lease=lease)
    assert [t.numel() for t in call.tensors] == [4]  # only the small one rides on the socket
    reply = link.send("echo", 1.0, call)
    lease.hold(reply)
    lease.close()
    wait_done(reply)
    name, got, got_small = reply.result()
    assert name == "w" and torch.equal(got, x) and torch.equal(got_small, small)
    assert lease.released() and runs == ["echo"]


def shared_slot_call(offset, dtype="float32", shape=(64, 64)) -> Encoded:
    slot = msgpack.ExtType(4, msgpack.packb([dtype, list(shape), offset], use_bin_type=True))
    return Encoded(msgpack.packb([slot], use_bin_type=True), (), ())


@pytest.mark.parametrize("offset", [0, (1 << 24) - 64, 1 << 39, -1, 1.5])
def test_a_shared_slot_outside_the_arena_breaks_the_connection_and_runs_nothing(lane, offset):
    _, link, runs = lane
    reply = link.send("echo", 1.0, shared_slot_call(offset))
    wait_done(reply)
    with pytest.raises(WorkerLost):
        reply.result()
    assert runs == []


def test_a_shared_slot_to_a_worker_that_maps_no_arena_breaks_the_connection_and_runs_nothing():
    runs: list = []
    link = Channel(0, serve("127.0.0.1", KEY, lambda *call: runs.append(call), CALLS), KEY,
                   threading.Condition())
    reply = link.send("echo", 1.0, shared_slot_call(4096))
    wait_done(reply)
    with pytest.raises(WorkerLost):
        reply.result()
    assert runs == []
    link.close()


def test_the_master_never_accepts_a_shared_slot_in_an_answer():
    slot = msgpack.ExtType(4, msgpack.packb(["float32", [4], 4096], use_bin_type=True))
    with pytest.raises(wire.WireError, match="no arena is mapped here"):
        wire.unpack(msgpack.packb([1, 0, slot], use_bin_type=True), 1 << 30)


# ---------------------------------------------------------------- the answers' lane: a worker's own arena
def test_a_worker_s_large_answers_come_through_its_own_arena_exactly():
    answers = Arena(1 << 22)
    link = Channel(0, serve("127.0.0.1", KEY, echo, CALLS, answers=answers), KEY, threading.Condition(),
                   answers=answers.spec())
    x, small = torch.randn(256, 128, dtype=torch.float64), torch.randn(4)
    reply = link.send("echo", 1.0, encode((x, small)))
    wait_done(reply)
    got, got_small = reply.result()
    assert torch.equal(got, x) and torch.equal(got_small, small)
    assert link.answers_refused is None and reply.shared_bytes == x.numel() * 8  # only the large one
    link.close()
    answers.close()


def test_an_answer_s_region_is_reused_only_once_a_later_call_says_the_master_read_it():
    x = torch.randn(256, 128, dtype=torch.float64)  # 256 KiB
    answers = Arena(CHECK_BYTES + 32 + x.numel() * 8 + 64)  # room for one such answer
    gate = threading.Event()

    def handle(method, slowdown, args):
        assert gate.wait(10)
        return args[0]

    link = Channel(0, serve("127.0.0.1", KEY, handle, CALLS, answers=answers), KEY, threading.Condition(),
                   answers=answers.spec())
    replies = [link.send("echo", 1.0, encode((x * i,))) for i in range(3)]  # sent before any answer is read
    gate.set()
    wait_done(replies[-1])
    assert [r.shared_bytes for r in replies] == [x.numel() * 8, 0, 0]  # the others did not fit: the socket
    assert all(torch.equal(r.result(), x * i) for i, r in enumerate(replies))
    later = link.send("echo", 1.0, encode((-x,)))  # says three answers were read: the region is free again
    wait_done(later)
    assert later.shared_bytes == x.numel() * 8 and torch.equal(later.result(), -x)
    assert answers.in_use() == x.numel() * 8  # held only for the latest answer
    link.close()
    answers.close()


@pytest.mark.parametrize("change, why", [
    ({"check": "00" * CHECK_BYTES}, "its check differs"),
    ({"path": "/proc/0/fd/3"}, "not on the writer's machine"),
    ({"size": -1}, "not an arena description"),
])
def test_a_worker_arena_the_master_cannot_map_leaves_every_answer_on_the_socket(change, why):
    answers = Arena(1 << 22)
    link = Channel(0, serve("127.0.0.1", KEY, echo, CALLS, answers=answers), KEY, threading.Condition(),
                   answers=a_spec_of(answers, **change))
    assert why in link.answers_refused
    x = torch.randn(256, 128, dtype=torch.float64)
    reply = link.send("echo", 1.0, encode((x,)))
    wait_done(reply)
    assert torch.equal(reply.result()[0], x) and reply.shared_bytes == 0
    assert answers.placed_bytes == 0  # the worker never used its arena: the master said it does not map it
    link.close()
    answers.close()


def worker_answering(slot: msgpack.ExtType) -> tuple[str, int]:
    """A worker end with the key whose answer to its first call is one tensor ``slot``, then stops."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        sock, _ = listener.accept()
        listener.close()
        sealed = Sealed(TcpTransport(sock), _worker_handshake(TcpTransport(sock), KEY))
        calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=sealed.read_calls, args=(CALLS, calls.put), daemon=True).start()
        calls.get(timeout=10)
        sealed.write(msgpack.packb([wire.VERSION, 0, slot], use_bin_type=True), [])
        time.sleep(0.5)
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[:2]


def shared_slot(offset, shape=(64, 64)) -> msgpack.ExtType:
    return msgpack.ExtType(4, msgpack.packb(["float32", list(shape), offset], use_bin_type=True))


@pytest.mark.parametrize("offset, mapped, why", [
    (4096, False, "no arena is mapped here"),  # the master maps no arena of this worker
    (0, True, "outside the"),  # over the check
    ((1 << 20) - 64, True, "outside the"),  # past the end
    (1 << 39, True, "outside the"),
])
def test_an_answer_s_shared_slot_the_master_cannot_take_breaks_the_connection(offset, mapped, why):
    answers = Arena(1 << 20)
    link = Channel(0, worker_answering(shared_slot(offset)), KEY, threading.Condition(),
                   answers=answers.spec() if mapped else None)
    reply = link.send("echo", 1.0, encode(()))
    wait_done(reply)
    with pytest.raises(WorkerLost, match=why):
        reply.result()
    link.close()
    answers.close()


def open_memory_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [name for name in found if "sazd-arena" in name]


def train_three_steps(cluster, dtype=torch.float64) -> tuple[nn.Module, nn.Module]:
    """Three DEU steps (SGD, momentum) of a coded MLP on ``cluster`` and of the plain one (a batch of 256:
    the answers are large enough for the shared-memory lane)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8)).to(dtype)
    coded = sazd.parallelize(
        nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8)).to(dtype),
        get_code("sazd", n=3, k=2), cluster, scheme="deu", min_features=8)
    coded.load_state_dict(plain.state_dict())
    optimizers = [torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9),
                  sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.05, momentum=0.9))]
    for step in range(3):
        x = torch.randn(256, 256, dtype=dtype, generator=torch.Generator().manual_seed(step))
        for model, opt in zip((plain, coded), optimizers, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    return plain, coded


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_workers_on_this_machine_train_through_the_arena_exactly_as_plain_pytorch(ray_session,
                                                                                       monkeypatch):
    with RayCluster(3, worker_timeout_s=60) as cluster:
        assert open_memory_files()  # the arena (and the map's own handle on it)
        plain, coded = train_three_steps(cluster)
        assert cluster.describe()["shared_memory_workers"] == 3
        assert cluster.describe()["shared_memory_answers"] == 3  # and their answers come back through theirs
        assert cluster.counters.bytes_through_memory > 0
        assert 0 < cluster.counters.bytes_from_memory <= cluster.counters.bytes_from_workers
        for (name, want), got in zip(plain.state_dict().items(), coded.state_dict().values(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    assert open_memory_files() == []  # closed with the cluster

    # a worker that cannot map it (elsewhere, or a forged description) says why and uses its socket
    real_spec = Arena.spec
    monkeypatch.setattr(Arena, "spec", lambda self: {**real_spec(self), "check": "00" * CHECK_BYTES})
    with RayCluster(3, worker_timeout_s=60) as cluster:
        plain_again, coded = train_three_steps(cluster)
        assert cluster.describe()["shared_memory_workers"] == 0
        assert cluster.describe()["shared_memory_answers"] == 0
        assert cluster.counters.bytes_through_memory == 0 == cluster.counters.bytes_from_memory
        assert all("its check differs" in info["shared_memory_refused"] for info in cluster._info)
        for (name, want), got in zip(plain_again.state_dict().items(), coded.state_dict().values(),
                                     strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)

    with RayCluster(1, worker_timeout_s=60, shared_memory=False) as cluster:
        assert open_memory_files() == [] and cluster.describe()["shared_memory_workers"] == 0
