"""The data plane of the Ray backend: one direct, sealed connection per worker.

Ray starts, places, watches and kills the workers; the calls of training and their answers travel
over one TCP connection between the master and each worker. An actor call through Ray's task path
and object store costs several milliseconds of scheduling and serialisation on each side, paid by
every worker in every round; a message on an open connection costs a write and a read.

Layers, bottom up:

- ``Transport``: moves bytes (``send``, ``receive_into``, ``close``). ``TcpTransport`` is a plain
  socket; ``TlsTransport`` runs TLS 1.3 with mutual certificates (``sazd.runtime.tls``) over it. A
  shared-memory lane would be another ``Transport``; nothing above this layer changes.
- The handshake: the master sends a nonce; the worker answers with its nonce and its proof of the
  worker's key (an HMAC over both nonces); only after checking it does the master prove the key in
  turn. The master never answers a challenge of a peer that has not proven the key. Both ends
  derive a key per direction from the two nonces. The whole handshake (TLS included) is bounded by
  ``HANDSHAKE_S``.
- ``Sealed``: every message carries HMAC-SHA256 tags under its direction's key and its sequence
  number (one tag over the header, checked before the header is parsed, one over the whole
  message). A message injected, replayed, reordered, cut or altered on the path fails its tag, and
  the connection breaks: the worker is an erasure, never a source of code or wrong values.
- The message schema (``sazd.runtime.wire``): msgpack, nothing unpickled; a header holds the
  method (from the worker's closed set), numbers, strings, records and tensor slots; each tensor's
  raw bytes follow, received straight into a fresh tensor's memory.
- Calls to one worker are answered in the order sent. Each end reads and writes in threads of its
  own, so a large message in one direction never waits on the other. A worker that dies, is
  killed or whose link is cut breaks its connection (TCP keepalive and ``TCP_USER_TIMEOUT`` notice a
  silent peer within seconds), and every unanswered call fails with ``WorkerLost``; an exception
  raised by the worker's code comes back as ``WorkerRaised``.
- The worker's listener admits at most ``MAX_PENDING`` peers in handshake at once; when the process
  runs out of descriptors or threads it pauses accepting and tries again, never closing for good.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import queue
import socket
import ssl
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sazd.runtime import wire
from sazd.runtime.tls import Identity

HANDSHAKE_S = 10.0  # bound on connecting, TLS and proving the key, as a whole
MAX_PENDING = 16  # peers in handshake at once on one worker's listener
KEEPALIVE_S = (2, 1, 3)  # idle, interval, probes: a silent peer is noticed within about 5 s
USER_TIMEOUT_MS = 10_000  # data unacknowledged this long: the link is gone
_MAX_HEADER_BYTES = 1 << 24  # headers hold names, numbers and tensor slots: a few KB
_MAX_TENSOR_BYTES = 1 << 40
_LENGTH = struct.Struct("!I")
_TAG = 32
_CHUNK = 1 << 18
_BACKOFF_S = 0.2  # pause before accepting again after running out of descriptors or threads


class WorkerLost(Exception):
    """The connection to the worker broke: it died, was killed, its link was cut or tampered with."""


class WorkerRaised(Exception):
    """The worker's code raised ``cause`` (rebuilt from its type name and message)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


# ------------------------------------------------------------------------------------ transports
class Transport(ABC):
    """A reliable, ordered byte stream to one peer."""

    @abstractmethod
    def send(self, data: bytes | memoryview) -> None:
        """Write all of ``data``."""

    @abstractmethod
    def receive_into(self, view: memoryview) -> None:
        """Fill ``view``; EOFError when the peer closed."""

    @abstractmethod
    def close(self) -> None:
        """Close, waking a thread blocked in ``receive_into`` or ``send``."""

    def receive(self, size: int) -> bytes:
        out = bytearray(size)
        self.receive_into(memoryview(out))
        return bytes(out)


class TcpTransport(Transport):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def receive_into(self, view: memoryview) -> None:
        while view.nbytes:
            got = self.sock.recv_into(view)
            if got == 0:
                raise EOFError("connection closed")
            view = view[got:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class TlsTransport(TcpTransport):
    """TLS 1.3 over a socket through memory buffers: OpenSSL's state is touched under a lock and
    only for moments, so one thread may read while another writes (an ``SSLSocket`` shared by two
    threads is not safe)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server: bool) -> None:
        super().__init__(sock)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server)
        self._lock = threading.Lock()
        while True:  # the socket's timeout (the handshake's deadline) bounds each step
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def _feed(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise EOFError("connection closed")
        with self._lock:
            self._incoming.write(data)

    def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, _CHUNK):
            with self._lock:
                self._tls.write(view[start:start + _CHUNK])
            self._flush()

    def receive_into(self, view: memoryview) -> None:
        view = view.cast("B")
        while view.nbytes:
            try:
                with self._lock:
                    got = self._tls.read(view.nbytes, view)
            except ssl.SSLWantReadError:
                self._feed()
                continue
            except ssl.SSLZeroReturnError:
                got = 0
            if got == 0:
                raise EOFError("connection closed")
            view = view[got:]


def _tune(sock: socket.socket) -> None:
    """Small frames at once (no Nagle); a silent or half-open peer noticed within seconds."""
    idle, interval, probes = KEEPALIVE_S
    for level, option, value in (
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), probes),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), USER_TIMEOUT_MS)):
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def _open(sock: socket.socket, identity: Identity | None, server: bool) -> Transport:
    _tune(sock)
    if identity is None:
        return TcpTransport(sock)
    return TlsTransport(sock, identity.context(server), server)


# ------------------------------------------------------------------------------------- handshake
@dataclass(frozen=True)
class Keys:
    """One connection's keys, one per direction (derived from both ends' nonces)."""

    send: bytes
    receive: bytes


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"sazd/1 " + label + b"".join(parts), hashlib.sha256).digest()


def _session(key: bytes, master_nonce: bytes, worker_nonce: bytes, master: bool) -> Keys:
    to_worker = _mac(key, b"to worker", master_nonce, worker_nonce)
    to_master = _mac(key, b"to master", master_nonce, worker_nonce)
    return Keys(to_worker, to_master) if master else Keys(to_master, to_worker)


def _master_handshake(link: Transport, key: bytes) -> Keys:
    mine = os.urandom(32)
    link.send(mine)
    theirs, proof = link.receive(32), link.receive(_TAG)
    if not hmac.compare_digest(proof, _mac(key, b"worker proof", mine, theirs)):
        raise ConnectionError("the peer does not hold this worker's key")
    link.send(_mac(key, b"master proof", mine, theirs))
    return _session(key, mine, theirs, master=True)


def _worker_handshake(link: Transport, key: bytes) -> Keys:
    theirs, mine = link.receive(32), os.urandom(32)
    link.send(mine + _mac(key, b"worker proof", theirs, mine))
    if not hmac.compare_digest(link.receive(_TAG), _mac(key, b"master proof", theirs, mine)):
        raise ConnectionError("the peer does not hold this worker's key")
    return _session(key, theirs, mine, master=False)


def _bounded_handshake(sock: socket.socket, key: bytes, identity: Identity | None,
                       master: bool) -> Sealed:
    """TLS (if any) and the key proofs, all within HANDSHAKE_S (a watchdog closes the socket)."""
    watchdog = threading.Timer(HANDSHAKE_S, _shut, args=(sock,))
    watchdog.daemon = True
    watchdog.start()
    try:
        sock.settimeout(HANDSHAKE_S)
        link = _open(sock, identity, server=not master)
        keys = (_master_handshake if master else _worker_handshake)(link, key)
    finally:
        watchdog.cancel()
    sock.settimeout(None)
    return Sealed(link, keys)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------- sealing
@dataclass(frozen=True)
class Encoded:
    """A call's arguments ready to write: the packed argument list and its tensors, in slot order."""

    body: bytes
    tensors: tuple[torch.Tensor, ...]


def encode(args: tuple) -> Encoded:
    """``args`` packed for the wire (``sazd.runtime.wire``); TypeError naming what cannot travel."""
    try:
        body, tensors = wire.pack(list(args))
    except TypeError as err:
        raise TypeError(f"cannot send {type(args).__name__} to a worker: {err}") from None
    return Encoded(body, tuple(tensors))


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t``, as a writable view of its memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Sealed:
    """Messages with an HMAC per direction and sequence number over a ``Transport``."""

    def __init__(self, link: Transport, keys: Keys) -> None:
        self.link = link
        self._keys = keys
        self._sent = self._received = 0

    def write(self, header: bytes, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        mac = hmac.new(self._keys.send, self._sent.to_bytes(8, "big"), hashlib.sha256)
        self._sent += 1
        head = _LENGTH.pack(len(header)) + header
        mac.update(head)
        self.link.send(head + mac.copy().digest())
        for t in tensors:
            raw = _raw(t)
            mac.update(raw)
            if raw.nbytes:
                self.link.send(raw)
        self.link.send(mac.digest())

    def read(self) -> Any:
        """One message's value; WireError if a tag, the schema or a size does not hold."""
        mac = hmac.new(self._keys.receive, self._received.to_bytes(8, "big"), hashlib.sha256)
        self._received += 1
        prefix = self.link.receive(_LENGTH.size)
        size = _LENGTH.unpack(prefix)[0]
        if size > _MAX_HEADER_BYTES:
            raise wire.WireError(f"message header of {size} bytes (at most {_MAX_HEADER_BYTES})")
        header = self.link.receive(size)
        mac.update(prefix + header)
        if not hmac.compare_digest(self.link.receive(_TAG), mac.copy().digest()):
            raise wire.WireError("a message header failed its integrity check (altered, injected, "
                                 "replayed or reordered on the path)")
        value, tensors = wire.unpack(header, _MAX_TENSOR_BYTES)
        for t in tensors:  # raw bytes into fresh memory; used only once the final tag holds
            raw = _raw(t)
            if raw.nbytes:
                self.link.receive_into(raw)
                mac.update(raw)
        if not hmac.compare_digest(self.link.receive(_TAG), mac.digest()):
            raise wire.WireError("a message's tensors failed their integrity check")
        return value


# ------------------------------------------------------------------------------------- worker end
def serve(host: str, key: bytes, handle: Callable[[str, float, tuple], Any], methods: frozenset[str],
          identity: Identity | None = None) -> tuple[str, int]:
    """Listen on ``host`` for the master; answer each call of one of ``methods`` with
    ``handle(method, slowdown, args)``, in order. Returns the address to connect to.

    Each peer proves the key in a thread of its own (at most ``MAX_PENDING`` at once), so one that
    stalls or resets delays nobody; the first that proves it is the master, and the listener closes."""
    listener = socket.create_server((host, 0))
    claimed = threading.Lock()
    pending = threading.BoundedSemaphore(MAX_PENDING)

    def admit(sock: socket.socket) -> None:
        try:
            sealed = _bounded_handshake(sock, key, identity, master=False)
        except Exception:  # no key, no certificate, stalled, reset: not the master
            sock.close()
            return
        finally:
            pending.release()
        if not claimed.acquire(blocking=False):  # another peer with the key came first
            sealed.link.close()
            return
        _shut(listener)  # wakes the accepting thread
        listener.close()
        _answer(sealed, handle, methods)

    def accept() -> None:
        while not claimed.locked():
            if not pending.acquire(timeout=1.0):  # as many peers in handshake as allowed: wait
                continue
            try:
                sock, _ = listener.accept()
            except OSError as err:
                pending.release()
                if claimed.locked() or listener.fileno() < 0:
                    return  # closed: the master is admitted
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(_BACKOFF_S)  # out of descriptors: pause, the listener stays
                continue
            try:
                threading.Thread(target=admit, args=(sock,), name="sazd-channel-admit", daemon=True).start()
            except RuntimeError:  # out of threads: drop this peer, pause, keep listening
                sock.close()
                pending.release()
                time.sleep(_BACKOFF_S)

    threading.Thread(target=accept, name="sazd-channel", daemon=True).start()
    return listener.getsockname()[:2]


def _answer(sealed: Sealed, handle: Callable[[str, float, tuple], Any], methods: frozenset[str]) -> None:
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # keeps reading while the calls run, so the master never blocks writing
        try:
            while True:
                inbox.put(wire.parse_call(sealed.read(), methods))
        except Exception:  # closed, tampered with, or not a message of ours: no call runs
            inbox.put(None)

    threading.Thread(target=read, name="sazd-channel-read", daemon=True).start()
    while (call := inbox.get()) is not None:
        try:
            header, tensors = wire.answer(handle(*call))
        except BaseException as err:  # raised, or an answer that cannot travel: the master decides
            header, tensors = wire.failure(err), []
        try:
            sealed.write(header, tensors)
        except Exception:
            break
    sealed.link.close()  # wakes our reader and tells the master at once


# ------------------------------------------------------------------------------------- master end
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


def connect(address: tuple[str, int], key: bytes, identity: Identity | None = None) -> Sealed:
    """Master side: connect to a worker, run TLS (with ``identity``) and prove the key both ways,
    all within HANDSHAKE_S; ConnectionError otherwise."""
    address = tuple(address)
    try:
        sock = socket.create_connection(address, timeout=HANDSHAKE_S)
    except OSError as err:
        raise ConnectionError(f"cannot reach the worker at {address}: {err.strerror or err}") from None
    try:
        return _bounded_handshake(sock, key, identity, master=True)
    except ConnectionError as err:
        sock.close()
        raise ConnectionError(f"the worker at {address}: {err}") from None
    except (OSError, EOFError, ssl.SSLError) as err:
        sock.close()
        raise ConnectionError(f"no handshake with the worker at {address}: "
                              f"{type(err).__name__}: {err}") from None


class Channel:
    """The master's connection to one worker. ``notify`` is notified whenever a reply is done."""

    def __init__(self, worker: int, address: tuple[str, int], key: bytes, notify: threading.Condition,
                 identity: Identity | None = None) -> None:
        """Connect, run TLS if ``identity`` and prove the key (within ``HANDSHAKE_S``); raises
        ConnectionError when the worker cannot be reached or proven."""
        self.worker = worker
        self._notify = notify
        self._pending: deque[Reply] = deque()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken: str | None = None
        self._sealed = connect(address, key, identity)
        self._writer = threading.Thread(target=self._write, name=f"sazd-send-{worker}", daemon=True)
        self._writer.start()
        threading.Thread(target=self._read, name=f"sazd-recv-{worker}", daemon=True).start()

    def send(self, method: str, slowdown: float, args: Encoded) -> Reply:
        """Queue one call (``args`` from ``encode``); its reply is filled in when the answer arrives.
        The tensors of ``args`` must not change afterwards (the write happens in another thread)."""
        reply = Reply()
        with self._notify:
            if self.broken is not None:
                reply.fail(WorkerLost(f"worker {self.worker}: {self.broken}"))
                return reply
            self._pending.append(reply)
        self._outbox.put((wire.call(method, slowdown, args.body), args.tensors))
        return reply

    def close(self, why: str = "connection closed by the master") -> None:
        self._break(why)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._sealed.write(*message)
            except Exception as err:
                self._break(f"sending failed ({type(err).__name__}: {err})")
                return

    def _read(self) -> None:
        self._receive()
        self._writer.join(5.0)  # woken by the close in _break

    def _receive(self) -> None:
        while True:
            try:
                ok, value = wire.parse_answer(self._sealed.read())
            except Exception as err:
                self._break(f"connection lost ({type(err).__name__}: {err})")
                return
            with self._notify:
                if not self._pending:
                    break
                reply = self._pending.popleft()
                if ok:
                    reply.value, reply.done = value, True
                else:
                    reply.fail(WorkerRaised(value))
                self._notify.notify_all()
        self._break("answer to no call")

    def _break(self, why: str) -> None:
        """Fail every unanswered call, close the connection and wake both threads."""
        with self._notify:
            if self.broken is None:
                self.broken = why
            for reply in self._pending:
                reply.fail(WorkerLost(f"worker {self.worker}: {self.broken}"))
            self._pending.clear()
            self._notify.notify_all()
        self._sealed.link.close()
        self._outbox.put(None)


def open_channels(addresses: dict[int, tuple[str, int]], keys: dict[int, bytes],
                  notify: threading.Condition, identity: Identity | None = None
                  ) -> dict[int, Channel | Exception]:
    """A ``Channel`` to each worker (``keys``: each worker's own key), connected all at once:
    starting n workers takes one handshake's bound, not n of them. Each worker's ConnectionError is
    returned in its place."""
    opened: dict[int, Channel | Exception] = {}

    def open_one(worker: int, address: tuple[str, int]) -> None:
        try:
            opened[worker] = Channel(worker, address, keys[worker], notify, identity)
        except (OSError, ConnectionError) as err:
            opened[worker] = err

    threads = [threading.Thread(target=open_one, args=item, name=f"sazd-connect-{item[0]}", daemon=True)
               for item in addresses.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # each is bounded by HANDSHAKE_S
    return opened


def worker_key(cluster_key: bytes, worker: int, incarnation: int) -> bytes:
    """The key of one worker process: a worker cannot speak for another, nor a replaced one for its
    successor."""
    return _mac(cluster_key, b"worker key", worker.to_bytes(4, "big"), incarnation.to_bytes(4, "big"))
