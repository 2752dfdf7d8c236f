"""Rotary position embeddings in the rotate-half convention of Llama / Hugging Face."""

from __future__ import annotations

import torch

from kernels.dispatch import resolve_backend


def rope_cache(seq_len: int, head_dim: int, theta: float, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, each (seq_len, head_dim), with inv_freq = theta^(-2i/head_dim)."""
    # Computed in fp32 exactly as HF does (so angles match bit for bit), then cast.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # dimension i and i + head_dim/2 share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by the angles in cos/sin (seq, head_dim); computed in fp32."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels import triton_rope  # lazily: plain-PyTorch runs never import Triton

        return triton_rope.apply_rotary(x, cos, sin)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()  # broadcast over heads
    return (xf * cos + rotated * sin).to(x.dtype)
