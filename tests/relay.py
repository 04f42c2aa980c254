"""An on-path attacker for the data plane: a process between the master and one worker, on loopback.

    python tests/relay.py TARGET_HOST TARGET_PORT FRAMING ACTION CAPTURE

It accepts one connection, connects to the target and forwards both ways, writing every byte it
sees (both directions) to CAPTURE. It prints its port, then waits for a line ``arm`` on stdin; from
then on it tampers with the master's next messages (``FRAMING``: ``sazd`` messages of the HMAC
plane, or ``tls`` records): ``inject`` a forged message (a pickle that would create the file named
by the environment variable ``RELAY_TOUCH``) before the next one, ``replay`` the next one, ``reorder``
the next two, ``flip`` one byte of the next one, ``drop`` the next one. Arm only between messages
(after an answer arrived), so the stream is at a message boundary.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

HEADER = struct.Struct("!I")
TAG = 32


class Touch:
    """Unpickling this runs ``touch``: the proof that a receiver unpickled what it got."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def read_exactly(sock: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        got = sock.recv(size - len(out))
        if not got:
            raise EOFError
        out += got
    return out


def sazd_message(sock: socket.socket) -> bytes:
    """One message of the HMAC plane: length, header, tag, tensor bytes (sizes from the header), tag."""
    from sazd.runtime import wire

    prefix = read_exactly(sock, HEADER.size)
    header = read_exactly(sock, HEADER.unpack(prefix)[0])
    _, tensors = wire.unpack(header, 1 << 34)
    body = read_exactly(sock, TAG + sum(t.numel() * t.element_size() for t in tensors) + TAG)
    return prefix + header + body


def tls_record(sock: socket.socket) -> bytes:
    head = read_exactly(sock, 5)
    return head + read_exactly(sock, struct.unpack("!H", head[3:5])[0])


def forged(framing: str) -> bytes:
    payload = pickle.dumps(Touch(os.environ.get("RELAY_TOUCH", "/nonexistent/relay-touch")))
    if framing == "tls":
        return b"\x17\x03\x03" + struct.pack("!H", len(payload)) + payload
    return HEADER.pack(len(payload)) + payload + os.urandom(TAG)


def main() -> None:
    host, port, framing, action, capture = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
    if framing == "sazd":  # reads headers with the schema's own parser; imported before any traffic
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
        from sazd.runtime import wire  # noqa: F401
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    master, _ = listener.accept()
    worker = socket.create_connection((host, port))
    log = open(capture, "ab", buffering=0)  # noqa: SIM115 (lives as long as the process)
    lock = threading.Lock()
    armed = threading.Event()

    def seen(data: bytes) -> None:
        with lock:
            log.write(data)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                seen(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def from_master() -> None:
        try:
            while True:  # forward as it comes until armed (between messages: nothing in flight)
                select.select([master], [], [])
                if armed.is_set():
                    break
                data = master.recv(1 << 16)
                if not data:
                    raise EOFError
                seen(data)
                worker.sendall(data)
            unit = tls_record if framing == "tls" else sazd_message
            first = unit(master)
            seen(first)
            if action == "inject":
                worker.sendall(forged(framing) + first)
            elif action == "replay":
                worker.sendall(first + first)
            elif action == "reorder":
                second = unit(master)
                seen(second)
                worker.sendall(second + first)
            elif action == "flip":
                worker.sendall(first[:-TAG - 1] + bytes([first[-TAG - 1] ^ 1]) + first[-TAG:])
            elif action == "drop":
                pass
            pump(master, worker)
        except (OSError, EOFError):
            for s in (master, worker):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=pump, args=(worker, master), daemon=True).start()
    threading.Thread(target=from_master, daemon=True).start()
    for line in sys.stdin:  # until the test closes stdin: then the relay exits
        if line.strip() == "arm":
            armed.set()
            print("armed", flush=True)


class Relay:
    """A running relay (see the module docstring): ``address`` to connect to, ``arm()`` to tamper."""

    def __init__(self, proc: subprocess.Popen, capture: str) -> None:
        self.proc, self.capture = proc, capture
        self.address = ("127.0.0.1", int(proc.stdout.readline()))

    def arm(self) -> None:
        """From now on the master's next message is tampered with (returns once the relay knows)."""
        self.proc.stdin.write("arm\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "armed"

    def seen(self) -> bytes:
        with open(self.capture, "rb") as f:
            return f.read()


@contextlib.contextmanager
def relay(target: tuple[str, int], framing: str, action: str, capture: str, touch: str) -> Iterator[Relay]:
    """A relay process in front of ``target``; ended (by its PID) when the block exits."""
    proc = subprocess.Popen([sys.executable, __file__, target[0], str(target[1]), framing, action, capture],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RELAY_TOUCH": touch})
    try:
        yield Relay(proc, capture)
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


if __name__ == "__main__":
    main()
