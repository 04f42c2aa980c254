"""Helpers shared by the trainer tests (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sazd.train.trainer import TrainConfig


def digits_config(**kw) -> TrainConfig:
    """A small float64 MLP (64-24-18-10, every layer coded) on scikit-learn's digits, in-process,
    sazd(6, 4); keyword arguments override."""
    base = dict(model="mlp", dataset="digits", hidden=(24, 18), backend="inproc", dtype="float64",
                plan={"fc1": "coded", "fc2": "coded", "fc3": "coded"}, batch_size=64, base_time_s=1e-3,
                show_progress=False, code="sazd", n=6, k=4)
    base.update(kw)
    return TrainConfig(**base)


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where/disk``: a disk that really fills up (needs root; the test
    is skipped with the reason where a tmpfs cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = where / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"this container cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=30)
