"""The Ray backend's data plane on its own: real TCP connections on 127.0.0.1, a worker end served
from a thread of this process, hostile peers that break the protocol, and an on-path relay process
that injects, replays, reorders and alters messages after the handshake, with and without TLS."""

from __future__ import annotations

import hashlib
import os
import pickle
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from relay import Touch, relay
from sazd.runtime import wire
from sazd.runtime.channel import (
    MAX_PENDING,
    Channel,
    Sealed,
    WorkerLost,
    WorkerRaised,
    _worker_handshake,
    connect,
    encode,
    open_channels,
    serve,
)
from sazd.runtime.tls import ClusterCerts
from sazd.runtime.transport import TcpTransport
from sazd.runtime.worker import METHODS, SGDStep

KEY = b"k" * 32
CALLS = frozenset({"echo", "raise", "custom", "sleep", "exit", "unsendable", "ok"})


class CustomError(Exception):
    pass


def echo(method: str, slowdown: float, args: tuple):
    if method == "raise":
        raise KeyError(args[0])
    if method == "custom":
        raise CustomError("a class of the worker's own")
    if method == "sleep":
        time.sleep(args[0])
    if method == "exit":
        raise SystemExit(3)
    if method == "unsendable":
        return lambda: 0
    return method, slowdown, args


@pytest.fixture(scope="module")
def certs():
    return ClusterCerts.generate()


@pytest.fixture(params=["hmac", "tls"])
def mode(request, certs):
    """(worker identity, master identity) of the data plane: none for HMAC, certificates for TLS."""
    return (certs.worker, certs.master) if request.param == "tls" else (None, None)


def linked(mode, handle=echo, methods=CALLS):
    worker_id, master_id = mode
    return Channel(0, serve("127.0.0.1", KEY, handle, methods, worker_id), KEY, threading.Condition(),
                   master_id)


def wait_done(replies, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(r.done for r in replies) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert all(r.done for r in replies)


def test_tensors_records_and_scalars_arrive_exactly_and_in_order(mode):
    link = linked(mode)
    base = torch.randn(6, 8, dtype=torch.float64)
    args = ({"w": base.T, "half": base.to(torch.bfloat16), "ints": torch.arange(5), 3: True},
            [torch.tensor(3.5), torch.empty(0, 4), base[::2, 1:]], "text", None, 7, 2.5,
            SGDStep(lr=0.1, momentum=0.9, nesterov=True), ("nested", (1, [2.0])))
    replies = [link.send("echo", 1.0 + i, encode(args)) for i in range(3)]
    wait_done(replies)
    for i, reply in enumerate(replies):
        method, slowdown, got = reply.result()
        assert (method, slowdown) == ("echo", 1.0 + i)
        assert got[2:] == args[2:] and got[0][3] is True
        for name in ("w", "half", "ints"):
            assert got[0][name].dtype == args[0][name].dtype and torch.equal(got[0][name], args[0][name])
        for have, want in zip(got[1], args[1], strict=True):
            assert have.shape == want.shape and torch.equal(have, want)
    link.close()


def test_a_raising_worker_hands_back_type_and_message_and_keeps_serving(mode):
    link = linked(mode)
    bad, custom, exiting, unsendable, good = (
        link.send(m, 1.0, encode(a)) for m, a in
        (("raise", ("missing",)), ("custom", ()), ("exit", ()), ("unsendable", ()), ("ok", ())))
    wait_done([bad, custom, exiting, unsendable, good])
    with pytest.raises(WorkerRaised) as raised:
        bad.result()
    assert type(raised.value.cause) is KeyError and raised.value.cause.args == ("missing",)
    # a class the master does not know, or one that is not an Exception, comes back named, never built
    with pytest.raises(WorkerRaised, match="RuntimeError: CustomError: a class of the worker's own"):
        custom.result()
    with pytest.raises(WorkerRaised, match="RuntimeError: SystemExit: 3"):
        exiting.result()
    with pytest.raises(WorkerRaised, match="TypeError: a function cannot travel"):
        unsendable.result()
    assert good.result()[0] == "ok"
    link.close()


@pytest.mark.parametrize("value, why", [
    (lambda: 0, "a function cannot travel"),
    (object(), "a object cannot travel"),
    (Touch("/tmp/x"), "a Touch cannot travel"),
    ({(1, 2): torch.ones(1)}, ""),  # tuple keys travel
    (torch.ones(2, dtype=torch.uint16) if hasattr(torch, "uint16") else None, "dtype"),
    (1 << 70, "cannot pack"),
])
def test_what_cannot_travel_is_refused_before_sending(value, why):
    if value is None:
        pytest.skip("this torch has no uint16")
    if not why:
        assert encode((value,)).body
        return
    with pytest.raises(TypeError, match=why):
        encode((value,))


def test_the_closed_method_set_is_workers_public_methods_and_nothing_else():
    assert {"matmul", "load", "state", "sgd", "batch", "ping", "set_delay"} <= METHODS
    assert not any(m.startswith("_") for m in METHODS)
    assert "open_channel" not in METHODS  # the Ray actor's start-up call never comes over the channel
    assert "call" not in METHODS  # the dispatcher: a call of "call" would nest calls


def fake_worker(answer, mode=(None, None)) -> tuple[str, int]:
    """A worker end with the key that reads one call and answers with ``answer(sealed)``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        sock, _ = listener.accept()
        listener.close()
        link = TcpTransport(sock)
        keys = _worker_handshake(link, KEY)
        sealed = Sealed(link, keys)
        calls = queue.SimpleQueue()
        threading.Thread(target=sealed.read_calls, args=(CALLS, calls.put), daemon=True).start()
        calls.get(timeout=10)
        answer(sealed)
        time.sleep(0.5)
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[:2]


def raw_header(payload: bytes):
    return lambda sealed: sealed.write(payload, [])


@pytest.mark.parametrize("answer, why", [
    (raw_header(pickle.dumps((0, "x"))), "not a message of ours"),
    (raw_header(wire._packb([wire.VERSION, 7, None])), "malformed answer"),
    (raw_header(wire._packb([wire.VERSION + 1, 0, None])), "malformed answer"),
    (raw_header(wire._packb([wire.VERSION, 1, "not a pair"])), "malformed error answer"),
    (raw_header(wire._packb([wire.VERSION, 0, __import__("msgpack").ExtType(9, b"")])), "unknown extension"),
    (raw_header(wire._packb([wire.VERSION, 0, __import__("msgpack").ExtType(3, wire._packb(
        ["Touch", ["/tmp/x"]]))])), "not a registered record"),
    (raw_header(wire._packb([wire.VERSION, 0, __import__("msgpack").ExtType(2, wire._packb(
        ["object", [1]]))])), "malformed tensor slot"),
    (lambda sealed: sealed.link.send(b"\xff\xff\xff\xff"), "header of 4294967295 bytes"),
    (lambda sealed: sealed.link.close(), "connection lost|sending failed"),
])
def test_a_malformed_answer_breaks_the_connection_and_fails_every_waiting_call(answer, why):
    link = Channel(0, fake_worker(answer), KEY, threading.Condition())
    replies = [link.send("m", 1.0, encode((torch.ones(3),))) for _ in range(3)]
    wait_done(replies)
    for reply in replies:
        with pytest.raises(WorkerLost, match=why):
            reply.result()
    late = link.send("m", 1.0, encode(()))  # a broken channel answers at once
    assert late.done and isinstance(late.error, WorkerLost)


def test_a_pickled_answer_is_never_unpickled(tmp_path):
    touched = tmp_path / "touched"
    link = Channel(0, fake_worker(raw_header(pickle.dumps(Touch(str(touched))))), KEY, threading.Condition())
    reply = link.send("m", 1.0, encode(()))
    wait_done([reply])
    assert isinstance(reply.error, WorkerLost) and not touched.exists()


def test_closing_fails_unanswered_calls_at_once(mode):
    link = linked(mode)
    slow = link.send("sleep", 1.0, encode((5.0,)))
    link.close("closed by the test")
    assert slow.done
    with pytest.raises(WorkerLost, match="closed by the test"):
        slow.result()


# ---------------------------------------------------------------------- hostile handshakes
def test_a_master_without_the_key_is_refused_and_the_worker_keeps_waiting(mode):
    worker_id, master_id = mode
    address = serve("127.0.0.1", KEY, echo, CALLS, worker_id)
    with pytest.raises(ConnectionError):
        connect(address, b"wrong" * 8, master_id)
    link = Channel(0, address, KEY, threading.Condition(), master_id)
    reply = link.send("ok", 1.0, encode(()))
    wait_done([reply])
    assert reply.result()[0] == "ok"
    link.close()


def test_a_fake_worker_learns_no_proof_of_the_master():
    """The master speaks first only with a nonce, and proves the key only to a peer that proved it."""
    listener = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []

    def fake() -> None:
        sock, _ = listener.accept()
        heard.append(sock.recv(1024))
        sock.sendall(os.urandom(64))  # a nonce and a made-up proof
        sock.settimeout(5)
        try:
            while data := sock.recv(1024):
                heard.append(data)
        except OSError:
            pass
        sock.close()

    thread = threading.Thread(target=fake, daemon=True)
    thread.start()
    with pytest.raises(ConnectionError, match="does not hold this worker's key"):
        connect(listener.getsockname()[:2], KEY)
    thread.join(10)
    assert [len(h) for h in heard] == [32]  # the master's nonce, then nothing


def test_the_handshake_is_bounded_as_a_whole_not_per_byte(monkeypatch):
    monkeypatch.setattr("sazd.runtime.channel.HANDSHAKE_S", 1.0)
    address = serve("127.0.0.1", KEY, echo, CALLS)
    drip = socket.create_connection(address)  # a nonce, one byte every 0.2 s: 6.4 s in all
    closed = False
    for _ in range(32):
        try:
            drip.sendall(b"x")
            time.sleep(0.2)
            if drip.recv(1, socket.MSG_DONTWAIT) == b"":
                closed = True
                break
        except BlockingIOError:
            continue
        except OSError:
            closed = True
            break
    assert closed  # dropped while still dripping
    drip.close()


def test_many_stalled_peers_are_capped_and_the_master_still_gets_in(monkeypatch):
    monkeypatch.setattr("sazd.runtime.channel.HANDSHAKE_S", 1.0)
    threads_before = threading.active_count()
    address = serve("127.0.0.1", KEY, echo, CALLS)
    stalled = [socket.create_connection(address) for _ in range(3 * MAX_PENDING)]
    time.sleep(0.3)
    # admitted peers hold a thread and a watchdog each; the rest wait in the kernel's backlog
    assert threading.active_count() - threads_before <= 2 * MAX_PENDING + 2
    for sock in stalled:  # each is dropped in its turn, within a handshake's bound of its admission
        sock.settimeout(15)
        assert sock.recv(1) == b""
    link = Channel(0, address, KEY, threading.Condition())
    reply = link.send("ok", 1.0, encode(()))
    wait_done([reply])
    assert reply.result()[0] == "ok"
    link.close()
    for sock in stalled:
        sock.close()


FD_SCRIPT = """
import resource, sys, threading, time
from sazd.runtime import channel
channel.HANDSHAKE_S = 1.0
address = channel.serve("127.0.0.1", b"k" * 32, lambda m, s, a: "ok", frozenset({"ok"}))
import hashlib
import os
opened = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(address[1], flush=True)
time.sleep(30)
"""


def test_running_out_of_descriptors_pauses_the_listener_but_never_closes_it():
    proc = subprocess.Popen([sys.executable, "-c", FD_SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        port = int(proc.stdout.readline())
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]  # beyond its limit
        time.sleep(1.5)
        for sock in flood:
            sock.close()
        link = Channel(0, ("127.0.0.1", port), KEY, threading.Condition())
        reply = link.send("ok", 1.0, encode(()))
        wait_done([reply])
        assert reply.result() == "ok"
        link.close()
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_workers_are_connected_at_once_and_an_unreachable_one_fails_alone():
    addresses = {j: serve("127.0.0.1", KEY, echo, CALLS) for j in range(3)}
    gone = socket.create_server(("127.0.0.1", 0))
    addresses[3] = gone.getsockname()[:2]
    gone.close()  # nothing listens there any more
    opened = open_channels(addresses, dict.fromkeys(addresses, KEY), threading.Condition())
    assert isinstance(opened[3], ConnectionError)
    links = [opened[j] for j in range(3)]
    assert all(isinstance(link, Channel) for link in links)
    replies = [link.send("ok", 1.0, encode((j,))) for j, link in enumerate(links)]
    wait_done(replies)
    assert [r.result() for r in replies] == [("ok", 1.0, (j,)) for j in range(3)]
    for link in links:
        link.close()


# ------------------------------------------------------------------------- the on-path relay
@pytest.mark.parametrize("action", ["inject", "replay", "reorder", "flip", "drop"])
def test_tampering_on_the_path_breaks_the_connection_and_runs_no_code(mode, action, tmp_path):
    worker_id, master_id = mode
    ran: list[str] = []
    touched = tmp_path / "touched"

    def handle(method, slowdown, args):
        ran.append(method)
        return echo(method, slowdown, args)

    target = serve("127.0.0.1", KEY, handle, CALLS, worker_id)
    framing = "tls" if master_id else "sazd"
    with relay(target, framing, action, str(tmp_path / "seen"), str(touched)) as path:
        link = Channel(0, path.address, KEY, threading.Condition(), master_id)
        first = link.send("ok", 1.0, encode((torch.ones(4),)))
        wait_done([first])
        assert first.result()[0] == "ok"
        path.arm()
        time.sleep(0.2)
        x = torch.randn(64, 64)
        replies = [link.send("echo", 1.0, encode((x,))) for _ in range(2)]
        later = link.send("echo", 1.0, encode((x,)))
        wait_done([*replies, later], timeout_s=20)
        # with "drop" the first call is lost and the second fails its sequence number
        assert all(isinstance(r.error, WorkerLost) for r in [*replies, later][-2:])
        assert all(isinstance(r.error, WorkerLost) or torch.equal(r.result()[2][0], x)
                   for r in [*replies, later])
    assert not touched.exists()
    # only a replayed plain message lets its (authentic) original run first; nothing tampered runs
    assert ran.count("echo") == (1 if (action, framing) == ("replay", "sazd") else 0)


def test_with_tls_no_tensor_byte_crosses_the_path_in_clear(certs, tmp_path):
    secret = torch.randn(1024, dtype=torch.float64)
    needle = secret.numpy().tobytes()[:64]
    seen = {}
    for name, worker_id, master_id in (("hmac", None, None), ("tls", certs.worker, certs.master)):
        target = serve("127.0.0.1", KEY, echo, CALLS, worker_id)
        with relay(target, "sazd", "none", str(tmp_path / name), "/nonexistent") as path:
            link = Channel(0, path.address, KEY, threading.Condition(), master_id)
            reply = link.send("echo", 1.0, encode((secret,)))
            wait_done([reply])
            assert torch.equal(reply.result()[2][0], secret)
            link.close()
            time.sleep(0.2)
            seen[name] = path.seen()
    assert needle in seen["hmac"]  # the check can fail: without TLS the tensors are in clear
    assert len(seen["tls"]) > len(needle) and needle not in seen["tls"]
    assert b"echo" not in seen["tls"]  # nor the method's name


def test_the_file_descriptor_limit_is_restored():
    """The descriptor test changed only its own child's limit."""
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64


# ------------------------------------------------------------------------------- certificates
def test_a_master_with_another_cluster_s_certificates_is_refused(certs):
    other = ClusterCerts.generate()
    address = serve("127.0.0.1", KEY, echo, CALLS, certs.worker)
    with pytest.raises(ConnectionError):
        connect(address, KEY, other.master)  # the right key, but not this cluster's CA
    with pytest.raises(ConnectionError):
        connect(address, KEY)  # no TLS at all
    link = Channel(0, address, KEY, threading.Condition(), certs.master)
    reply = link.send("ok", 1.0, encode(()))
    wait_done([reply])
    assert reply.result()[0] == "ok"
    link.close()


def write_certs(certs: ClusterCerts, folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("ca.pem", certs.master.ca), ("master.pem", certs.master.cert),
                       ("master.key", certs.master.key), ("worker.pem", certs.worker.cert),
                       ("worker.key", certs.worker.key)):
        (folder / name).write_text(text)
    return folder


def test_a_user_s_certificate_directory_is_read_and_checked(certs, tmp_path):
    folder = write_certs(certs, tmp_path / "certs")
    loaded = ClusterCerts.resolve(folder)
    assert loaded.master == certs.master and loaded.source == str(folder)
    assert ClusterCerts.resolve(None) is None and ClusterCerts.resolve(False) is None
    (folder / "worker.key").unlink()
    with pytest.raises(ValueError, match=r"missing worker\.key"):
        ClusterCerts.resolve(folder)
    (folder / "worker.key").write_text("not a key")
    with pytest.raises(ValueError, match="worker certificate or key is unusable"):
        ClusterCerts.resolve(folder)
    with pytest.raises(ValueError, match="not a directory"):
        ClusterCerts.resolve(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="tls must be None, False, True or a directory"):
        ClusterCerts.resolve(3)


def test_the_in_process_backend_refuses_tls():
    from sazd.runtime import make_cluster

    with pytest.raises(ValueError, match="in-process backend has no connections"):
        make_cluster("inproc", 3, tls=True)
    make_cluster("inproc", 3, tls=False).close()


def test_a_worker_stalled_mid_answer_holds_up_no_other_connection(mode):
    """The master reads every connection in one thread, as bytes arrive: a peer that sends half an
    answer and stops delays nobody else's answers, and its own call stays unanswered, not wrong."""
    stalled = Channel(1, fake_worker(lambda sealed: sealed.link.send(b"\x00\x00\x10\x00" + b"x" * 100)),
                      KEY, threading.Condition())
    hung = stalled.send("m", 1.0, encode(()))
    time.sleep(0.2)  # its half answer has arrived
    link = linked(mode)
    replies = [link.send("echo", 1.0, encode((i,))) for i in range(5)]
    wait_done(replies, timeout_s=5.0)
    assert [r.result()[2] for r in replies] == [(i,) for i in range(5)]
    assert not hung.done
    stalled.close()
    assert isinstance(hung.error, WorkerLost)
    link.close()


def test_a_call_larger_than_the_socket_buffers_arrives_exactly_and_the_caller_does_not_wait(mode):
    """A call the socket cannot take at once is finished by the master's hub; the caller's ``send``
    returns while the worker is still busy (the hub finishes the write), and every byte arrives."""
    from sazd.runtime.channel import hub

    started = threading.Event()

    def slow_echo(method, slowdown, args):
        started.set()
        time.sleep(0.5)  # busy: the big call waits in the socket's buffers meanwhile
        return echo(method, slowdown, args)

    link = linked(mode, handle=slow_echo)
    first = link.send("echo", 1.0, encode((0,)))
    assert started.wait(5.0)
    big = torch.randn(8 << 20, generator=torch.Generator().manual_seed(0))  # 32 MB
    before = hub().stats.handed_to_hub
    reply = link.send("echo", 1.0, encode((big,)))
    assert hub().stats.handed_to_hub == before + 1 and not reply.done  # the hub finishes the write
    wait_done([first, reply], timeout_s=30.0)
    assert torch.equal(reply.result()[2][0], big)
    link.close()


def test_a_worker_busy_past_the_user_timeout_with_a_full_socket_keeps_its_connection(mode, monkeypatch):
    """The worker reads calls while it computes: more than its socket holds, queued behind a call that
    runs 4x longer than TCP_USER_TIMEOUT, neither cut the connection (a slow worker is not a lost
    one) nor change what arrives."""
    from sazd.runtime import transport

    monkeypatch.setattr(transport, "USER_TIMEOUT_MS", 250)
    started, release = threading.Event(), threading.Event()

    def blocked_first(method, slowdown, args):
        if method == "sleep":
            started.set()
            release.wait(30.0)
        return echo(method, slowdown, args)

    link = linked(mode, handle=blocked_first)
    first = link.send("sleep", 1.0, encode((0,)))
    assert started.wait(5.0)
    tensors = [torch.full((1 << 20,), float(i)) for i in range(12)]  # 48 MB behind the busy call
    replies = [link.send("echo", 1.0, encode((t,))) for t in tensors]
    time.sleep(1.0)  # 4x the user timeout with the worker busy
    release.set()
    wait_done([first, *replies], timeout_s=60.0)
    for reply, t in zip(replies, tensors, strict=True):
        assert torch.equal(reply.result()[2][0], t)
    link.close()


def test_a_tensor_shared_by_the_calls_of_one_submit_is_hashed_once():
    shared, own = torch.randn(64, 8), [torch.randn(4), torch.randn(4)]
    digests: dict = {}
    calls = [encode(("w", shared, mine), digests) for mine in own]
    assert calls[0].digests[0] is calls[1].digests[0]  # one hash of the shared bytes
    assert calls[0].digests[1] != calls[1].digests[1]
    for call, mine in zip(calls, own, strict=True):
        assert call.digests == tuple(hashlib.sha256(t.numpy().tobytes()).digest() for t in (shared, mine))
