"""The training loop and what it needs: optimizer, schedule over micro-batches, metrics."""
