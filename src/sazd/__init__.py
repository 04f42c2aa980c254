"""sazd: straggler-tolerant, numerically stable coded model-parallel training."""

__version__ = "0.1.0"
