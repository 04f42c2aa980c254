"""Helpers shared by the trainer tests (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

from sazd.train.trainer import TrainConfig


def digits_config(**kw) -> TrainConfig:
    """A small float64 MLP (64-24-18-10, every layer coded) on scikit-learn's digits, in-process,
    sazd(6, 4); keyword arguments override."""
    base = dict(model="mlp", dataset="digits", hidden=(24, 18), backend="inproc", dtype="float64",
                plan={"fc1": "coded", "fc2": "coded", "fc3": "coded"}, batch_size=64, base_time_s=1e-3,
                show_progress=False, code="sazd", n=6, k=4)
    base.update(kw)
    return TrainConfig(**base)
