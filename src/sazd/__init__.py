"""sazd: straggler-tolerant, numerically stable coded model-parallel training."""

from typing import Any

__all__ = ["parallelize"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `sazd --help` and light commands do not import torch.
    if name == "parallelize":
        from sazd.parallel import parallelize

        return parallelize
    raise AttributeError(f"module 'sazd' has no attribute {name!r}")
