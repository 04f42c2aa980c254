"""`sazd bench tp`: PyTorch tensor parallelism against sazd, with the same stragglers on both sides."""
