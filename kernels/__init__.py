"""Fused operations behind one contract: PyTorch references now, Triton kernels later, chosen by `configure`."""

from kernels.activations import gelu_tanh, swiglu
from kernels.attention import attention
from kernels.cross_entropy import cross_entropy
from kernels.dispatch import configure
from kernels.norms import layer_norm, rms_norm
from kernels.rope import apply_rotary, rope_cache

__all__ = ["apply_rotary", "attention", "configure", "cross_entropy", "gelu_tanh", "layer_norm", "rms_norm",
           "rope_cache", "swiglu"]
