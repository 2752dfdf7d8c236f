"""Fused operations behind one contract: PyTorch references and Triton kernels, chosen by `configure` (dispatch.py).

The Triton modules (kernels.triton_*) are imported only when a call resolves to them, so plain-PyTorch runs never
import Triton.
"""

from kernels.activations import gelu_tanh, swiglu
from kernels.attention import attention
from kernels.cross_entropy import cross_entropy, cross_entropy_shard_grad, cross_entropy_shard_stats
from kernels.dispatch import configure
from kernels.norms import layer_norm, rms_norm
from kernels.rope import apply_rotary, rope_cache

__all__ = ["apply_rotary", "attention", "configure", "cross_entropy", "cross_entropy_shard_grad",
           "cross_entropy_shard_stats", "gelu_tanh", "layer_norm", "rms_norm", "rope_cache", "swiglu"]
