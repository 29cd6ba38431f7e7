"""Training loop, losses and metrics."""
