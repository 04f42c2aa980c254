"""Tables, JSON, markdown and the plot of `sazd bench tp`.

Rows are ``PhaseResult.to_dict()``s grouped by phase. The crossover of a sweep is the straggler
intensity above which a sazd side's median iteration is shorter than TP's: found between the two
sweep points where ``sazd - TP`` changes sign, by linear interpolation (None when it never does,
the first point when sazd is faster from the start).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS, MARKDOWN, PLOT = "tp-results.json", "tp-report.md", "tp-sweep.png"


def check_out(out: Path) -> None:
    """``--out`` is a real directory (or can be made one), and none of the files we write is a link."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; sazd writes only into directories it can trust, "
                         "give a real directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; give a directory")
    for name in (RESULTS, MARKDOWN, PLOT):
        if (out / name).is_symlink():
            raise ValueError(f"--out {out}: {name} there is a symbolic link; remove it or choose another "
                             "--out")


def write_text(path: Path, data: str | bytes) -> None:
    """Write atomically by a fresh temporary name and a rename: a link at ``path`` is replaced, never
    written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def crossover(xs: Sequence[float], tp: Sequence[float | None], sazd: Sequence[float | None]) -> float | None:
    """The intensity above which ``sazd`` (median seconds per point) beats ``tp``; None if never."""
    points = [(x, s - t) for x, t, s in zip(xs, tp, sazd, strict=True) if t is not None and s is not None]
    if not points:
        return None
    if points[0][1] < 0:
        return points[0][0]
    for (x0, d0), (x1, d1) in itertools.pairwise(points):
        if d0 >= 0 > d1:
            return x0 + (x1 - x0) * d0 / (d0 - d1)
    return None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def phase_label(straggler: dict[str, Any]) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in straggler.items() if k != "kind")
    return straggler["kind"] + (f" ({fields})" if fields else "")


def table(phases: list[dict[str, Any]]) -> str:
    """Markdown: per phase and side, p50/p95 ms, ratio to TP, per-worker cost, what happened."""
    lines = ["| straggler | side | workers | p50 ms | p95 ms | p50 / TP | cost (worker-ms) | slowed | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for phase in phases:
        tp = next((r for r in phase["rows"] if r["side"].startswith("TP")), None)
        for row in phase["rows"]:
            ratio = "-" if tp is None or not tp["p50_s"] or row["p50_s"] is None \
                else f"{row['p50_s'] / tp['p50_s']:.2f}"
            repaired = f"{row['repairs']} repaired" if row["repairs"] else ""
            note = row["stopped"] or repaired or row["neighbour"] or ""
            slowed = ",".join(f"{w}:{c}" for w, c in row["slowed"].items()) or "-"
            lines.append(f"| {phase_label(phase['straggler'])} | {row['side']} | {row['workers']} | "
                         f"{_ms(row['p50_s'])} | {_ms(row['p95_s'])} | {ratio} | "
                         f"{_ms(row['cost_worker_s'])} | {slowed} | {note} |")
    return "\n".join(lines)


def profile_table(phases: list[dict[str, Any]]) -> str:
    """Markdown: the master's time per DEU iteration (no straggler phase) of each sazd side."""
    quiet = next((p for p in phases if p["straggler"]["kind"] == "none"), phases[0] if phases else None)
    lines = ["| side | iteration ms | encode ms | decode ms | update ms | waiting for workers ms | other ms "
             "| messages | rounds | MB to / from workers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in [] if quiet is None else quiet["rows"]:
        p = row["profile"]
        if not p:
            continue
        lines.append(f"| {row['side']} | {_ms(p['iteration_s'])} | {_ms(p['encode_s'])} | "
                     f"{_ms(p['decode_s'])} | {_ms(p['update_s'])} | {_ms(p['worker_s'])} | "
                     f"{_ms(p['master_other_s'])} | "
                     f"{p['calls_per_iteration']:.1f} | {p['cluster_rounds_per_iteration']:.1f} | "
                     f"{p['bytes_to_workers'] / 1e6:.2f} / {p['bytes_from_workers'] / 1e6:.2f} |")
    return "\n".join(lines)


def sweeps(phases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per sweep (``factor``: one slow worker; ``prob``: slow calls) the x values, each side's p50 and
    each sazd side's crossover with TP."""
    out: dict[str, dict[str, Any]] = {}
    quiet = next((p for p in phases if p["straggler"]["kind"] == "none"), None)
    for name in ("factor", "prob"):
        chosen = [p for p in phases if p.get("sweep") == name]
        if not chosen:
            continue
        xs = [p["x"] for p in chosen]
        if name == "prob" and quiet is not None:  # no slow call at all: the run without a straggler
            chosen, xs = [quiet, *chosen], [0.0, *xs]
        sides = list(dict.fromkeys(r["side"] for p in chosen for r in p["rows"]))
        p50 = {s: [next((r["p50_s"] for r in p["rows"] if r["side"] == s), None) for p in chosen]
               for s in sides}
        tp = next(s for s in sides if s.startswith("TP"))
        cross = {s: crossover(xs, p50[tp], p50[s]) for s in sides if s != tp}
        out[name] = {"x": xs, "p50_s": p50, "tp": tp, "crossover": cross}
    return out


def plot(sweep: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """p50 iteration time against straggler intensity, one panel per sweep, crossovers marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("factor", "prob") if n in sweep]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(6 * max(len(names), 1), 4.2), squeeze=False)
    xlabels = {"factor": "slowdown factor of one worker / rank", "prob": "probability of a slow call (x5)"}
    for ax, name in zip(axes[0], names, strict=False):
        data = sweep[name]
        for side, ys in data["p50_s"].items():
            pts = [(x, 1000 * y) for x, y in zip(data["x"], ys, strict=True) if y is not None]
            style = "k-o" if side == data["tp"] else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=side, markersize=4)
        at: dict[str, list[str]] = {}
        for side, x in data["crossover"].items():
            if x is not None:
                at.setdefault(f"{x:.2g}", []).append(side)
        for x, sides in at.items():
            ax.axvline(float(x), linestyle=":", color="grey")
            ax.annotate(f"{', '.join(sides)} < TP from {x}", (float(x), ax.get_ylim()[1]), rotation=90,
                        fontsize=7, va="top", ha="right")
        ax.set_xlabel(xlabels[name])
        ax.set_ylabel("median iteration (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_text(path, buf.getvalue())


def markdown(result: dict[str, Any]) -> str:
    sweep = result["sweeps"]
    lines = [f"# sazd bench tp: {result['title']}", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; load before: {result['uptime_before']}; "
             f"after: {result['uptime_after']}",
             "", "Stragglers: " + result["straggler_note"], "", table(result["phases"]), ""]
    for name, data in sweep.items():
        cross = ", ".join(f"{s}: {'-' if x is None else f'{x:.3g}'}" for s, x in data["crossover"].items())
        lines += [f"Crossover ({name}): {cross}", ""]
    lines += ["## Profile of a DEU iteration (master, no straggler)", "", profile_table(result["phases"]), ""]
    return "\n".join(lines)


def write(out: Path, result: dict[str, Any]) -> list[Path]:
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / RESULTS, out / MARKDOWN]
    write_text(paths[0], json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_text(paths[1], markdown(result))
    if result["sweeps"]:
        plot(result["sweeps"], out / PLOT, result["title"])
        paths.append(out / PLOT)
    return paths
