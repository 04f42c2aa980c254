"""`sazd bench stability|codec|train|runtime`: one module per command, each its flags, its checks and
its printing over the measurement library :mod:`sazd.measure`."""
