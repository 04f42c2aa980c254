"""The networks we train: plain ``nn.Module``s whose layers have stable names (``fc1``, ``conv1`` ...),
so a coding plan can name them (``{"fc1": "coded"}``).

- ``mlp``: flatten -> fc1 -> relu1 -> fc2 -> relu2 -> fc3 (default 784-1024-1024-10 on 28x28 images);
  ``hidden`` gives the widths, one ``fc`` per entry plus the output layer.
- ``cnn``: conv1 (C->32, 3x3, pad 1) -> relu1 -> pool1 (2x2) -> conv2 (32->64, 3x3, pad 1) -> relu2 ->
  pool2 (2x2) -> flatten -> fc1 (64*(H/4)*(W/4) -> 128) -> relu3 -> fc2 (128 -> classes);
  ``hidden=(w,)`` changes the 128.
- ``resnet``: a small ResNet (``sazd.models.resnet``) on images; ``hidden`` = stage widths (16, 32, 64).
- ``gpt``: a nanoGPT-style decoder-only transformer (``sazd.models.gpt``) on token windows:
  ``in_shape = (block_size,)``, ``num_classes`` = vocabulary size; ``hidden = (channels, layers,
  heads)``, default (128, 4, 4). Options: ``dropout`` (0.0), ``share_blocks`` (False).

Each model declares its task (``sazd.models.task``): the gpt predicts the next token at every
position, the others one class per sample.

Initialisation is PyTorch's default (the gpt's: GPT-2's, N(0, 0.02)), drawn from a private generator
seeded with ``seed`` (the global RNG is left untouched), always in float32 and then cast, so float32
and float64 models start equal.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from sazd.models.gpt import GPT
from sazd.models.resnet import ResNet
from sazd.models.task import CLASSIFICATION, NEXT_TOKEN, Task, task_of

MODELS = ("mlp", "cnn", "resnet", "gpt")
DEFAULT_HIDDEN = {"mlp": (1024, 1024), "cnn": (128,), "resnet": (16, 32, 64), "gpt": (128, 4, 4)}
GPT_OPTIONS = ("dropout", "share_blocks")


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **options: object,
) -> nn.Module:
    """Build ``name`` (one of ``MODELS``) for inputs of shape ``in_shape`` (no batch dim) and
    ``num_classes`` (the vocabulary for the gpt); ``options`` go to the gpt (``GPT_OPTIONS``)."""
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

    unknown = sorted(set(options) - set(GPT_OPTIONS if name == "gpt" else ()))
    if unknown:
        raise ValueError(f"options: {name} takes none of {unknown}; the gpt takes {list(GPT_OPTIONS)}")
    builders = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet, "gpt": _gpt}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builders[name](in_shape, num_classes, hidden, **options)
    return model.to(dtype)  # in place: tied parameters stay one tensor


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


def _resnet(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]) -> ResNet:
    if len(in_shape) != 3:
        raise ValueError(f"in_shape: the resnet needs images (channels, height, width), got {in_shape}")
    return ResNet(in_shape[0], num_classes, hidden)


def _gpt(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...], **options: object) -> GPT:
    if len(in_shape) != 1:
        raise ValueError(
            f"in_shape: the gpt reads token windows (block_size,), got {in_shape}; use a text dataset "
            "such as --dataset pystdlib"
        )
    if len(hidden) != 3:
        raise ValueError(f"hidden: the gpt takes (channels, layers, heads), e.g. (128, 4, 4), got {hidden}")
    channels, layers, heads = hidden
    return GPT(num_classes, in_shape[0], n_embd=channels, n_layer=layers, n_head=heads, **options)


def param_count(model: nn.Module) -> int:
    """Number of trainable scalars (a tied tensor counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["CLASSIFICATION", "DEFAULT_HIDDEN", "GPT", "MODELS", "NEXT_TOKEN", "ResNet", "Task", "build_model",
           "param_count", "task_of"]
