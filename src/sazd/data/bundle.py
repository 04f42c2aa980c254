"""What a loaded dataset is (``DataBundle``), the error for one that is not there, and seeded subsets:
the parts the image and text loaders share."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """The IDX files of a dataset are not where we looked (also a ValueError, for CLI error handling)."""


@dataclasses.dataclass
class DataBundle:
    """Train/test tensors: ``*_x`` float (N, *in_shape), ``*_y`` int64 (N,) class labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    in_shape: tuple[int, ...]
    num_classes: int
    mean: float  # training-set pixel mean after scaling to [0, 1], subtracted from every split
    std: float  # training-set pixel std after scaling to [0, 1], divided out of every split

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DataBundle:
        """A copy with the images in ``dtype`` (labels stay int64) and everything on ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device=device, dtype=dtype),
            test_x=self.test_x.to(device=device, dtype=dtype),
            train_y=self.train_y.to(device=device),
            test_y=self.test_y.to(device=device),
        )


def subset(
    x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int, arg: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    if limit is None or limit == n:
        return x, y
    if not isinstance(limit, int) or limit < 1 or limit > n:
        raise ValueError(f"{arg}: {limit!r} must be an integer in [1, {n}] (the split has {n} samples)")
    keep = torch.randperm(n, generator=seeded_generator(seed, -1))[:limit].sort().values
    return x[keep], y[keep]


def seeded_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) into one well-spread 63-bit seed; epoch -1 is reserved for subsets
    state = np.random.SeedSequence([seed, epoch + 1]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))
