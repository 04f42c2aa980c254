"""The data plane of the Ray backend: one direct, authenticated connection per worker.

Ray starts, places, watches and kills the workers; the calls of training and their answers travel
over one TCP connection between the master and each worker. An actor call through Ray's task path
and object store costs several milliseconds of scheduling and serialisation on each side, paid by
every worker in every round; a message on an open connection costs a write and a read.

- The worker listens on its node's address (``serve``); the master connects (``Channel``). Both
  ends prove they know the cluster's random key (an HMAC challenge each way, within
  ``HANDSHAKE_S``) before anything is unpickled, so a header is read only from a peer of this
  cluster. A peer without the key, or one that stalls, is dropped and the worker keeps waiting.
- A message is a pickled header in which every tensor is a ``_Slot`` (dtype, shape), then one raw
  byte frame per tensor, written from the tensor's memory and received straight into a fresh
  tensor's memory (one copy each way, by the kernel). What arrives is checked against the header:
  slot count, dtypes, shapes and byte counts; a mismatch breaks the connection.
- A call's arguments are encoded on the caller's thread (``encode``): what cannot be sent is a
  TypeError at ``submit``, before any worker is asked.
- Calls to one worker are answered in the order sent. Each end reads and writes in threads of its
  own, so a large message in one direction never waits on the other, and the master's waits stay
  bounded by its own clock: a worker that dies or is killed breaks its connection, and every
  unanswered call fails with ``WorkerLost``; an exception raised by the worker's code comes back as
  ``WorkerRaised`` holding it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import pickle
import queue
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sazd.runtime.cluster import iter_tensors, map_tensors

_MAX_TENSOR_BYTES = 1 << 40  # a header announcing more than this is not ours
_MAX_HEADER_BYTES = 1 << 26  # headers hold names, numbers and tensor slots: a few KB
_LENGTH = struct.Struct("!Q")  # the length prefix of every frame
HANDSHAKE_S = 10.0  # bound on connecting and proving the key, each side


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
        return math.prod(self.shape) * self.dtype.itemsize


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


@dataclass(frozen=True)
class Encoded:
    """A message ready to write: its header (tensors replaced by slots) and the tensors, in order."""

    header: Any
    tensors: tuple[torch.Tensor, ...]


def encode(obj: Any) -> Encoded:
    """``obj`` split into a header and its tensors; TypeError if the header cannot be pickled."""
    tensors: list[torch.Tensor] = []

    def slot(t: torch.Tensor) -> _Slot:
        t = t.detach().cpu().contiguous()
        tensors.append(t)
        return _Slot(t.dtype, tuple(t.shape))

    header = map_tensors(obj, slot)
    try:
        pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        raise TypeError(f"cannot send {type(obj).__name__} to a worker: {type(err).__name__}: {err}") \
            from None
    return Encoded(header, tuple(tensors))


def write(sock: socket.socket, message: Encoded) -> None:
    """A length-prefixed header, then each tensor's bytes, length-prefixed, written from the
    tensor's own memory."""
    header = pickle.dumps((message.header, len(message.tensors)), protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_length(len(header)) + header)
    for t in message.tensors:
        raw = _raw(t)
        sock.sendall(_length(raw.nbytes))
        if raw.nbytes:
            sock.sendall(raw)


def send_message(sock: socket.socket, obj: Any) -> None:
    """Write ``obj`` (tensors inside tuples, lists and dicts travel as raw bytes)."""
    write(sock, encode(obj))


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


def _proof(authkey: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(authkey, role + nonce, hashlib.sha256).digest()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray(size)
    _recv_into(sock, memoryview(out))
    return bytes(out)


def _ready(sock: socket.socket) -> socket.socket:
    """Blocking from now on, small frames sent at once (Nagle would hold a header followed by more)."""
    sock.settimeout(None)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _prove_worker(sock: socket.socket, authkey: bytes) -> None:
    """Worker side: challenge the peer, check its proof, answer its challenge (within HANDSHAKE_S)."""
    sock.settimeout(HANDSHAKE_S)
    mine = os.urandom(32)
    sock.sendall(mine)
    proof, theirs = _recv_exactly(sock, 32), _recv_exactly(sock, 32)
    if not hmac.compare_digest(proof, _proof(authkey, b"master", mine)):
        raise ConnectionError("the peer does not hold the cluster's key")
    sock.sendall(_proof(authkey, b"worker", theirs))


def connect(address: tuple[str, int], authkey: bytes) -> socket.socket:
    """Master side: connect to a worker and prove the key both ways, each step within HANDSHAKE_S."""
    sock = socket.create_connection(tuple(address), timeout=HANDSHAKE_S)
    try:
        challenge = _recv_exactly(sock, 32)
        mine = os.urandom(32)
        sock.sendall(_proof(authkey, b"master", challenge) + mine)
        proof = _recv_exactly(sock, 32)
    except (OSError, EOFError) as err:
        sock.close()
        raise ConnectionError(f"no handshake with the worker at {tuple(address)}: "
                              f"{type(err).__name__}: {err}") from None
    if not hmac.compare_digest(proof, _proof(authkey, b"worker", mine)):
        sock.close()
        raise ConnectionError(f"the worker at {tuple(address)} does not hold the cluster's key")
    return _ready(sock)


# --------------------------------------------------------------------------------------- worker end
def serve(host: str, authkey: bytes, handle: Callable[[str, float, tuple], Any]) -> tuple[str, int]:
    """Listen on ``host`` for the master; answer each call ``(method, slowdown, args)`` with
    ``(0, handle(...))`` or ``(1, exception)``, in order. Returns the address to connect to.

    Each peer proves the key in a thread of its own, so one that stalls or resets delays nobody;
    the first that proves it is the master, and the listener closes."""
    listener = socket.create_server((host, 0))
    claimed = threading.Lock()

    def admit(sock: socket.socket) -> None:
        try:
            _prove_worker(sock, authkey)
        except Exception:  # no key, stalled, reset: not the master
            sock.close()
            return
        if not claimed.acquire(blocking=False):  # another peer with the key came first
            sock.close()
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        listener.close()
        _answer(_ready(sock), handle)

    def accept() -> None:
        while not claimed.locked():
            try:
                sock, _ = listener.accept()
            except (ConnectionAbortedError, ConnectionResetError):  # a peer gone before we took it
                continue
            except OSError:  # closed: the master is admitted
                return
            threading.Thread(target=admit, args=(sock,), name="sazd-channel-admit", daemon=True).start()

    threading.Thread(target=accept, name="sazd-channel", daemon=True).start()
    return listener.getsockname()[:2]


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
            answer = encode((0, handle(method, slowdown, args)))
        except BaseException as err:  # raised, or an answer that cannot be sent: the master decides
            answer = encode((1, _portable(err)))
        try:
            write(conn, answer)
        except Exception:
            break
    with contextlib.suppress(OSError):  # wakes our reader and tells the master at once
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def _portable(err: BaseException) -> Exception:
    """``err`` if it is an Exception that survives pickling, else a RuntimeError naming it (a worker
    never hands the master a SystemExit or KeyboardInterrupt)."""
    try:
        if isinstance(err, Exception):
            pickle.loads(pickle.dumps(err))
            return err
    except Exception:
        pass
    return RuntimeError(f"{type(err).__name__}: {err}")


# --------------------------------------------------------------------------------------- master end
class Reply:
    """The answer to one call; ``done`` once it arrived or the connection broke."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Exception | None = None

    def fail(self, error: Exception) -> None:
        self.error = error  # before done: a reader that sees done sees the error
        self.done = True

    def result(self) -> Any:
        """The value (the reply must be done); raises ``WorkerLost`` or ``WorkerRaised``."""
        if self.error is not None:
            raise self.error
        return self.value


class Channel:
    """The master's connection to one worker. ``notify`` is notified whenever a reply is done."""

    def __init__(self, worker: int, address: tuple[str, int], authkey: bytes,
                 notify: threading.Condition) -> None:
        """Connect and prove the key (bounded by ``HANDSHAKE_S`` per step); raises OSError or
        ConnectionError when the worker cannot be reached."""
        self.worker = worker
        self._notify = notify
        self._pending: deque[Reply] = deque()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken: str | None = None
        self._conn = connect(address, authkey)
        self._writer = threading.Thread(target=self._write, name=f"sazd-send-{worker}", daemon=True)
        self._writer.start()
        threading.Thread(target=self._read, name=f"sazd-recv-{worker}", daemon=True).start()

    def send(self, method: str, slowdown: float, args: Encoded) -> Reply:
        """Queue one call (``args`` from ``encode``); its reply is filled in when the answer arrives.
        The tensors of ``args`` must not change afterwards (the write happens in another thread)."""
        reply = Reply()
        message = Encoded((method, slowdown, args.header), args.tensors)
        with self._notify:
            if self.broken is not None:
                reply.fail(WorkerLost(f"worker {self.worker}: {self.broken}"))
                return reply
            self._pending.append(reply)
        self._outbox.put(message)
        return reply

    def close(self, why: str = "connection closed by the master") -> None:
        self._break(why)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                write(self._conn, message)
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
                if status not in (0, 1) or (status == 1 and not isinstance(value, Exception)):
                    raise ValueError(f"malformed answer status {status!r}")
            except Exception as err:
                self._break(f"connection lost ({type(err).__name__}: {err})")
                return
            with self._notify:
                if not self._pending:
                    break
                reply = self._pending.popleft()
                if status == 0:
                    reply.value, reply.done = value, True
                else:
                    reply.fail(WorkerRaised(value))
                self._notify.notify_all()
        self._break("answer to no call")

    def _break(self, why: str) -> None:
        """Fail every unanswered call and wake both threads; the reader closes the connection."""
        with self._notify:
            if self.broken is None:
                self.broken = why
            for reply in self._pending:
                reply.fail(WorkerLost(f"worker {self.worker}: {self.broken}"))
            self._pending.clear()
            self._notify.notify_all()
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        self._outbox.put(None)


def open_channels(addresses: dict[int, tuple[str, int]], authkey: bytes,
                  notify: threading.Condition) -> dict[int, Channel | Exception]:
    """A ``Channel`` to each worker, connected all at once: starting n workers takes one handshake's
    bound, not n of them. Each worker's OSError or ConnectionError is returned in its place."""
    opened: dict[int, Channel | Exception] = {}

    def open_one(worker: int, address: tuple[str, int]) -> None:
        try:
            opened[worker] = Channel(worker, address, authkey, notify)
        except (OSError, ConnectionError) as err:
            opened[worker] = err

    threads = [threading.Thread(target=open_one, args=item, name=f"sazd-connect-{item[0]}", daemon=True)
               for item in addresses.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # each is bounded: a connect and three handshake steps of HANDSHAKE_S
    return opened
