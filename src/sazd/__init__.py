"""sazd: straggler-tolerant, numerically stable coded model-parallel training."""

from typing import Any

__all__ = ["Maintainer", "coded_optimizer", "parallelize"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `sazd --help` and light commands do not import torch.
    if name in ("parallelize", "coded_optimizer"):
        import sazd.parallel

        return getattr(sazd.parallel, name)
    if name == "Maintainer":
        from sazd.maintain import Maintainer

        return Maintainer
    raise AttributeError(f"module 'sazd' has no attribute {name!r}")
