"""sazd: straggler-tolerant, numerically stable coded model-parallel training."""

from sazd.parallel import parallelize

__all__ = ["parallelize"]
__version__ = "0.1.0"
