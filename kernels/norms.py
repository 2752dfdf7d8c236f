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
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, the statistics in fp32."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels import triton_norms

        return triton_norms.rms_norm(x, weight, eps)
    # Same order as Hugging Face's LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
