"""Scaled dot-product attention over (batch, seq, heads, head_dim), grouped-query aware."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) [+ causal mask]) v; k, v may have fewer heads, a divisor of q's."""
    resolve_attention(backend)  # SDPA is the only implementation in this build
    # SDPA wants (batch, heads, seq, head_dim); enable_gqa shares each K/V head across its group of query heads
    # without materialising repeated copies.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return out.transpose(1, 2)
