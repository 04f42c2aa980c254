"""The path of one DEU update on Ray, measured: the sazd functions on the call stack when the update's
bytes are written to a worker's socket (master), read from it and applied (worker). It must be the
path docs/architecture.md draws, at most 12 functions in at most 6 files."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.runtime import channel
from sazd.runtime.worker import METHODS, SGDStep, Worker

SRC = Path(sazd.__file__).resolve().parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
KEY = b"k" * 32

MASTER = {
    ("parallel/context.py", "CodedContext.after_step"),
    ("parallel/schemes.py", "DEU.after_step"),
    ("parallel/context.py", "CodedContext.send"),
    ("runtime/ray/rounds.py", "Rounds.submit"),
    ("runtime/channel.py", "Channel.send"),
    ("runtime/channel.py", "Channel._pump"),
    ("runtime/transport.py", "TcpTransport.send_some"),
}
WORKER = {
    ("runtime/channel.py", "_answer"),
    ("runtime/channel.py", "Sealed.read_calls"),
    ("runtime/transport.py", "TcpTransport.receive_into"),
    ("runtime/worker.py", "Worker.call"),
    ("runtime/worker.py", "Worker.sgd"),
}


class StackTracer:
    """Records the sazd frames on the stack whenever one of ``calls`` (C functions) starts, while on."""

    def __init__(self, calls: set[str], threads: set[str] | None = None) -> None:
        self.calls = calls
        self.threads = threads  # only these threads' (by name), if given
        self.on = False
        self.seen: set[tuple[str, str]] = set()
        self.hits = 0

    def __call__(self, frame, event, arg):
        if self.on and event == "c_call" and getattr(arg, "__name__", None) in self.calls:
            if self.threads is not None and threading.current_thread().name not in self.threads:
                return
            self.hits += 1
            while frame is not None:
                path = Path(frame.f_code.co_filename).resolve()
                if path.is_relative_to(SRC):
                    self.seen.add((path.relative_to(SRC).as_posix(), frame.f_code.co_qualname))
                frame = frame.f_back


def test_master_side_of_a_deu_update_on_ray(ray_session):
    from sazd.runtime import make_cluster

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cluster = make_cluster("ray", 4, worker_timeout_s=60)
    try:
        coded = sazd.parallelize(model, get_code("sazd", 4, 2), cluster, scheme="deu", min_features=8)
        opt = sazd.coded_optimizer(torch.optim.SGD(coded.parameters(), lr=0.1, momentum=0.9))
        x = torch.randn(8, 16)
        coded(x).square().mean().backward()
        tracer = StackTracer({"sendmsg"})
        sys.setprofile(tracer)
        try:
            tracer.on = True
            opt.step()
        finally:
            tracer.on = False
            sys.setprofile(None)
        assert tracer.hits >= 1  # the update was written on this thread
        assert tracer.seen == MASTER
        coded(x)  # the workers applied it: the next round decodes
    finally:
        cluster.close()


def test_worker_side_of_a_deu_update():
    """The Ray actor serves ``Worker.call`` on ``channel.serve``; the same here, in this process: one
    thread reads the calls, another runs them."""
    tracer = StackTracer({"recv_into", "addmm_"}, threads={"sazd-channel-read", "sazd-channel-answer"})
    answered = threading.Condition()
    threading.setprofile(tracer)  # for the threads serve starts, up to the one answering the calls
    address = channel.serve("127.0.0.1", KEY, Worker(0).call, METHODS)
    link = channel.Channel(0, address, KEY, answered)

    def ask(method: str, *args):
        reply = link.send(method, 1.0, channel.encode(args))
        with answered:
            assert answered.wait_for(lambda: reply.done, timeout=30)
        return reply.result()

    try:
        step = SGDStep(lr=0.1, momentum=0.9)
        ask("load", {"w": torch.randn(6, 5)})  # answered: the answering thread has started
        threading.setprofile(None)
        ask("matmul", "w", torch.randn(5, 3))
        ask("sgd", [("w", step, torch.randn(3, 6), None)])
        tracer.on = True  # the second update has a momentum buffer: the steady state
        applied = ask("sgd", [("w", step, torch.randn(3, 6), None)])
        tracer.on = False
    finally:
        threading.setprofile(None)
        link.close()
    assert applied == 2
    assert tracer.hits >= 2  # bytes read and the update applied on the traced thread
    assert tracer.seen == WORKER


def test_the_path_is_short_and_drawn_in_the_architecture_doc():
    path = MASTER | WORKER
    assert len(path) <= 12 and len({file for file, _ in path}) <= 6
    text = DOC.read_text()
    drawn = text[text.index("## One DEU update"):]
    assert all(name in drawn for _, name in path), [n for _, n in path if n not in drawn]
