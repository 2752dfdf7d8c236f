"""Normalisations over the last dimension: LayerNorm (GPT-2) and RMSNorm (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
               backend: str | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels import triton_norms  # lazily: plain-PyTorch runs never import Triton

        return triton_norms.layer_norm(x, weight, bias, eps)
    if weight.dtype != x.dtype:
        # CUDA's layer_norm refuses a half input with fp32 affine parameters (CPU's takes it): normalise in fp32, as
        # autocast does for F.layer_norm and as the Triton kernel does, then cast back to x's dtype.
        return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, the statistics in fp32."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels import triton_norms

        return triton_norms.rms_norm(x, weight, eps)
    # Same order as Hugging Face's LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
