"""The data plane of the Ray backend: one direct, sealed connection per worker.

Ray starts, places, watches and kills the workers; the calls of training and their answers travel
over one TCP connection between the master and each worker. An actor call through Ray's task path
and object store costs several milliseconds of scheduling and serialisation on each side, paid by
every worker in every round; a message on an open connection costs a write and a read.

Layers, bottom up:

- ``Transport`` (``sazd.runtime.transport``): moves bytes; TCP, or TLS 1.3 with mutual certificates
  over it. Workers on the master's machine also map its shared-memory arena (``sazd.runtime.arena``):
  a call's large tensors lie there, and its header, sealed as always, says where. The master maps
  each such worker's own arena in turn, for the large tensors of its answers; each call tells the
  worker how many answers the master has read, so their regions can be reused.
- The handshake: the master sends a nonce; the worker answers with its nonce and its proof of the
  worker's key (an HMAC over both nonces); only after checking it does the master prove the key in
  turn. The master never answers a challenge of a peer that has not proven the key. Both ends
  derive a key per direction from the two nonces. The whole handshake (TLS included) is bounded by
  ``HANDSHAKE_S``.
- ``Sealed``: every message carries HMAC-SHA256 tags under its direction's key and its sequence
  number (one tag over the header, checked before the header is parsed, one over the header and
  the SHA-256 digest of each tensor's bytes). A message injected, replayed, reordered, cut or
  altered on the path fails its tag, and the connection breaks: the worker is an erasure, never a
  source of code or wrong values. A tensor's digest is computed once per call, however many workers
  it goes to; each receiver hashes the bytes it got.
- The message schema (``sazd.runtime.wire``): msgpack, nothing unpickled; a header holds the
  method (from the worker's closed set), numbers, strings, records and tensor slots; each tensor's
  raw bytes follow, received straight into a fresh tensor's memory.
- Calls to one worker are answered in the order sent: per connection, one thread reads and checks
  each call as it arrives (so a busy worker's socket never stays full: the kernel would cut a
  connection whose bytes stay unacknowledged past ``TCP_USER_TIMEOUT``), another runs and answers
  them in turn; the master's writes never wait on a busy worker, since the socket takes what it can
  and the master's hub writes the rest later. The master has one thread for
  all its connections (``Hub``, a selector): a call is written on the caller's thread as far as
  the socket takes it (one ``sendmsg`` per message), the hub finishes the rest and reads every
  answer as its bytes arrive, so a large message in one direction never waits on the other and a
  peer that stalls mid-message holds up nobody. A worker that dies, is
  killed or whose link is cut breaks its connection (TCP keepalive and ``TCP_USER_TIMEOUT`` notice a
  silent peer within seconds), and every unanswered call fails with ``WorkerLost``; an exception
  raised by the worker's code comes back as ``WorkerRaised``.
- The worker's listener admits at most ``MAX_PENDING`` peers in handshake at once; when the process
  runs out of descriptors or threads it pauses accepting and tries again, never closing for good.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import os
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from sazd.runtime import wire
from sazd.runtime.arena import Arena, ArenaError, Lease, MappedArena
from sazd.runtime.tls import Identity
from sazd.runtime.transport import Transport, advance, open_transport

HANDSHAKE_S = 10.0  # bound on connecting, TLS and proving the key, as a whole
MAX_PENDING = 16  # peers in handshake at once on one worker's listener
_MAX_HEADER_BYTES = 1 << 24  # headers hold names, numbers and tensor slots: a few KB
_MAX_TENSOR_BYTES = 1 << 40
_LENGTH = struct.Struct("!I")
_TAG = 32
_BACKOFF_S = 0.2  # pause before accepting again after running out of descriptors or threads


class WorkerLost(Exception):
    """The connection to the worker broke: it died, was killed, its link was cut or tampered with."""


class WorkerRaised(Exception):
    """The worker's code raised ``cause`` (rebuilt from its type name and message)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


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
        link = open_transport(sock, identity, server=not master)
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
    """A call's arguments ready to write: the packed argument list, its tensors in slot order and
    the SHA-256 digest of each tensor's bytes."""

    body: bytes
    tensors: tuple[torch.Tensor, ...]
    digests: tuple[bytes, ...]
    lease: Lease | None = None  # holds the arena regions of its shared slots until the call is done


def encode(args: tuple, digests: dict[tuple[int, int], bytes] | None = None,
           arena: Arena | None = None, lease: Lease | None = None) -> Encoded:
    """``args`` packed for the wire (``sazd.runtime.wire``); TypeError naming what cannot travel.
    ``digests`` keeps each tensor's digest, by the address and length of its bytes, for the other
    calls of one submit that share the tensor (whose bytes stay alive and unchanged meanwhile): its
    bytes are hashed once. Tensors that lie in ``arena`` travel as shared slots (no bytes, no digest):
    only for a worker that maps it."""
    try:
        body, tensors = wire.pack(list(args), None if arena is None else arena.offset_of)
    except TypeError as err:
        raise TypeError(f"cannot send {type(args).__name__} to a worker: {err}") from None
    known = {} if digests is None else digests
    out = []
    for t in tensors:
        where = (t.data_ptr(), t.numel() * t.element_size())
        if where not in known:
            known[where] = _digest(_raw(t))
        out.append(known[where])
    return Encoded(body, tuple(tensors), tuple(out), lease)


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t``, as a writable view of its memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _digest(raw: memoryview) -> bytes:
    return hashlib.sha256(raw).digest()


class Sealed:
    """Messages with an HMAC per direction and sequence number over a ``Transport``."""

    def __init__(self, link: Transport, keys: Keys) -> None:
        self.link = link
        self._keys = keys
        self._sent = self._received = 0
        self.arena: MappedArena | None = None  # the peer's arena, mapped: shared slots allowed

    def frames(self, header: bytes, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor],
               digests: tuple[bytes, ...] | None = None) -> list[memoryview]:
        """One message as the buffers to write in order (the tags computed over the header and the
        tensors' ``digests``, computed here if not given), the next sequence number taken."""
        mac = hmac.new(self._keys.send, self._sent.to_bytes(8, "big"), hashlib.sha256)
        self._sent += 1
        head = _LENGTH.pack(len(header)) + header
        mac.update(head)
        out = [memoryview(head + mac.copy().digest())]
        for i, t in enumerate(tensors):
            raw = _raw(t)
            mac.update(_digest(raw) if digests is None else digests[i])
            if raw.nbytes:
                out.append(raw)
        out.append(memoryview(mac.digest()))
        return out

    def write(self, header: bytes, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        self.link.send_all(self.frames(header, tensors))

    def reading(self) -> Generator[memoryview, None, tuple[Any, int]]:
        """One message read as the buffers to fill in order: yields each buffer, returns the
        message's value and the bytes it took from the peer's arena once every byte arrived;
        WireError if a tag, the schema or a size does not hold. Driven by the worker's
        ``read_calls`` (blocking) or by the master's ``Hub`` (as bytes arrive)."""
        mac = hmac.new(self._keys.receive, self._received.to_bytes(8, "big"), hashlib.sha256)
        self._received += 1
        prefix = bytearray(_LENGTH.size)
        yield memoryview(prefix)
        size = _LENGTH.unpack(prefix)[0]
        if size > _MAX_HEADER_BYTES:
            raise wire.WireError(f"message header of {size} bytes (at most {_MAX_HEADER_BYTES})")
        header, tag = bytearray(size), bytearray(_TAG)
        yield memoryview(header)
        mac.update(prefix + header)
        yield memoryview(tag)
        if not hmac.compare_digest(bytes(tag), mac.copy().digest()):
            raise wire.WireError("a message header failed its integrity check (altered, injected, "
                                 "replayed or reordered on the path)")
        placed: list[tuple[torch.Tensor, int]] | None = None if self.arena is None else []
        value, tensors = wire.unpack(bytes(header), _MAX_TENSOR_BYTES, placed)
        for t in tensors:  # raw bytes into fresh memory; used only once the final tag holds
            raw = _raw(t)
            if raw.nbytes:
                yield raw
            mac.update(_digest(raw))
        yield memoryview(tag)
        if not hmac.compare_digest(bytes(tag), mac.digest()):
            raise wire.WireError("a message's tensors failed their integrity check")
        shared_bytes = 0
        for t, offset in placed or ():  # where they lie was sealed with the header
            try:
                self.arena.fill(t, offset)
            except ValueError as err:
                raise wire.WireError(str(err)) from None
            shared_bytes += t.numel() * t.element_size()
        return value, shared_bytes

    def read_calls(self, methods: frozenset[str], put: Callable[[Any], None]) -> None:
        """The worker's reader: each call of one of ``methods`` as it arrives, parsed, to ``put``, until
        the connection ends; then ``put(None)`` (closed, tampered with, or not a message of ours: it
        and every later call never run). Drives ``reading`` itself: the path of every call."""
        try:
            while True:
                steps = self.reading()
                try:
                    view = next(steps)
                    while True:
                        self.link.receive_into(view)
                        view = steps.send(None)
                except StopIteration as done:
                    put(wire.parse_call(done.value[0], methods))
        except Exception:
            put(None)


# ------------------------------------------------------------------------------------- worker end
def serve(host: str, key: bytes, handle: Callable[[str, float, tuple], Any], methods: frozenset[str],
          identity: Identity | None = None, arena: MappedArena | None = None,
          answers: Arena | None = None) -> tuple[str, int]:
    """Listen on ``host`` for the master; answer each call of one of ``methods`` with
    ``handle(method, slowdown, args)``, in order. Returns the address to connect to. ``arena``: the
    master's shared-memory arena, mapped: its calls may carry tensors there. ``answers``: this
    worker's own arena, for the large tensors of its answers to a master that maps it.

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
        sealed.arena = arena
        try:  # this thread's job, the handshake, is done: the connection gets one of its own
            threading.Thread(target=_answer, args=(sealed, handle, methods, answers),
                             name="sazd-channel-answer", daemon=True).start()
        except RuntimeError:  # out of threads: the master sees the connection end
            sealed.link.close()

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


def _answer(sealed: Sealed, handle: Callable[[str, float, tuple], Any], methods: frozenset[str],
            answers: Arena | None = None) -> None:
    """Run and answer the master's calls in order until the connection ends. A thread of its own reads
    them as they arrive: a worker busy longer than ``TCP_USER_TIMEOUT`` with more calls queued than its
    socket holds would otherwise leave the master's unsent bytes unacknowledged, and the kernel would
    cut a connection that is only slow. (The master never blocks writing to a busy worker either: its
    hub finishes any write the socket did not take.) An answer's large tensors go through
    ``answers`` when the call says the master maps it, each answer's regions held until a later
    call says the master has read it."""
    calls: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=sealed.read_calls, args=(methods, calls.put), name="sazd-channel-read",
                     daemon=True).start()
    held: deque[tuple[int, Lease]] = deque()  # (answer number, its regions) the master may still read
    written = 0
    while (call := calls.get()) is not None:
        lane = answers if call.read is not None else None
        shared = None
        if lane is not None:
            while held and held[0][0] < call.read:
                held.popleft()[1].close()
            lease = Lease()
            held.append((written, lease))
            shared = functools.partial(lane.share, lease=lease)
        written += 1
        try:
            header, tensors = wire.answer(handle(call.method, call.slowdown, call.args), shared)
        except BaseException as err:  # raised, or an answer that cannot travel: the master decides
            header, tensors = wire.failure(err), []
        try:
            sealed.write(header, tensors)
        except Exception:
            break
    sealed.link.close()  # tells the master at once


# ------------------------------------------------------------------------------------- master end
class Reply:
    """The answer to one call; ``done`` once it arrived or the connection broke."""

    __slots__ = ("done", "error", "shared_bytes", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Exception | None = None
        self.shared_bytes = 0  # of the answer's tensors, taken from the worker's arena

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


@dataclass
class HubStats:
    """How often work passed between threads on the master's data plane (deterministic counts)."""

    written_by_caller: int = 0  # calls written whole on the caller's thread
    handed_to_hub: int = 0  # calls the socket could not take at once, finished by the hub: hand-offs
    answers: int = 0  # answers read by the hub
    wakes: int = 0  # passes of the hub that completed answers and woke the waiting threads: hand-offs


class Hub:
    """The master's one thread for every worker connection: a selector reads each connection's
    messages as their bytes arrive (a stalled peer holds up nobody) and finishes the writes that a
    caller's thread could not complete at once. Answers completed in one pass wake the waiters once."""

    def __init__(self) -> None:
        self.stats = HubStats()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._changes: deque[Channel] = deque()  # channels whose registration is to be (re)done
        threading.Thread(target=self._loop, name="sazd-hub", daemon=True).start()

    def watch(self, channel: Channel) -> None:
        """(Re)register ``channel`` as it now is: read, write if it has bytes left, or drop if closed."""
        self._changes.append(channel)
        with contextlib.suppress(OSError):  # full: a wake is already pending
            self._wake_w.send(b"\0")

    def _loop(self) -> None:
        while True:
            events = self._selector.select()
            woken: set[threading.Condition] = set()
            for key, mask in events:
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                    continue
                channel: Channel = key.data
                if channel._closed:
                    continue  # unregistered below
                if mask & selectors.EVENT_WRITE:
                    channel._pump(by_hub=True)
                if mask & selectors.EVENT_READ and channel._receive():
                    woken.add(channel._notify)
            for notify in woken:
                self.stats.wakes += 1
                with notify:
                    notify.notify_all()
            while self._changes:
                channel = self._changes.popleft()
                try:
                    self._register(channel)
                except Exception as err:  # e.g. out of memory for the selector: this connection ends
                    with contextlib.suppress(Exception):
                        self._selector.unregister(channel._sealed.link.sock)
                    channel._break(f"cannot watch the connection ({type(err).__name__}: {err})")
                    channel._shut()

    def _register(self, channel: Channel) -> None:
        sock = channel._sealed.link.sock
        try:
            registered = self._selector.get_key(sock)
        except (KeyError, ValueError):
            registered = None
        if channel._closed:
            if registered is not None:
                self._selector.unregister(sock)
            channel._shut()
            return
        with channel._write_lock:
            unwritten = not channel._closed and channel._unwritten()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if unwritten else 0)
        if registered is None:
            self._selector.register(sock, events, channel)
        elif registered.events != events:
            self._selector.modify(sock, events, channel)


_hub: Hub | None = None
_hub_lock = threading.Lock()


def hub() -> Hub:
    """This process's hub (started on first use)."""
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = Hub()
        return _hub


class Channel:
    """The master's connection to one worker. ``notify`` is notified whenever a reply is done.

    A call is written on the caller's thread, as far as the socket takes it; the hub writes the
    rest and reads every answer (``Hub``)."""

    def __init__(self, worker: int, address: tuple[str, int], key: bytes, notify: threading.Condition,
                 identity: Identity | None = None, answers: dict[str, Any] | None = None) -> None:
        """Connect, run TLS if ``identity`` and prove the key (within ``HANDSHAKE_S``); raises
        ConnectionError when the worker cannot be reached or proven. ``answers``: the description of
        the worker's arena; mapped where it can be (``answers_refused`` says why not), the worker's
        answers bring their large tensors through it."""
        self.worker = worker
        self._notify = notify
        self._pending: deque[Reply] = deque()
        self.broken: str | None = None
        answer_arena, self.answers_refused = None, "not offered"
        if answers is not None:
            try:
                answer_arena, self.answers_refused = MappedArena(answers), None
            except ArenaError as err:
                self.answers_refused = str(err)
        try:
            self._sealed = connect(address, key, identity)
        except BaseException:
            if answer_arena is not None:
                answer_arena.close()
            raise
        self._sealed.arena = answer_arena
        self._read = 0  # answers read: the worker may reuse the regions that held their tensors
        self._sealed.link.sock.setblocking(False)
        self._out: list[memoryview] = []  # bytes of calls not yet written, in order
        self._write_lock = threading.RLock()  # one writer at a time; the socket is closed under it
        self._closed = False
        self._steps: Generator[memoryview, None, Any] | None = None  # the answer being read
        self._view: memoryview | None = None  # what of it is still to arrive
        self._hub = hub()
        self._hub.watch(self)

    def send(self, method: str, slowdown: float, args: Encoded) -> Reply:
        """Send one call (``args`` from ``encode``); its reply is filled in when the answer arrives.
        The tensors of ``args`` must not change afterwards (the hub may finish the write later)."""
        reply = Reply()
        with self._notify:
            if self.broken is not None:
                reply.fail(WorkerLost(f"worker {self.worker}: {self.broken}"))
                return reply
            self._pending.append(reply)
        with self._write_lock:
            if self._closed:
                return reply  # failed by the close
            queued = bool(self._out)
            read = None if self._sealed.arena is None else self._read
            header = wire.call(method, slowdown, read, args.body)
            self._out += self._sealed.frames(header, args.tensors, args.digests)
            if not queued:  # nothing waits before it: write now
                self._pump(by_hub=False)
        return reply

    def close(self, why: str = "connection closed by the master") -> None:
        self._break(why)

    def _unwritten(self) -> bool:
        return bool(self._out) or not self._sealed.link.flush()

    def _pump(self, by_hub: bool) -> None:
        """Write what the socket takes now; the hub is asked to finish the rest."""
        with self._write_lock:
            if self._closed:
                return
            try:
                while self._out:
                    sent = self._sealed.link.send_some(self._out)
                    if sent == 0:
                        break
                    advance(self._out, sent)
                left = self._unwritten()
            except OSError as err:
                why = f"sending failed ({type(err).__name__}: {err})"
            else:
                if not by_hub:
                    if left:
                        self._hub.stats.handed_to_hub += 1
                    else:
                        self._hub.stats.written_by_caller += 1
                if left or by_hub:
                    self._hub.watch(self)  # write interest on, or off once done
                return
        self._break(why)

    def _receive(self) -> bool:
        """Read what has arrived (hub thread); True if an answer was completed."""
        completed = False
        try:
            while True:
                if self._steps is None:
                    self._steps = self._sealed.reading()
                    self._view = next(self._steps)
                got = self._sealed.link.receive_some(self._view)
                if got == 0:
                    return completed
                self._view = self._view[got:]
                if self._view.nbytes:
                    continue
                try:
                    self._view = self._steps.send(None)
                    continue
                except StopIteration as done:
                    self._steps = self._view = None
                    message, shared_bytes = done.value
                    ok, value = wire.parse_answer(message)
                self._hub.stats.answers += 1
                self._read += 1
                with self._notify:
                    if not self._pending:
                        raise wire.WireError("answer to no call")
                    reply = self._pending.popleft()
                    reply.shared_bytes = shared_bytes
                    if ok:
                        reply.value, reply.done = value, True
                    else:
                        reply.fail(WorkerRaised(value))
                completed = True
        except Exception as err:
            why = str(err) if isinstance(err, wire.WireError) and str(err) == "answer to no call" \
                else f"connection lost ({type(err).__name__}: {err})"
            self._break(why)
            return True

    def _break(self, why: str) -> None:
        """Fail every unanswered call; the hub closes the connection."""
        with self._notify:
            if self.broken is None:
                self.broken = why
            for reply in self._pending:
                reply.fail(WorkerLost(f"worker {self.worker}: {self.broken}"))
            self._pending.clear()
            self._notify.notify_all()
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._out.clear()
        self._hub.watch(self)

    def _shut(self) -> None:
        """Close the socket and unmap the worker's arena (hub thread, once it no longer watches it)."""
        with self._write_lock:
            self._sealed.link.close()
            if self._sealed.arena is not None:
                self._sealed.arena.close()
                self._sealed.arena = None


def open_channels(addresses: dict[int, tuple[str, int]], keys: dict[int, bytes],
                  notify: threading.Condition, identity: Identity | None = None,
                  answers: dict[int, dict[str, Any] | None] | None = None) -> dict[int, Channel | Exception]:
    """A ``Channel`` to each worker (``keys``: each worker's own key; ``answers``: the description of
    its arena, where it has one), connected all at once: starting n workers takes one handshake's
    bound, not n of them. Each worker's ConnectionError is returned in its place."""
    opened: dict[int, Channel | Exception] = {}
    answers = answers or {}

    def open_one(worker: int, address: tuple[str, int]) -> None:
        try:
            opened[worker] = Channel(worker, address, keys[worker], notify, identity, answers.get(worker))
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
