"""Datasets that load fully offline, and the deterministic batch order every trainer shares.

``load_dataset(name)`` returns a :class:`DataBundle`. Images are scaled to [0, 1] (uint8 / 255, digits
/ 16) and then standardised with ONE scalar mean and std computed over every pixel of the training
split actually used (after ``train_limit``); the test split uses the same training mean/std.

``batches(x, y, batch_size, seed, epoch)`` is the single source of batch order: the coded trainer and
the plain PyTorch reference both draw from it, so they see identical batches, and ``start=`` resumes an
epoch at a given batch (checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from sazd.data import text
from sazd.data.bundle import DataBundle, DatasetNotFoundError, seeded_generator, subset
from sazd.data.idx import read_idx, write_idx

__all__ = [
    "DATASETS",
    "DEFAULT_DIRS",
    "IDX_FILES",
    "DataBundle",
    "DatasetNotFoundError",
    "batches",
    "epoch_permutation",
    "load_dataset",
    "num_batches",
    "read_idx",
    "write_idx",
]

DATASETS = ("fashion-mnist", "mnist", "kmnist", "digits", "idx", "pystdlib", "text")  # text: sazd.data.text
DEFAULT_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
# split -> file stem; "<stem>" and "<stem>.gz" are tried, also with ".idx" in place of "-idx"
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
DIGITS_TRAIN = 1437  # load_digits has 1797 samples: the first 1437 train (80%), the last 360 test


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DataBundle:
    """Load ``name`` offline. ``train_limit``/``test_limit`` keep a seeded random subset of that many
    samples (in their original order; the same ``seed`` always gives the same subset)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; choose one of {list(DATASETS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: {dtype} is not supported; use torch.float32 or torch.float64")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: {seed!r} must be a non-negative integer")
    if name in text.TEXT_DATASETS:
        return text.load_text(name, data_dir, train_limit, test_limit, seed)
    if name == "digits":
        (train_x, train_y, test_x, test_y), scale = _load_digits()
    else:
        (train_x, train_y, test_x, test_y), scale = _load_idx_dir(name, data_dir)

    train_x, train_y = subset(train_x, train_y, train_limit, seed, "train_limit")
    test_x, test_y = subset(test_x, test_y, test_limit, seed, "test_limit")

    mean, std = _pixel_stats(train_x, scale)
    train_x, test_x = (train_x.to(dtype) / scale - mean) / std, (test_x.to(dtype) / scale - mean) / std

    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError(f"dataset {name!r}: a split holds 0 samples; use a dataset with samples")
    num_classes = 10 if name != "idx" else int(max(train_y.max(), test_y.max())) + 1
    for split, labels in (("train", train_y), ("test", test_y)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"dataset {name!r}: {split} labels span [{int(labels.min())}, {int(labels.max())}], "
                f"outside [0, {num_classes}); are the label files the right ones?"
            )
    return DataBundle(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        in_shape=tuple(train_x.shape[1:]),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


def _pixel_stats(x: torch.Tensor, scale: float) -> tuple[float, float]:
    """Mean and (unbiased) std of every value of ``x / scale``, accumulated in float64."""
    count = x.numel()
    if x.dtype == torch.uint8:  # exact and fast from the 256-bin histogram
        counts = torch.bincount(x.flatten(), minlength=256).to(torch.float64)
        values = torch.arange(256, dtype=torch.float64) / scale
        mean = float((counts * values).sum()) / count
        sq = float((counts * (values - mean).square()).sum())
    else:
        x = x.to(torch.float64) / scale
        mean = float(x.sum()) / count
        sq = float((x - mean).square().sum())
    std = (sq / max(count - 1, 1)) ** 0.5
    return mean, (std if std > 0 else 1.0)


def _load_digits() -> tuple[tuple[torch.Tensor, ...], float]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy(x).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(y).to(torch.int64)
    return (x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:]), 16.0  # pixels 0..16


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = directory / (candidate + suffix)
            if path.is_file():
                return path
    return None


def _load_idx_dir(name: str, data_dir: str | Path | None) -> tuple[tuple[torch.Tensor, ...], float]:
    """The four IDX tensors as stored (images (N, C, H, W) or (N, D)) and the divisor that maps them
    to [0, 1]: 255 for uint8 pixels, 1 for anything else (assumed already scaled)."""
    if data_dir is None:
        if name not in DEFAULT_DIRS:
            raise ValueError(
                f"data_dir: dataset {name!r} has no default location; pass --data-dir DIR holding "
                f"the four IDX files {list(IDX_FILES.values())} (plain or .gz)"
            )
        data_dir = DEFAULT_DIRS[name]
    directory = Path(data_dir)
    paths = {split: _find(directory, stem) for split, stem in IDX_FILES.items()}
    missing = [IDX_FILES[split] for split, path in paths.items() if path is None]
    if missing:
        how = (
            "install the Debian package with `apt-get install dataset-fashion-mnist` "
            f"(it puts them in {DEFAULT_DIRS['fashion-mnist']}), or "
            if name == "fashion-mnist"
            else ""
        )
        raise DatasetNotFoundError(
            f"dataset {name!r}: looked in {directory} for {missing} (plain or .gz) and did not find them; "
            f"{how}pass --data-dir DIR (data_dir=DIR) with the four IDX files {list(IDX_FILES.values())}"
        )
    tensors = {split: read_idx(path) for split, path in paths.items()}
    for split in ("train", "test"):
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"dataset {name!r}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match "
                f"({paths[split + '_x']}, {paths[split + '_y']}); expected (N, ...) images and (N,) labels"
            )
    for split, tensor in tensors.items():
        where = f"dataset {name!r}: {paths[split]}"
        if tensor.shape[0] == 0:
            raise ValueError(f"{where} holds 0 samples; point --data-dir at a dataset with samples")
        if split.endswith("_y") and (tensor.is_floating_point() or tensor.dtype == torch.bool):
            raise ValueError(f"{where}: labels are {tensor.dtype}, not integers; is this a label file?")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where} holds {bad} NaN or infinite values; fix or replace the file")
    if tensors["train_x"].shape[1:] != tensors["test_x"].shape[1:]:
        raise ValueError(
            f"dataset {name!r}: train images {tuple(tensors['train_x'].shape[1:])} and test images "
            f"{tuple(tensors['test_x'].shape[1:])} differ in shape"
        )
    scale = 255.0 if tensors["train_x"].dtype == torch.uint8 else 1.0
    out = []
    for split in ("train", "test"):
        x, y = tensors[f"{split}_x"], tensors[f"{split}_y"]
        out += [x.unsqueeze(1) if x.dim() == 3 else x, y.to(torch.int64)]  # (N, H, W) -> (N, 1, H, W)
    return tuple(out), scale


# ---- batch order -------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(n)`` fixed by ``(seed, epoch)``."""
    for arg, value in (("seed", seed), ("epoch", epoch)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{arg}: {value!r} must be a non-negative integer")
    return torch.randperm(n, generator=seeded_generator(seed, epoch))


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches ``batches`` yields for ``n`` samples."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: {batch_size!r} must be a positive integer")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool = True,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` for one epoch in the order fixed by ``(seed, epoch)``, from batch ``start`` on."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: {x.shape[0]} samples vs {y.shape[0]} labels; they must match")
    n = int(x.shape[0])
    total = num_batches(n, batch_size, drop_last)
    if not isinstance(start, int) or not 0 <= start <= total:
        raise ValueError(f"start: {start!r} must be a batch index in [0, {total}] for this epoch")
    order = epoch_permutation(n, seed, epoch)
    return _iterate(x, y, order, batch_size, start, total)


def _iterate(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int, start: int, total: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for b in range(start, total):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield x[idx.to(x.device)], y[idx.to(y.device)]
