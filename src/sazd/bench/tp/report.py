"""Tables, JSON, markdown and the plot of `sazd bench tp`.

Rows are ``PhaseResult.to_dict()``s grouped by phase. The crossover of a sweep is the straggler
intensity above which a sazd side's median iteration is shorter than TP's: found between the two
sweep points where ``sazd - TP`` changes sign, by linear interpolation (None when it never does,
the first point when sazd is faster from the start). With a target (``sazd.bench.tp.target``) the
same is done for the time to the target, the points where a side did not reach it left out.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sazd.files import write_atomic

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


def to_target(row: dict[str, Any]) -> str:
    """A row's time to the target: seconds and steps, or that it was not reached in the steps run."""
    if row["time_to_target_s"] is not None:
        return f"{row['time_to_target_s']:.2f} s ({row['steps_to_target']} steps)"
    if not row["step_s"]:
        return "-"
    return f"not reached in {len(row['step_s'])} steps" + (" (stopped)" if row["stopped"] else "")


FLOOR_NOTE = ("work: the side's CPU seconds of compute per iteration, all its processes together (sazd: "
              "the workers' products and updates, the workers alive throughout the phase, plus the "
              "master's encode and decode; TP: every rank's forward, backward and optimizer step); "
              "floor: work / the cores the processes may use; p50 / floor: the median iteration over it; "
              "work / TP: the side's work over TP's in the same phase; CPU: every CPU second of the side's "
              "processes per iteration, compute and overhead (sazd: workers and master, none with a "
              "target; TP: the ranks' steps); CPU / TP: over TP's")


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(phases: list[dict[str, Any]], target: dict[str, Any] | None = None) -> str:
    """Markdown: per phase and side, p50/p95 ms, ratio to TP, per-worker cost, the compute floor
    (``FLOOR_NOTE``), what happened; with a ``target``, also the time to it and its ratio to TP's."""
    head = ("| straggler | side | workers | p50 ms | p95 ms | p50 / TP | cost (worker-ms) | work ms "
            "| floor ms | p50 / floor | work / TP | CPU ms | CPU / TP | slowed |")
    if target is not None:
        head += f" to {target['metric']} {target['value']:g} | to target / TP |"
    lines = [head + " note |", "|---" * head.count("|") + "|"]
    for phase in phases:
        tp = next((r for r in phase["rows"] if r["side"].startswith("TP")), None)
        for row in phase["rows"]:
            ratio = "-" if tp is None or not tp["p50_s"] or row["p50_s"] is None \
                else f"{row['p50_s'] / tp['p50_s']:.2f}"
            repaired = f"{row['repairs']} repaired" if row["repairs"] else ""
            note = row["stopped"] or repaired or row["neighbour"] or ""
            slowed = ",".join(f"{w}:{c}" for w, c in row["slowed"].items()) or "-"
            line = (f"| {phase_label(phase['straggler'])} | {row['side']} | {row['workers']} | "
                    f"{_ms(row['p50_s'])} | {_ms(row['p95_s'])} | {ratio} | "
                    f"{_ms(row['cost_worker_s'])} | {_ms(row.get('compute_per_iteration_s'))} | "
                    f"{_ms(row.get('floor_s'))} | {_ratio(row.get('over_floor'))} | "
                    f"{_ratio(row.get('work_vs_tp'))} | {_ms(row.get('cpu_per_iteration_s'))} | "
                    f"{_ratio(row.get('cpu_vs_tp'))} | {slowed} |")
            if target is not None:
                mine, tps = row["time_to_target_s"], None if tp is None else tp["time_to_target_s"]
                line += f" {to_target(row)} | {'-' if mine is None or not tps else f'{mine / tps:.2f}'} |"
            lines.append(f"{line} {note} |")
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
    each sazd side's crossover with TP; with a target, the same for the time to it."""
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
        tp = next(s for s in sides if s.startswith("TP"))
        p50 = _series(chosen, sides, "p50_s")
        out[name] = {"x": xs, "p50_s": p50, "tp": tp, "crossover": _crossovers(xs, p50, tp)}
        if any(r.get("evals") for p in chosen for r in p["rows"]):
            tt = _series(chosen, sides, "time_to_target_s")
            out[name].update(time_to_target_s=tt, crossover_time_to_target=_crossovers(xs, tt, tp))
    return out


def _series(phases: list[dict[str, Any]], sides: list[str], key: str) -> dict[str, list[float | None]]:
    """Each side's ``key`` along the phases (None where the side has no row)."""
    return {s: [next((r[key] for r in p["rows"] if r["side"] == s), None) for p in phases] for s in sides}


def _crossovers(xs: list[float], ys: dict[str, list[float | None]], tp: str) -> dict[str, float | None]:
    return {s: crossover(xs, ys[tp], y) for s, y in ys.items() if s != tp}


def plot(sweep: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """p50 iteration time against straggler intensity, one panel per sweep, crossovers marked; with a
    target, a second row of panels: the time to it."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("factor", "prob") if n in sweep]
    panels = [("p50_s", "crossover", "median iteration (ms)", 1000.0)]
    if any("time_to_target_s" in sweep[n] for n in names):
        panels.append(("time_to_target_s", "crossover_time_to_target", "time to target (s)", 1.0))
    cols = max(len(names), 1)
    fig, axes = plt.subplots(len(panels), cols, figsize=(6 * cols, 4.2 * len(panels)), squeeze=False)
    xlabels = {"factor": "slowdown factor of one worker / rank", "prob": "probability of a slow call (x5)"}
    for row, (key, cross, ylabel, scale) in zip(axes, panels, strict=True):
        for ax, name in zip(row, names, strict=False):
            data = sweep[name]
            _panel(ax, data["x"], data.get(key, {}), data["tp"], data.get(cross, {}), scale)
            ax.set_xlabel(xlabels[name])
            ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), "bench tp plot")


def _panel(ax: Any, xs: list[float], series: dict[str, list[float | None]], tp: str,
           cross: dict[str, float | None], scale: float) -> None:
    """One side's line per series (TP in black), a dotted line at each crossover."""
    for side, ys in series.items():
        pts = [(x, scale * y) for x, y in zip(xs, ys, strict=True) if y is not None]
        style = "k-o" if side == tp else "-o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=side, markersize=4)
    at: dict[str, list[str]] = {}
    for side, x in cross.items():
        if x is not None:
            at.setdefault(f"{x:.2g}", []).append(side)
    for x, sides in at.items():
        ax.axvline(float(x), linestyle=":", color="grey")
        ax.annotate(f"{', '.join(sides)} < TP from {x}", (float(x), ax.get_ylim()[1]), rotation=90,
                    fontsize=7, va="top", ha="right")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def markdown(result: dict[str, Any]) -> str:
    sweep = result["sweeps"]
    lines = [f"# sazd bench tp: {result['title']}", "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}; load before: {result['uptime_before']}; "
             f"after: {result['uptime_after']}",
             "", "Stragglers: " + result["straggler_note"], ""]
    target = result.get("target")
    if target is not None:
        lines += ["Time to target: " + target_note(target), ""]
    if "floor_note" in result:
        lines += [f"Compute floor ({result['cores']} cores): {result['floor_note']}", ""]
    lines += [table(result["phases"], target), ""]
    for name, data in sweep.items():
        lines += [f"Crossover ({name}): {crossovers(data['crossover'])}", ""]
        if "crossover_time_to_target" in data:
            lines += [f"Crossover of the time to target ({name}): "
                      f"{crossovers(data['crossover_time_to_target'])}", ""]
    lines += ["## Profile of a DEU iteration (master, no straggler)", "", profile_table(result["phases"]), ""]
    return "\n".join(lines)


def crossovers(cross: dict[str, float | None]) -> str:
    return ", ".join(f"{s}: {'-' if x is None else f'{x:.3g}'}" for s, x in cross.items())


def target_note(target: dict[str, Any]) -> str:
    """What the time-to-target columns measure, in one paragraph."""
    goal = "test accuracy >= " if target["metric"] == "accuracy" else "validation loss <= "
    return (f"{goal}{target['value']:g} on {target['eval_limit']} held-out samples, each side's own model "
            f"evaluated every {target['every']} steps (at most {target['max_steps']}); every phase starts "
            "from the seed's initial weights; the time is the sum of that side's measured step times up "
            "to the first evaluation that reached the target, evaluations excluded")


def write(out: Path, result: dict[str, Any]) -> list[Path]:
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / RESULTS, out / MARKDOWN]
    write_atomic(paths[0], json.dumps(result, indent=2, sort_keys=True) + "\n", "bench tp results")
    write_atomic(paths[1], markdown(result), "bench tp report")
    if result["sweeps"]:
        plot(result["sweeps"], out / PLOT, result["title"])
        paths.append(out / PLOT)
    return paths
