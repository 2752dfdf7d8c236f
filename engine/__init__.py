"""Weft: a Megatron-style 3D-parallel pretraining engine for decoder-only language models."""

__version__ = "0.1.0"
