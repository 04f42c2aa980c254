"""A run directory (config.json, metrics.jsonl, report.json, loss.png, accuracy.png, and perplexity.png
for language models) and a progress bar.

metrics.jsonl holds one JSON object per line, appended and flushed as training goes, so a run that
dies still leaves its history. ``plot`` draws every numeric key ending in ``loss`` into loss.png and
every numeric key containing ``acc`` into accuracy.png, against ``iteration`` (or the line number);
keys containing ``perplexity`` go to perplexity.png, drawn only when some were logged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

CONFIG, METRICS, REPORT = "config.json", "metrics.jsonl", "report.json"
LOSS_PNG, ACC_PNG, PPL_PNG = "loss.png", "accuracy.png", "perplexity.png"


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


class RunDir:
    """The directory of one training run; created (with parents) on construction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run dir: {self.path} exists and is not a directory; pick another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)

    def _write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")
        tmp.replace(target)  # atomic: a reader never sees half a file
        return target

    def write_config(self, config: Mapping[str, Any]) -> Path:
        return self._write_json(CONFIG, config)

    def write_report(self, report: Mapping[str, Any]) -> Path:
        return self._write_json(REPORT, report)

    def log(self, record: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one line to metrics.jsonl: ``record`` and/or keyword fields, flushed immediately."""
        line = json.dumps(to_jsonable({**(record or {}), **fields}), sort_keys=True)
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def read_config(self) -> dict[str, Any]:
        return json.loads((self.path / CONFIG).read_text(encoding="utf-8"))

    def read_report(self) -> dict[str, Any]:
        return json.loads((self.path / REPORT).read_text(encoding="utf-8"))

    def plot(self, x: str = "iteration") -> dict[str, Path]:
        """Draw loss.png and accuracy.png (and perplexity.png when logged) from metrics.jsonl; returns
        {"loss": path, "accuracy": path[, "perplexity": path]}."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
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
                ax.text(
                    0.5, 0.5, f"no {kind} values logged", ha="center", va="center", transform=ax.transAxes
                )
            ax.set_xlabel("metrics line" if use_index else x)
            ax.set_ylabel(kind)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            out[kind] = self.path / filename
            fig.savefig(out[kind], dpi=100)
            plt.close(fig)
        return out


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
