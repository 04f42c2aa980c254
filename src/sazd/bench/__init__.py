"""`sazd bench stability|codec|train|runtime|tp`: one module per command (`tp`: a package), each its
flags, its checks and its printing over the measurement library :mod:`sazd.measure`."""
