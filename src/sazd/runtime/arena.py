"""The shared-memory lanes: large tensors between the master and the workers on its own machine.

On one machine, a message's tensors need not cross a socket: the writer copies each large tensor
once into its ``Arena`` (one sealed anonymous memory file, ``memfd``) and the message's header names
where it lies (a slot of dtype, shape and offset, sealed with the header by the channel's HMAC). The
reader maps that arena read-only (``MappedArena``) and copies the bytes out when it reads the
message. That saves, per tensor, the socket's two copies and both ends' SHA-256 of the bytes. Two
lanes use it: the master's arena carries its calls to every worker on its machine (a broadcast
tensor is written once for all of them), and each such worker's own arena carries its answers back.

Trust: an arena is reached only through ``/proc/<writer pid>/fd/<fd>``, which the kernel opens only
for the writer's own user (or root), who can read and change the writer's memory anyway; so its
bytes need no tag. A reader proves it maps the same memory by reading back a random check the writer
wrote; a reader elsewhere (another machine or container) fails to and uses the socket. The arena's
size is sealed, so no one can shrink it under a reader's mapping.

Lifetime: ``place`` puts a tensor in a region held by a ``Lease``; the region is reused only once the
lease is released. The master's lease is one per submit, released when every call carrying it is
answered or lost (the worker copies a call's tensors out before it runs it, so an answer means it is
done with them); a worker's is one per answer, released when a later call says the master has read
that answer. Regions are placed first fit from the start, so the memory touched stays near the most
that is in flight at once. A tensor that does not fit travels on the socket as before: a lane only
ever makes a message cheaper, never impossible.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import stat
from dataclasses import dataclass, field
from typing import Any

import torch

ARENA_BYTES = 1 << 29  # virtual size; memory is used only where regions are written
ANSWER_ARENA_BYTES = 1 << 28  # a worker's, for its answers
MIN_TENSOR_BYTES = 1 << 16  # smaller tensors ride in the call's message: a region costs more than it saves
ALIGN = 64
CHECK_BYTES = 32  # the random check at offset 0; regions start after it
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL if hasattr(fcntl, "F_SEAL_SHRINK") else 0


class Lease:
    """The regions of one submit (or one answer): reusable once closed and every call holding them is
    done."""

    __slots__ = ("closed", "replies")

    def __init__(self) -> None:
        self.replies: list[Any] = []  # channel.Reply of each call sent with these regions
        self.closed = False

    def hold(self, reply: Any) -> None:
        self.replies.append(reply)

    def close(self) -> None:
        self.closed = True

    def released(self) -> bool:
        if self.closed:
            while self.replies and self.replies[-1].done:  # done stays done: checked once each
                self.replies.pop()
        return self.closed and not self.replies


@dataclass
class _Region:
    start: int
    end: int
    lease: Lease = field(repr=False)


class Arena:
    """The master's side: a sealed memory file of ``size`` bytes, written by the master only."""

    def __init__(self, size: int = ARENA_BYTES) -> None:
        if size <= CHECK_BYTES:
            raise ValueError(f"an arena of {size} bytes holds nothing; use at least {CHECK_BYTES + ALIGN}")
        self.size = size
        self._fd = os.memfd_create("sazd-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self._fd, size)
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self.check = secrets.token_hex(CHECK_BYTES)
        self._map[:CHECK_BYTES] = bytes.fromhex(self.check)
        self._base = torch.frombuffer(self._map, dtype=torch.uint8)
        self._address = self._base.data_ptr()
        self._live: list[_Region] = []  # sorted by start
        self.placed_bytes = 0  # bytes written into regions (deterministic counter)

    def spec(self) -> dict[str, Any]:
        """What a reader needs to map it (sent over Ray's control plane: the master's with a worker's key,
        a worker's in its answer)."""
        return {"path": f"/proc/{os.getpid()}/fd/{self._fd}", "size": self.size, "check": self.check}

    def place(self, t: torch.Tensor, lease: Lease) -> torch.Tensor | None:
        """A copy of contiguous CPU tensor ``t`` in a region held by ``lease``; None when it is small
        or does not fit now (send it on the socket)."""
        nbytes = t.numel() * t.element_size()
        if nbytes < MIN_TENSOR_BYTES or self._base is None:
            return None
        start = self._reserve(nbytes, lease)
        if start is None:
            return None
        copy = self._base[start : start + nbytes].view(t.dtype).view(t.shape)
        copy.copy_(t)
        self.placed_bytes += nbytes
        return copy

    def share(self, t: torch.Tensor, lease: Lease) -> int | None:
        """``place`` ``t`` and return where its copy lies (None: send it on the socket)."""
        copy = self.place(t, lease)
        return None if copy is None else self.offset_of(copy)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where ``t``'s bytes lie in the arena (None: not in it)."""
        offset = t.data_ptr() - self._address
        if self._base is None or not CHECK_BYTES <= offset < self.size:
            return None
        return offset

    def _reserve(self, nbytes: int, lease: Lease) -> int | None:
        self._live = [region for region in self._live if not region.lease.released()]
        start = CHECK_BYTES + (-CHECK_BYTES % ALIGN)
        for i, region in enumerate([*self._live, None]):
            end = self.size if region is None else region.start
            if end - start >= nbytes:
                self._live.insert(i, _Region(start, start + nbytes, lease))
                return start
            if region is not None:
                start = region.end + (-region.end % ALIGN)
        return None

    def in_use(self) -> int:
        """Bytes in regions not yet released."""
        return sum(r.end - r.start for r in self._live if not r.lease.released())

    def close(self) -> None:
        """Close the file; the mapping goes when the last tensor viewing it does."""
        self._base = None
        with contextlib.suppress(BufferError):  # tensors still view it: unmapped when they die
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def open_arena(size: int = ARENA_BYTES) -> Arena | None:
    """A new arena, or None where this system has no sealed memory files (not Linux) or will not
    give one now (out of memory or descriptors): the workers then use their sockets."""
    if not (_SEALS and hasattr(os, "memfd_create")):
        return None
    try:
        return Arena(size)
    except OSError:
        return None


class ArenaError(ValueError):
    """The reader cannot map the writer's arena: the writer's tensors use the socket."""


class MappedArena:
    """A reader's read-only view of the writer's arena; ``fill`` copies a region into a tensor."""

    def __init__(self, spec: Any) -> None:
        if not (isinstance(spec, dict) and set(spec) == {"path", "size", "check"}
                and isinstance(spec["path"], str) and type(spec["size"]) is int
                and isinstance(spec["check"], str) and len(spec["check"]) == 2 * CHECK_BYTES
                and spec["size"] > CHECK_BYTES):
            raise ArenaError(f"not an arena description: {spec!r:.200}")
        try:
            fd = os.open(spec["path"], os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO never blocks
        except OSError as err:
            raise ArenaError(f"cannot open {spec['path']} ({err.strerror}): not on the "
                             "writer's machine") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != spec["size"]:
                raise ArenaError(f"{spec['path']} is not a {spec['size']}-byte memory file of this user")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if _SEALS else 0
            if seals & _SEALS != _SEALS:
                raise ArenaError(f"{spec['path']} is not sealed against shrinking")
            self._map = mmap.mmap(fd, spec["size"], prot=mmap.PROT_READ)
        except OSError as err:  # F_GET_SEALS on a file that is not a memfd, or mmap
            raise ArenaError(f"cannot map {spec['path']} ({err.strerror})") from None
        finally:
            os.close(fd)
        if self._map[:CHECK_BYTES].hex() != spec["check"]:
            self._map.close()
            raise ArenaError(f"{spec['path']} is not the writer's arena (its check differs)")
        self.size = spec["size"]
        self._view = memoryview(self._map)

    def fill(self, t: torch.Tensor, offset: int) -> None:
        """Copy the region at ``offset`` into fresh contiguous CPU tensor ``t``; ValueError (a broken
        message) when the region is not inside the arena."""
        nbytes = t.numel() * t.element_size()
        if type(offset) is not int or not CHECK_BYTES <= offset <= self.size - nbytes:
            raise ValueError(f"a shared tensor of {nbytes} bytes at offset {offset!r:.30} is outside the "
                             f"{self.size}-byte arena")
        if nbytes:
            memoryview(t.reshape(-1).view(torch.uint8).numpy())[:] = self._view[offset : offset + nbytes]

    def close(self) -> None:
        """Unmap it (the copies ``fill`` made stay)."""
        with contextlib.suppress(BufferError):  # a view still exported: unmapped when it dies
            self._view.release()
            self._map.close()

