"""Parallelism: the process mesh and one module per parallel dimension."""
