"""Safe output files: the one place sazd opens a file or a directory for writing.

- ``append_text`` / ``open_append`` open without following a link (``O_NOFOLLOW``) and only a regular
  file (a FIFO or a device is refused, never waited on).
- ``write_atomic`` writes a fresh temporary file that we create in the same directory, then renames it
  over the target: a reader sees the old file or the new one, never half of one.
- ``check_dir`` refuses a directory that is a link or holds links that sazd did not make.
- ``DirLock`` lets one process at a time own a directory: a lock file holding the owner's PID and an
  ``flock`` on it (the kernel drops it when the owner dies). A live owner is refused by PID; a lock
  left by a dead one is taken over and announced, never silently.
- A full disk (``ENOSPC``, ``EDQUOT``) is a ``DiskFullError`` whose message says what was written, where,
  and what the file holds now (an atomic write leaves the old file, a failed append is cut back).

Every refusal is an ``OutputError`` (a ``ValueError``: the CLI prints it as one line, exit status 2).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

LOCK_NAME = ".sazd.lock"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class OutputError(ValueError):
    """An output path sazd refuses to write: a link, a non-regular file, a directory another process owns."""


class DiskFullError(OSError):
    """No space (or quota) left while writing ``path``; ``str()`` is the whole, true story."""

    def __init__(self, path: str | Path, what: str, left: str) -> None:
        self.path = Path(path)
        super().__init__(errno.ENOSPC, f"no space left on the device holding {self.path} while writing "
                                       f"{what}; {left}. Free space there or choose another directory")

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _FULL


def _refuse_link(path: Path, what: str) -> None:
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a link; sazd never writes through a link it did not make: "
                          f"give the real path ({path.resolve()}) or another one")


def open_append(path: str | Path, what: str = "file") -> IO[str]:
    """``path`` opened for appending text, created (0644) if missing; a link or non-regular file is
    refused. The caller closes it."""
    path = Path(path)
    try:
        fd = os.open(path, _APPEND_FLAGS, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            _refuse_link(path, what)
        if err.errno in (errno.ENXIO, errno.EISDIR):
            raise OutputError(f"{what} {path} is not a regular file; give a file path") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{what} {path} is not a regular file; give a file path")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def append_text(path: str | Path, text: str, what: str = "file") -> None:
    """Append ``text`` to ``path`` (see ``open_append``), flushed. If the disk fills, the file is cut
    back to its size before the call (no half line left) and a ``DiskFullError`` says so."""
    path = Path(path)
    with open_append(path, what) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        data = text.encode("utf-8")
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as err:
            if not is_disk_full(err):
                raise
            os.ftruncate(fd, size)
            raise DiskFullError(path, what, f"{path.name} was left as it was before this write") from None


def write_atomic(path: str | Path, data: str | bytes, what: str = "file", *, durable: bool = False) -> Path:
    """Replace ``path`` with ``data`` at once: a temporary file we create beside it (0644), fsynced
    when ``durable``, renamed over it. A link or directory at ``path`` is refused; on a full disk the
    old file is untouched and the temporary removed."""
    path = Path(path)
    _refuse_link(path, what)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file path")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable like any other output (mkstemp creates 0600)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            left = f"{path.name} was left as it was" if path.exists() else f"{path.name} was not created"
            raise DiskFullError(path, what, left) from None
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def fsync_dir(path: str | Path) -> None:
    """Make renames inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def links_in(path: str | Path, made: Iterable[str] = ()) -> list[Path]:
    """The symbolic links directly inside ``path`` whose names are not in ``made`` (links sazd made)."""
    made = set(made)
    with os.scandir(path) as entries:
        return sorted(Path(e.path) for e in entries if e.is_symlink() and e.name not in made)


def check_dir(path: str | Path, what: str = "directory", made: Iterable[str] = ()) -> Path:
    """Refuse ``path`` if it is a link, or an existing directory holding links sazd did not make."""
    path = Path(path)
    _refuse_link(path, what)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory; choose another {what}")
    if path.is_dir():
        foreign = links_in(path, made)
        if foreign:
            raise OutputError(f"{what} {path} holds a link sazd did not make ({foreign[0].name}); sazd never "
                              f"writes through a link: remove it or choose another {what}")
    return path


def make_dir(path: str | Path, what: str = "directory", made: Iterable[str] = ()) -> Path:
    """``check_dir``, then the directory created with its parents."""
    path = check_dir(path, what, made)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _holder(fd: int, tries: int = 20, pause_s: float = 0.01) -> int | None:
    """The PID in a lock file another process holds; it writes it just after taking the flock, so
    an empty file is read again for up to ``tries * pause_s`` seconds."""
    for _ in range(tries - 1):
        pid = _read_pid(fd)
        if pid is not None:
            return pid
        _pause(pause_s)
    return _read_pid(fd)


def _announce(message: str) -> None:
    print(f"sazd: {message}", file=sys.stderr, flush=True)


class DirLock:
    """One process at a time owns ``path`` (a directory); use as a context manager or acquire/release.

    The lock is an ``flock`` on ``path/.sazd.lock``, which holds the owner's PID for the messages.
    Taking over a lock file left by a process that is gone goes through ``announce`` (default: one line
    on stderr)."""

    def __init__(self, path: str | Path, what: str = "directory",
                 announce: Callable[[str], None] = _announce) -> None:
        self.path, self.what, self.announce = Path(path), what, announce
        self.file = self.path / LOCK_NAME
        self._fd: int | None = None
        self.took_over: int | None = None  # the PID of the dead owner whose lock was taken over

    def acquire(self) -> DirLock:
        if self._fd is not None:
            return self
        check_dir(self.path, self.what)
        for _ in range(100):  # another process may unlink the file between our open and our flock
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                who = f"process {holder}" if holder is not None else "another process"
                raise OutputError(f"{self.what} {self.path} is in use by {who} (lock {self.file}); wait "
                                  f"for it to finish, stop it, or choose another {self.what}") from None
            except BaseException:
                os.close(fd)
                raise
            if self._same_file(fd):
                break
            os.close(fd)
        else:
            raise OutputError(f"{self.what} {self.path}: its lock file keeps being replaced; choose "
                              f"another {self.what}")
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid():
            state = "which is no longer running" if not _alive(previous) else "which no longer holds it"
            self.took_over = previous
            self.announce(f"{self.what} {self.path} was locked by process {previous}, {state}; "
                          "taking the lock over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._same_file(fd):
                self.file.unlink(missing_ok=True)  # still under flock: no one else holds this file
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.file, flags, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                _refuse_link(self.file, "lock file")
            if is_disk_full(err):
                raise DiskFullError(self.file, "the lock file", "nothing was locked") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"lock file {self.file} is not a regular file; remove it or choose another "
                              f"{self.what}")
        return fd

    def _same_file(self, fd: int) -> bool:
        try:
            now = os.stat(self.file, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextmanager
def disk_full_means(path: str | Path, what: str, left: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into a ``DiskFullError`` saying ``left`` (what the
    output holds now); other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(path, what, left) from None
        raise
