"""The Ray backend's data plane on its own: real TCP connections on 127.0.0.1, a worker end served
from a thread of this process, and hostile peers that break the protocol."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
import time

import pytest
import torch

from sazd.runtime.channel import (
    Channel,
    WorkerLost,
    WorkerRaised,
    _answer,
    _length,
    _prove_worker,
    _ready,
    _Slot,
    connect,
    encode,
    open_channels,
    recv_message,
    send_message,
    serve,
)

KEY = b"k" * 32


def echo(method: str, slowdown: float, args: tuple):
    if method == "raise":
        raise KeyError(args[0])
    if method == "unpicklable":
        err = RuntimeError("no pickle")
        err.payload = threading.Lock()  # an exception that cannot travel as it is
        raise err
    if method == "sleep":
        time.sleep(args[0])
    if method == "exit":
        raise SystemExit(3)
    if method == "unsendable":
        return lambda: 0
    return method, slowdown, args


def wait_done(replies, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(r.done for r in replies) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert all(r.done for r in replies)


def test_tensors_of_every_kind_arrive_exactly_and_in_order():
    link = Channel(0, serve("127.0.0.1", KEY, echo), KEY, threading.Condition())
    base = torch.randn(6, 8, dtype=torch.float64)
    args = ({"w": base.T, "half": base.to(torch.bfloat16), "ints": torch.arange(5)},
            [torch.tensor(3.5), torch.empty(0, 4), base[::2, 1:]], "text", None, 7)
    replies = [link.send(f"m{i}", 1.0 + i, encode(args)) for i in range(3)]
    wait_done(replies)
    for i, reply in enumerate(replies):
        method, slowdown, got = reply.result()
        assert (method, slowdown) == (f"m{i}", 1.0 + i)
        assert got[2:] == ("text", None, 7)
        for name, t in args[0].items():
            assert got[0][name].dtype == t.dtype and torch.equal(got[0][name], t)
        for have, want in zip(got[1], args[1], strict=True):
            assert have.shape == want.shape and torch.equal(have, want)
    link.close()


def test_a_raising_worker_hands_back_its_exception_and_keeps_serving():
    link = Channel(0, serve("127.0.0.1", KEY, echo), KEY, threading.Condition())
    bad = link.send("raise", 1.0, encode(("missing",)))
    odd, good = (link.send(method, 1.0, encode(())) for method in ("unpicklable", "ok"))
    wait_done([bad, odd, good])
    with pytest.raises(WorkerRaised) as raised:
        bad.result()
    assert isinstance(raised.value.cause, KeyError)
    with pytest.raises(WorkerRaised, match="RuntimeError: RuntimeError: no pickle"):
        odd.result()
    assert good.result()[0] == "ok"
    link.close()


def test_peers_without_the_key_or_that_stall_or_reset_do_not_keep_the_master_out(monkeypatch):
    monkeypatch.setattr("sazd.runtime.channel.HANDSHAKE_S", 3.0)
    address = serve("127.0.0.1", KEY, echo)
    staller = socket.create_connection(address)  # connects, never answers the challenge
    resetter = socket.create_connection(address)
    resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    resetter.close()  # a reset right away
    with pytest.raises(ConnectionError):
        connect(address, b"wrong" * 8)
    link = Channel(0, address, KEY, threading.Condition())
    reply = link.send("ok", 1.0, encode(()))
    wait_done([reply])
    assert reply.result()[0] == "ok"
    link.close()
    staller.close()


def test_what_cannot_be_sent_is_refused_before_sending_and_answers_that_cannot_are_errors():
    with pytest.raises(TypeError, match="cannot send tuple to a worker"):
        encode((torch.ones(2), lambda: 0))
    link = Channel(0, serve("127.0.0.1", KEY, echo), KEY, threading.Condition())
    unsendable, exiting, good = (link.send(m, 1.0, encode(())) for m in ("unsendable", "exit", "ok"))
    wait_done([unsendable, exiting, good])
    with pytest.raises(WorkerRaised, match="cannot send tuple to a worker"):
        unsendable.result()
    with pytest.raises(WorkerRaised, match="RuntimeError: SystemExit: 3"):  # never a SystemExit here
        exiting.result()
    assert good.result()[0] == "ok"
    link.close()


def fake_worker(answer) -> tuple[str, int]:
    """A worker end with the key that reads one call and answers it with ``answer(sock)``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        sock, _ = listener.accept()
        listener.close()
        _prove_worker(sock, KEY)
        sock = _ready(sock)
        recv_message(sock)
        answer(sock)
        time.sleep(0.5)
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[:2]


def framed(payload: bytes) -> bytes:
    return _length(len(payload)) + payload


@pytest.mark.parametrize("answer, why", [
    (lambda s: s.sendall(framed(pickle.dumps(((0, "x"), 3)))), "announces 3 tensors"),
    (lambda s: s.sendall(framed(b"not a pickle")), "connection lost"),
    (lambda s: s.sendall(_length(1 << 40)), "header of 1099511627776 bytes"),
    (lambda s: send_message(s, (7, None)), "malformed answer status 7"),
    (lambda s: send_message(s, (1, "not an exception")), "malformed answer status 1"),
    (lambda s: s.close(), "connection lost|sending failed"),
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


def test_a_tensor_frame_that_does_not_match_its_header_breaks_the_connection():
    def lie(sock):  # announces 4 float32 values, sends 3
        sock.sendall(framed(pickle.dumps(((0, _Slot(torch.float32, (4,))), 1))))
        sock.sendall(framed(torch.ones(3).numpy().tobytes()))

    link = Channel(0, fake_worker(lie), KEY, threading.Condition())
    reply = link.send("m", 1.0, encode(()))
    wait_done([reply])
    with pytest.raises(WorkerLost, match="12 bytes, its header says 16"):
        reply.result()


def test_closing_fails_unanswered_calls_at_once():
    link = Channel(0, serve("127.0.0.1", KEY, echo), KEY, threading.Condition())
    slow = link.send("sleep", 1.0, encode((5.0,)))
    link.close("closed by the test")
    assert slow.done
    with pytest.raises(WorkerLost, match="closed by the test"):
        slow.result()


def gated_worker(barrier: threading.Barrier) -> tuple[str, int]:
    """A worker that proves the key only once every worker sharing ``barrier`` has been connected."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        sock, _ = listener.accept()
        listener.close()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            sock.close()
            return
        _prove_worker(sock, KEY)
        _answer(_ready(sock), echo)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[:2]


def test_workers_are_connected_at_once_and_an_unreachable_one_fails_alone(monkeypatch):
    monkeypatch.setattr("sazd.runtime.channel.HANDSHAKE_S", 3.0)
    barrier = threading.Barrier(3, timeout=6.0)  # one at a time, the first handshake would time out
    addresses = {j: gated_worker(barrier) for j in range(3)}
    gone = socket.create_server(("127.0.0.1", 0))
    addresses[3] = gone.getsockname()[:2]
    gone.close()  # nothing listens there any more
    opened = open_channels(addresses, KEY, threading.Condition())
    assert isinstance(opened[3], OSError)
    links = [opened[j] for j in range(3)]
    assert all(isinstance(link, Channel) for link in links)
    replies = [link.send("ok", 1.0, encode((j,))) for j, link in enumerate(links)]
    wait_done(replies)
    assert [r.result() for r in replies] == [("ok", 1.0, (j,)) for j in range(3)]
    for link in links:
        link.close()
