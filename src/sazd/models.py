"""The networks we train: plain ``nn.Module``s whose layers have stable names (``fc1``, ``conv1`` ...),
so a coding plan can name them (``{"fc1": "coded"}``).

- ``mlp``: flatten -> fc1 -> relu1 -> fc2 -> relu2 -> fc3 (default 784-1024-1024-10 on 28x28 images);
  ``hidden`` gives the widths, one ``fc`` per entry plus the output layer.
- ``cnn``: conv1 (C->32, 3x3, pad 1) -> relu1 -> pool1 (2x2) -> conv2 (32->64, 3x3, pad 1) -> relu2 ->
  pool2 (2x2) -> flatten -> fc1 (64*(H/4)*(W/4) -> 128) -> relu3 -> fc2 (128 -> classes);
  ``hidden=(w,)`` changes the 128.

Initialisation is PyTorch's default, drawn from a private generator seeded with ``seed`` (the global
RNG is left untouched), always in float32 and then cast, so float32 and float64 models start equal.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

MODELS = ("mlp", "cnn")
DEFAULT_HIDDEN = {"mlp": (1024, 1024), "cnn": (128,)}


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build ``name`` ("mlp" or "cnn") for inputs of shape ``in_shape`` (no batch dim) and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(f"model: unknown name {name!r}; choose one of {list(MODELS)}")
    in_shape = tuple(int(d) for d in in_shape)
    if not in_shape or any(d < 1 for d in in_shape):
        raise ValueError(
            f"in_shape: {in_shape} must be a non-empty tuple of positive sizes, e.g. (1, 28, 28)"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: {num_classes!r} must be an integer >= 2")
    hidden = tuple(DEFAULT_HIDDEN[name] if hidden is None else hidden)
    if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"hidden: {hidden} must be a non-empty sequence of positive layer widths")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: {dtype} is not supported; use torch.float32 or torch.float64")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _mlp(in_shape, num_classes, hidden) if name == "mlp" else _cnn(in_shape, num_classes, hidden)
    return model.to(dtype)


def _mlp(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    widths = (math.prod(in_shape), *hidden, num_classes)
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths), start=1):
        layers.append((f"fc{i}", nn.Linear(w_in, w_out)))
        if i < len(widths) - 1:
            layers.append((f"relu{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def _cnn(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    if len(in_shape) != 3 or in_shape[1] < 4 or in_shape[2] < 4:
        raise ValueError(
            f"in_shape: the cnn needs (channels, height, width) with height, width >= 4, got {in_shape}"
        )
    if len(hidden) != 1:
        raise ValueError(
            f"hidden: the cnn has one hidden Linear layer, so hidden must be (width,), got {hidden}"
        )
    channels, height, width = in_shape
    flat = 64 * (height // 4) * (width // 4)  # two 2x2 max-pools, floor division as nn.MaxPool2d does
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(channels, 32, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(flat, hidden[0])),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(hidden[0], num_classes)),
            ]
        )
    )


def param_count(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
