"""How bytes move between the master and a worker: the ``Transport`` seam.

``Transport`` is what a lane must do (``send``, ``receive_into``, ``close``; ``send_some`` /
``send_all`` for the master's non-blocking writes). ``TcpTransport`` is a plain socket with TCP
keepalive and ``TCP_USER_TIMEOUT``, so a cut link is noticed within seconds; ``TlsTransport`` runs
TLS 1.3 with mutual certificates (``sazd.runtime.tls``) over it, driving OpenSSL through memory
buffers so one thread may read while another writes. A GPU lane would be another ``Transport``: the
sealing (``sazd.runtime.channel``), the schema and the round engine stay as they are. (Workers on the
master's machine take a call's large tensors from shared memory, ``sazd.runtime.arena``: beside the
stream, not a transport, since those bytes need neither a copy through the kernel nor a tag.)
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from abc import ABC, abstractmethod

from sazd.runtime.tls import Identity

KEEPALIVE_S = (2, 1, 3)  # idle, interval, probes: a silent peer is noticed within about 5 s
USER_TIMEOUT_MS = 10_000  # data unacknowledged this long: the link is gone
_CHUNK = 1 << 18
_IOV_MAX = 1024  # buffers per sendmsg


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

    # the master's non-blocking forms (its socket is non-blocking once the handshake is done)
    @abstractmethod
    def receive_some(self, view: memoryview) -> int:
        """Fill a prefix of ``view`` with what has arrived; 0 when nothing has; EOFError when closed."""

    @abstractmethod
    def send_some(self, views: list[memoryview]) -> int:
        """Take a prefix of ``views`` (its length in bytes is returned; 0: none now)."""

    @abstractmethod
    def flush(self) -> bool:
        """Write out what ``send_some`` took but could not write yet; True when nothing is left."""

    def send_all(self, views: list[memoryview]) -> None:
        """Write all of ``views``, in order."""
        for view in views:
            self.send(view)

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

    def send_all(self, views: list[memoryview]) -> None:
        views = [memoryview(v).cast("B") for v in views]
        while views:  # blocking: sendmsg takes some of the buffers each time
            advance(views, self.sock.sendmsg(views[:_IOV_MAX]))

    def receive_some(self, view: memoryview) -> int:
        try:
            got = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        if got == 0:
            raise EOFError("connection closed")
        return got

    def send_some(self, views: list[memoryview]) -> int:
        try:
            return self.sock.sendmsg(views[:_IOV_MAX])  # one system call for a whole message
        except (BlockingIOError, InterruptedError):
            return 0

    def flush(self) -> bool:
        return True


def advance(views: list[memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes of ``views`` (in place)."""
    while sent and views:
        if sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        else:
            views[0] = views[0][sent:]
            sent = 0


class TlsTransport(TcpTransport):
    """TLS 1.3 over a socket through memory buffers: OpenSSL's state is touched under a lock and
    only for moments, so one thread may read while another writes (an ``SSLSocket`` shared by two
    threads is not safe)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server: bool) -> None:
        super().__init__(sock)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server)
        self._lock = threading.Lock()
        self._cipher = bytearray()  # sealed by send_some, not yet written (non-blocking form)
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

    def send_all(self, views: list[memoryview]) -> None:
        Transport.send_all(self, views)

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

    def receive_some(self, view: memoryview) -> int:
        view = view.cast("B")
        while True:  # data TLS already holds first: the socket's readiness does not show it
            try:
                with self._lock:
                    got = self._tls.read(view.nbytes, view)
            except ssl.SSLWantReadError:
                try:
                    data = self.sock.recv(_CHUNK)
                except (BlockingIOError, InterruptedError):
                    return 0
                if not data:
                    raise EOFError("connection closed") from None
                with self._lock:
                    self._incoming.write(data)
                continue
            except ssl.SSLZeroReturnError:
                got = 0
            if got == 0:
                raise EOFError("connection closed")
            return got

    def send_some(self, views: list[memoryview]) -> int:
        if not self.flush():
            return 0
        taken = 0
        for view in views:
            view = memoryview(view).cast("B")
            for start in range(0, view.nbytes, _CHUNK):
                with self._lock:
                    self._tls.write(view[start:start + _CHUNK])
                    self._cipher += self._outgoing.read()
            taken += view.nbytes
        self.flush()
        return taken

    def flush(self) -> bool:
        while self._cipher:
            try:
                sent = self.sock.send(self._cipher)
            except (BlockingIOError, InterruptedError):
                return False
            del self._cipher[:sent]
        return True


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


def open_transport(sock: socket.socket, identity: Identity | None, server: bool) -> Transport:
    _tune(sock)
    if identity is None:
        return TcpTransport(sock)
    return TlsTransport(sock, identity.context(server), server)
