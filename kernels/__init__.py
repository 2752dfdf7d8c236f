"""Fused kernels (Triton) beside their PyTorch references; filled in by the kernels work."""
