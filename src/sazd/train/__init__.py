"""Coded training from a config or `sazd train`: configuration, loop, checkpoints, run directory."""
