"""The data plane of the Ray backend: one direct, authenticated connection per worker.

Ray starts, places, watches and kills the workers; the calls of training and their answers travel
over one TCP connection between the master and each worker. An actor call through Ray's task path
and object store costs several milliseconds of scheduling and serialisation on each side, paid by
every worker in every round; a message on an open connection costs a write and a read.

- The worker listens on its node's address (``serve``); the master connects (``Channel``). Both
  ends prove they know the cluster's random key (``multiprocessing.connection``'s HMAC challenge)
  before anything is read, so a message's header is unpickled only from a peer of this cluster.
- A message is a pickled header in which every tensor is a ``_Slot`` (dtype, shape), then one raw
  byte frame per tensor, written from the tensor's memory and received straight into a fresh
  tensor's memory (one copy each way, by the kernel). What arrives is checked against the header:
  slot count, dtypes, shapes and byte counts; a mismatch breaks the connection.
- Calls to one worker are answered in the order sent. Each end reads and writes in threads of its
  own, so a large message in one direction never waits on the other, and the master's waits stay
  bounded by its own clock: a worker that dies or is killed breaks its connection, and every
  unanswered call fails with ``WorkerLost``; an exception raised by the worker's code comes back as
  ``WorkerRaised`` holding it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import torch

from sazd.runtime.cluster import iter_tensors, map_tensors

_MAX_TENSOR_BYTES = 1 << 40  # a header announcing more than this is not ours
_MAX_HEADER_BYTES = 1 << 26  # headers hold names, numbers and tensor slots: a few KB
_LENGTH = struct.Struct("!Q")  # the length prefix of every frame


class WorkerLost(Exception):
    """The connection to the worker broke: it died, was killed, or its node was lost."""


class WorkerRaised(Exception):
    """The worker's code raised ``cause`` while answering the call."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a message: its frame follows the header, in slot order."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t``, as a writable view of its memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _length(n: int) -> bytes:
    return _LENGTH.pack(n)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (straight into its memory: no intermediate buffer)."""
    while view.nbytes:
        got = sock.recv_into(view)
        if got == 0:
            raise EOFError("connection closed")
        view = view[got:]


def _recv_frame_length(sock: socket.socket) -> int:
    prefix = bytearray(_LENGTH.size)
    _recv_into(sock, memoryview(prefix))
    return _LENGTH.unpack(prefix)[0]


def send_message(sock: socket.socket, obj: Any) -> None:
    """Write ``obj`` (tensors inside tuples, lists and dicts travel as raw bytes): a length-prefixed
    header, then each tensor's bytes, length-prefixed, written from the tensor's own memory."""
    tensors: list[torch.Tensor] = []

    def slot(t: torch.Tensor) -> _Slot:
        t = t.detach().cpu().contiguous()
        tensors.append(t)
        return _Slot(t.dtype, tuple(t.shape))

    header = pickle.dumps((map_tensors(obj, slot), len(tensors)), protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_length(len(header)) + header)
    for t in tensors:
        raw = _raw(t)
        sock.sendall(_length(raw.nbytes))
        if raw.nbytes:
            sock.sendall(raw)


def recv_message(sock: socket.socket) -> Any:
    """Read one message of ``send_message``, checking every frame against its header."""
    size = _recv_frame_length(sock)
    if size > _MAX_HEADER_BYTES:
        raise ValueError(f"message header of {size} bytes (at most {_MAX_HEADER_BYTES})")
    header = bytearray(size)
    _recv_into(sock, memoryview(header))
    header, count = pickle.loads(header)
    slots = list(iter_tensors(header, _Slot))
    if not isinstance(count, int) or count != len(slots):
        raise ValueError(f"message announces {count!r} tensors but its header holds {len(slots)}")

    def fill(slot: _Slot) -> torch.Tensor:
        if not (isinstance(slot.dtype, torch.dtype) and isinstance(slot.shape, tuple)
                and all(isinstance(s, int) and s >= 0 for s in slot.shape)
                and slot.nbytes() <= _MAX_TENSOR_BYTES):
            raise ValueError(f"message holds a malformed tensor header {slot!r}")
        got = _recv_frame_length(sock)
        if got != slot.nbytes():
            raise ValueError(f"tensor frame of {got} bytes, its header says {slot.nbytes()}")
        out = torch.empty(slot.shape, dtype=slot.dtype)
        _recv_into(sock, _raw(out))
        return out

    return map_tensors(header, fill, _Slot)


def _take_socket(conn: Connection) -> socket.socket:
    """The authenticated connection's socket, for raw reads and writes (``conn`` is closed), with
    small frames sent at once (a header is followed by more frames: Nagle would hold it)."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    sock.setblocking(True)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# --------------------------------------------------------------------------------------- worker end
def serve(host: str, authkey: bytes, handle: Callable[[str, float, tuple], Any]) -> tuple[str, int]:
    """Listen on ``host`` for the master; answer each call ``(method, slowdown, args)`` with
    ``(0, handle(...))`` or ``(1, exception)``, in order. Returns the address to connect to."""
    listener = Listener((host, 0), authkey=authkey)

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError:  # closed
                return
            except Exception:  # a peer without the key: wait for ours
                continue
            listener.close()
            _answer(_take_socket(conn), handle)
            return

    threading.Thread(target=accept, name="sazd-channel", daemon=True).start()
    return listener.address


def _answer(conn: socket.socket, handle: Callable[[str, float, tuple], Any]) -> None:
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # keeps reading while the calls run, so the master never blocks writing
        try:
            while True:
                inbox.put(recv_message(conn))
        except Exception:  # closed, or not a message of ours
            inbox.put(None)

    threading.Thread(target=read, name="sazd-channel-read", daemon=True).start()
    while (call := inbox.get()) is not None:
        try:
            method, slowdown, args = call
            answer = (0, handle(method, slowdown, args))
        except BaseException as err:  # the master decides what a raising worker means
            answer = (1, _portable(err))
        try:
            send_message(conn, answer)
        except Exception:
            break
    conn.close()


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


# --------------------------------------------------------------------------------------- master end
class Reply:
    """The answer to one call; ``done`` once it arrived or the connection broke."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Exception | None = None

    def result(self) -> Any:
        """The value (the reply must be done); raises ``WorkerLost`` or ``WorkerRaised``."""
        if self.error is not None:
            raise self.error
        return self.value


class Channel:
    """The master's connection to one worker. ``notify`` is notified whenever a reply is done."""

    def __init__(self, worker: int, address: tuple[str, int], authkey: bytes,
                 notify: threading.Condition) -> None:
        self.worker = worker
        self._notify = notify
        self._pending: deque[Reply] = deque()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken: str | None = None
        self._conn = _take_socket(Client(tuple(address), authkey=authkey))  # the caller bounds this
        self._writer = threading.Thread(target=self._write, name=f"sazd-send-{worker}", daemon=True)
        self._writer.start()
        threading.Thread(target=self._read, name=f"sazd-recv-{worker}", daemon=True).start()

    def send(self, method: str, slowdown: float, args: tuple) -> Reply:
        """Queue one call; its reply is filled in when the answer arrives. ``args`` must not change
        afterwards (the write happens in another thread)."""
        reply = Reply()
        with self._notify:
            if self.broken is not None:
                reply.done, reply.error = True, WorkerLost(f"worker {self.worker}: {self.broken}")
                return reply
            self._pending.append(reply)
        self._outbox.put((method, slowdown, args))
        return reply

    def close(self, why: str = "connection closed by the master") -> None:
        self._break(why)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                send_message(self._conn, message)
            except Exception as err:
                self._break(f"sending failed ({type(err).__name__}: {err})")
                return

    def _read(self) -> None:
        self._receive()
        self._writer.join(5.0)  # woken by the shutdown in _break
        with contextlib.suppress(Exception):
            self._conn.close()

    def _receive(self) -> None:
        while True:
            try:
                status, value = recv_message(self._conn)
                if status not in (0, 1) or (status == 1 and not isinstance(value, BaseException)):
                    raise ValueError(f"malformed answer status {status!r}")
            except Exception as err:
                self._break(f"connection lost ({type(err).__name__}: {err})")
                return
            with self._notify:
                if not self._pending:
                    break
                reply = self._pending.popleft()
                if status == 0:
                    reply.value = value
                else:
                    reply.error = WorkerRaised(value)
                reply.done = True
                self._notify.notify_all()
        self._break("answer to no call")

    def _break(self, why: str) -> None:
        """Fail every unanswered call and wake both threads; the reader closes the connection."""
        with self._notify:
            if self.broken is None:
                self.broken = why
            for reply in self._pending:
                reply.done, reply.error = True, WorkerLost(f"worker {self.worker}: {self.broken}")
            self._pending.clear()
            self._notify.notify_all()
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        self._outbox.put(None)
