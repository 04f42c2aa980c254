"""What a run reports: JSON-ready values, the figures (loss, accuracy, perplexity, worker latency) as
PNG bytes, the progress bar and the text tables. Where they are written: ``sazd.train.rundir``.

The metric figures draw every numeric key ending in ``loss`` (loss.png) and every numeric key
containing ``acc`` (accuracy.png) against ``iteration`` (or the line number); keys containing
``perplexity`` go to perplexity.png, drawn only when some were logged.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

LOSS_PNG, ACC_PNG, PPL_PNG, LATENCY_PNG = "loss.png", "accuracy.png", "perplexity.png", "latency.png"
REPORT_FORMAT = "sazd-report-1"


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from what training produces: tensors, numpy scalars/arrays, paths, dataclasses,
    dtypes. Non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(value.tolist())
    return str(value)  # torch.dtype, torch.device, enums ...


def _series(rows: list[dict[str, Any]], x: str, use_index: bool, wanted) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = {}
    for i, row in enumerate(rows):
        xv = i if use_index else row.get(x)
        if not _is_number(xv):
            continue
        for key, value in row.items():
            if key != x and wanted(key) and _is_number(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(xv)
                ys.append(value)
    return series


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Progress:
    """A tqdm bar over ``iterable`` that is a silent pass-through when disabled."""

    def __init__(
        self, iterable: Iterable, total: int | None = None, desc: str = "", disable: bool | None = None
    ):
        from tqdm import tqdm

        if disable is None:  # only draw on a terminal; logs and CI get none of the carriage-return noise
            disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        self.bar = tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=True)

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def set_postfix(
        self, loss: float | None = None, acc: float | None = None, iter_s: float | None = None, **extra: Any
    ) -> None:
        """Show the latest loss, accuracy (0..1, shown in %) and iteration time (shown in ms)."""
        shown = {}
        if loss is not None:
            shown["loss"] = f"{float(loss):.4f}"
        if acc is not None:
            shown["acc"] = f"{100 * float(acc):.2f}%"
        if iter_s is not None:
            shown["iter"] = f"{1000 * float(iter_s):.1f}ms"
        shown.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in extra.items()})
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable, total: int | None = None, desc: str = "", disable: bool | None = None
) -> Progress:
    """``for xb, yb in (bar := progress(batches(...), total, "epoch 1")): ...; bar.set_postfix(loss=...)``.
    ``disable=None`` draws only when stderr is a terminal."""
    return Progress(iterable, total=total, desc=desc, disable=disable)


def metric_figures(rows: list[dict[str, Any]], x: str = "iteration") -> dict[str, bytes]:
    """{file name: PNG} of loss.png and accuracy.png (and perplexity.png when logged) from metric rows."""
    plt = _pyplot()
    use_index = not any(x in row for row in rows)
    out = {}
    for kind, filename, wanted in (
        ("loss", LOSS_PNG, lambda key: key.endswith("loss")),
        ("accuracy", ACC_PNG, lambda key: "acc" in key),
        ("perplexity", PPL_PNG, lambda key: "perplexity" in key),
    ):
        series = _series(rows, x, use_index, wanted)
        if kind == "perplexity" and not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, markersize=3)
        if series:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {kind} values logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("metrics line" if use_index else x)
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        out[filename] = _png(fig)
    return out


def latency_figure(log: Any, n: int) -> bytes:
    """latency.png: every worker's answer time per compute round (``log``: a ``ResponseLog``), with the
    rounds it was late, failed or was skipped marked along the bottom."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    for j in range(n):
        xs, ys = log.series(j)
        line = ax.plot(xs, [1000 * y for y in ys], marker=".", markersize=3, linewidth=0.8,
                       label=f"worker {j}")
        missed = [i for i, row in enumerate(log.rounds) if row.get(j, ("skipped", None))[0] != "answered"]
        ax.plot(missed, [0] * len(missed), "|", color=line[0].get_color(), markersize=8)
    ax.set_xlabel("compute round")
    ax.set_ylabel("answer time (ms)")
    ax.set_title("worker answer times (ticks at 0: late, failed or skipped)", fontsize=9)
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=7, ncol=min(n, 4))
    return _png(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def latency_table(rows: list[dict[str, Any]]) -> str:
    """The per-worker latency summary (``ResponseLog.summary``) as a short text table."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1000 * value:.1f}"

    lines = ["worker  answered  median ms  p95 ms  late  skipped  failed  respawns"]
    lines += [f"{r['worker']:6d}  {r['answered']:8d}  {ms(r['median_s']):>9s}  {ms(r['p95_s']):>6s}  "
              f"{r['late']:4d}  {r['skipped']:7d}  {r['failed']:6d}  {r['respawns']:8d}" for r in rows]
    return "\n".join(lines)


def workers_line(infos: list[dict[str, Any]]) -> str:
    """Where the workers run, in one line: ``workers on 3 node(s): 0@a1b2c3(cpu) 1@d4e5f6(cpu) ...``."""
    nodes = len({w["node_id"] for w in infos})
    def short(node_id: Any) -> str:  # Ray's node ids are 56 hex digits; 6 tell them apart
        return str(node_id)[:6] if len(str(node_id)) > 12 else str(node_id)

    placed = " ".join(f"{w['index']}@{short(w['node_id'])}({w['device']})" for w in infos)
    return f"workers on {nodes} node(s): {placed}"
