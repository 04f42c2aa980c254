"""The one description of the machine a figure came from: CPU, cores, load, versions, date."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, load average (other work skews timings), versions, UTC date."""
    import torch  # here, not at the top: `sazd --help` imports this module

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "loadavg_at_start": None,
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def machine_line(m: dict[str, Any]) -> str:
    """``machine()`` in one line, for the head of a report."""
    return (
        f"{m['cpu']}, {m['nproc']} cores, {m['device']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"ray {m['ray']}, python {m['python']}, {m['date_utc']} UTC, load average at start "
        f"{m['loadavg_at_start']}"
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
