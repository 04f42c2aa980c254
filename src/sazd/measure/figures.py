"""Figures of the measuring commands: matplotlib without a display, written without following links."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from sazd.files import write_atomic


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display), with the reports' common style."""
    import matplotlib  # here: `sazd --help` imports the commands, and matplotlib is slow to load

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def write_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """Render ``fig`` as PNG and replace ``path`` with it at once (a link at ``path`` is refused); the
    figure is closed."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", **savefig)
    finally:
        plt.close(fig)
    return write_atomic(path, png.getvalue(), "figure")
