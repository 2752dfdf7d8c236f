"""Scaled dot-product attention over (batch, seq, heads, head_dim), grouped-query aware."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) [+ causal mask]) v; k, v may have fewer heads, a divisor of q's."""
    # Under autocast SDPA computes in the autocast dtype; the other implementations get their inputs cast the same.
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    impl = resolve_attention(backend, q.device, dtype, q.size(-1))
    if impl != "sdpa":
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if impl == "triton":
            from kernels import triton_attention  # lazily: plain-PyTorch runs never import Triton

            return triton_attention.attention(q, k, v, causal)
        from flash_attn import flash_attn_func  # same (batch, seq, heads, head_dim) layout, GQA native

        return flash_attn_func(q, k, v, causal=causal)
    # SDPA wants (batch, heads, seq, head_dim); enable_gqa shares each K/V head across its group of query heads
    # without materialising repeated copies.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return out.transpose(1, 2)
