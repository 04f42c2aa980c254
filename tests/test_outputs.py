"""sazd.files: output files never written through a link, atomic writes, one owner per directory, and
true messages on a full disk (a real, tiny tmpfs when the tests run as root; /dev/full everywhere)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from _support import small_disk
from sazd import files
from sazd.files import DirLock, DiskFullError, OutputError


def test_append_creates_appends_and_is_readable(tmp_path):
    target = tmp_path / "metrics.jsonl"
    files.append_text(target, "a\n")
    files.append_text(target, "b\n")
    assert target.read_text() == "a\nb\n"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044 == 0o044


def test_append_refuses_a_link_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "users_file.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OutputError, match="is a link"):
        files.append_text(tmp_path / "metrics.jsonl", "x\n")
    with pytest.raises(OutputError, match="is a link"):
        files.open_append(tmp_path / "metrics.jsonl")
    assert victim.read_text() == "precious\n"


def test_append_refuses_a_dangling_link_without_creating_its_target(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="is a link"):
        files.append_text(tmp_path / "metrics.jsonl", "x\n")
    assert not (tmp_path / "elsewhere").exists()


def test_append_refuses_a_fifo_without_waiting_and_a_device_and_a_directory(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        files.append_text(fifo, "x\n")
    with pytest.raises(OutputError, match="not a regular file"):
        files.append_text("/dev/null", "x\n")
    with pytest.raises(OutputError, match="not a regular file"):
        files.append_text(tmp_path, "x\n")


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    files.write_atomic(target, "new", durable=True)
    files.write_atomic(tmp_path / "raw.bin", b"\x00\x01")
    assert target.read_text() == "new"
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.bin", "report.json"]


def test_write_atomic_refuses_a_link_and_a_directory(tmp_path):
    victim = tmp_path / "users_file.txt"
    victim.write_text("precious\n")
    (tmp_path / "report.md").symlink_to(victim)
    with pytest.raises(OutputError, match="is a link"):
        files.write_atomic(tmp_path / "report.md", "x")
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "report.md").is_symlink()
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        files.write_atomic(tmp_path / "d", "x")


def test_check_dir_refuses_foreign_links_and_a_linked_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert files.check_dir(run) == run
    (run / "metrics.jsonl").symlink_to(tmp_path / "x")
    with pytest.raises(OutputError, match=r"holds a link sazd did not make \(metrics.jsonl\)"):
        files.check_dir(run, "--run-dir")
    assert files.check_dir(run, made=["metrics.jsonl"]) == run
    (tmp_path / "alias").symlink_to(run)
    with pytest.raises(OutputError, match=r"--out .*alias is a link"):
        files.make_dir(tmp_path / "alias", "--out")
    (tmp_path / "plain").write_text("")
    with pytest.raises(OutputError, match="not a directory"):
        files.make_dir(tmp_path / "plain")
    assert files.make_dir(tmp_path / "a" / "b").is_dir()


def test_lock_holds_the_pid_and_refuses_a_second_owner_by_pid(tmp_path):
    with DirLock(tmp_path, "--out") as lock:
        assert lock.held
        assert (tmp_path / files.LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputError, match=f"in use by process {os.getpid()}"):
            DirLock(tmp_path, "--out").acquire()
    assert not (tmp_path / files.LOCK_NAME).exists()
    with DirLock(tmp_path) as again:  # released means free
        assert again.took_over is None


def test_a_holder_that_has_not_yet_written_its_pid_is_still_named(tmp_path, monkeypatch):
    """The owner takes the flock, then writes its PID: a second process that meets the empty file
    reads it again (bounded) and names the owner."""
    import fcntl

    holder = os.open(tmp_path / files.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waits = []

    def owner_writes_its_pid_meanwhile(seconds):
        waits.append(seconds)
        os.pwrite(holder, b"4242\n", 0)

    monkeypatch.setattr(files, "_pause", owner_writes_its_pid_meanwhile)
    try:
        with pytest.raises(OutputError, match="in use by process 4242 "):
            DirLock(tmp_path, "--out").acquire()
        assert len(waits) == 1
        os.ftruncate(holder, 0)  # an owner that never writes: named as another process, after a bounded wait
        monkeypatch.setattr(files, "_pause", waits.append)
        with pytest.raises(OutputError, match="in use by another process"):
            DirLock(tmp_path, "--out").acquire()
        assert 1 < len(waits) <= 20
    finally:
        os.close(holder)


_HOLDER = """
import sys, time
from sazd.files import DirLock
lock = DirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_process_holding_the_lock_is_named_and_a_killed_ones_lock_is_taken_over_aloud(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(OutputError, match=f"in use by process {proc.pid}"):
            DirLock(tmp_path, "--run-dir").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    said = []
    lock = DirLock(tmp_path, "--run-dir", announce=said.append).acquire()
    try:
        assert lock.took_over == proc.pid
        assert said == [f"--run-dir {tmp_path} was locked by process {proc.pid}, which is no longer running; "
                        "taking the lock over"]
        assert (tmp_path / files.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_a_stale_lock_is_announced_on_stderr_by_default(tmp_path, capfd):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    (tmp_path / files.LOCK_NAME).write_text(f"{dead.pid}\n")
    with DirLock(tmp_path, "--out"):
        pass
    assert f"locked by process {dead.pid}" in capfd.readouterr().err


def test_releasing_a_lock_whose_file_was_replaced_leaves_the_new_file(tmp_path):
    lock = DirLock(tmp_path, "--out").acquire()
    (tmp_path / files.LOCK_NAME).rename(tmp_path / "moved-away")
    (tmp_path / files.LOCK_NAME).write_text("someone else's\n")  # not the file this lock created
    lock.release()
    assert (tmp_path / files.LOCK_NAME).read_text() == "someone else's\n"
    assert (tmp_path / "moved-away").exists()


def test_lock_file_that_is_a_link_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / files.LOCK_NAME).symlink_to(victim)
    with pytest.raises(OutputError, match="link"):
        DirLock(run).acquire()
    assert victim.read_text() == "precious"


def test_disk_full_inside_a_block_becomes_a_true_message():
    message = "no space left on the device holding /dev/full while writing metrics; nothing was written"
    with (pytest.raises(DiskFullError, match=message), files.disk_full_means("/dev/full", "metrics",
                                                                             "nothing was written"),
          open("/dev/full", "wb", buffering=0) as f):
        f.write(b"x")
    with pytest.raises(KeyError), files.disk_full_means("/dev/full", "metrics", ""):  # others unchanged
        raise KeyError("k")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that really fills up."""
    with small_disk(tmp_path, "64k") as mount:
        yield mount


def test_full_disk_atomic_write_keeps_the_old_file(tiny_disk):
    target = tiny_disk / "report.json"
    files.write_atomic(target, "old report")
    with pytest.raises(DiskFullError, match=r"report.json was left as it was"):
        files.write_atomic(target, "x" * 200_000, "the report")
    assert target.read_text() == "old report"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["report.json"]
    with pytest.raises(DiskFullError, match=r"new.json was not created"):
        files.write_atomic(tiny_disk / "new.json", "x" * 200_000)


def test_full_disk_append_leaves_no_half_line(tiny_disk):
    target = tiny_disk / "metrics.jsonl"
    files.append_text(target, "line 1\n")
    with pytest.raises(DiskFullError, match=r"metrics.jsonl was left as it was before this write"):
        files.append_text(target, "y" * 200_000 + "\n", "metrics")
    assert target.read_text() == "line 1\n"
    files.append_text(target, "line 2\n")
    assert target.read_text() == "line 1\nline 2\n"

