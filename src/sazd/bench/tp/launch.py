"""Start k TP ranks as processes, torchrun-style, and collect what they wrote.

``launch(spec, k)`` writes the spec to a fresh private directory, picks a free TCP port on
127.0.0.1, starts ``python -m sazd.bench.tp.rank`` k times with torchrun's environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``OMP_NUM_THREADS=1``) and waits,
bounded: when a rank exits with an error (or dies by the latency model) the others get
``grace_s`` to notice, then are killed; past ``timeout_s`` everything is killed. Each rank's record
is read back as JSON (never unpickled).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sazd.bench.tp.rank import DIED_EXIT


@dataclass
class TPRun:
    """What the k ranks of one run did. ``stopped``: why the run ended early, or None."""

    records: list[dict[str, Any] | None]
    exit_codes: list[int | None]
    stopped: str | None = None
    params_path: Path | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.stopped is None

    def phases(self, rank: int = 0) -> list[dict[str, Any]]:
        """``rank``'s record of each phase it began (rank 0's step-to-step times are the run's: all ranks
        move in lockstep through the collectives)."""
        record = self.records[rank]
        return [] if record is None else list(record["phases"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh private directory (0700) that sazd made, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="sazd-tp-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def launch(spec: dict[str, Any], k: int, timeout_s: float = 300.0, grace_s: float = 10.0,
           keep: Path | None = None, on_start: Callable[[list[int]], Any] | None = None) -> TPRun:
    """Run ``k`` ranks on ``spec`` (see ``sazd.bench.tp.rank``); ``keep``: copy the trained parameters
    there (``params.safetensors``, when ``spec["save_params"]``). ``on_start(pids)`` is called once the
    ranks run and may return a context manager held until they end (e.g. a noisy neighbour)."""
    if type(k) is not int or k < 1:
        raise ValueError(f"TP ranks: k must be an integer >= 1, got {k!r}")
    with workdir() as tmp:
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(k), "OMP_NUM_THREADS": str(spec.get("threads", 1))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[3]),
                                                        env.get("PYTHONPATH")) if p)
        with contextlib.ExitStack() as stack:
            errs = [stack.enter_context(open(tmp / f"rank{r}.err", "wb")) for r in range(k)]
            procs = [subprocess.Popen([sys.executable, "-m", "sazd.bench.tp.rank", str(spec_path)],
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errs[r])
                     for r in range(k)]
            held = on_start([p.pid for p in procs]) if on_start else None
            if held is not None:
                stack.enter_context(held)
            stopped = _wait(procs, timeout_s, grace_s)
        records = [_read(tmp / f"rank{r}.json") for r in range(k)]
        codes = [p.returncode for p in procs]
        if stopped is None and any(c != 0 for c in codes):
            stopped = _why(tmp, codes, records)
        elif stopped is not None:
            stopped = f"{stopped}; {_why(tmp, codes, records)}"
        params = None
        if keep is not None and (tmp / "params.safetensors").is_file():
            params = keep / "params.safetensors"
            shutil.copyfile(tmp / "params.safetensors", params)
        return TPRun(records, codes, stopped, params, [p.pid for p in procs])


def _wait(procs: list[subprocess.Popen], timeout_s: float, grace_s: float) -> str | None:
    """Wait for every rank; kill the rest ``grace_s`` after one fails, or all at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait(timeout=30)
            return "timed out" if failed_at is None else None
        time.sleep(0.02)
    return None


def _why(tmp: Path, codes: list[int | None], records: list[dict[str, Any] | None]) -> str:
    for r, rec in enumerate(records):
        for i, phase in enumerate([] if rec is None else rec["phases"]):
            if phase["died_at"] is not None:
                return (f"rank {r} died at step {phase['died_at']} of phase {i}; the run stopped (TP cannot "
                        "lose a rank)")
    bad = [r for r, c in enumerate(codes) if c not in (0, DIED_EXIT)]
    if not bad:
        return "ranks exited early"
    tail = (tmp / f"rank{bad[0]}.err").read_text(errors="replace").strip().splitlines()[-3:]
    return f"rank {bad[0]} exited with {codes[bad[0]]}: " + " | ".join(tail)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
