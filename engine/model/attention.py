"""Multi-head self-attention with optional grouped-query K/V heads and rotary positions."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from engine.config import ModelConfig


class Attention(nn.Module):
    """Causal self-attention: q/k/v projections, RoPE (Llama), the attention core, output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.head_dim = cfg.hidden_size // cfg.num_heads
        kv_size = cfg.num_kv_heads * self.head_dim
        # Separate projections (not one fused QKV) map 1:1 onto HF's and split cleanly by head for tensor
        # parallelism, grouped-query or not.
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.recompute_core = cfg.recompute == "selective"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden); `rope` is (cos, sin) for Llama, None for GPT-2."""
        b, s, _ = x.shape
        # -1 heads: the local head count, so a tensor-parallel shard runs the same code.
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if rope is not None:
            q, k = kernels.apply_rotary(q, *rope), kernels.apply_rotary(k, *rope)
        if self.recompute_core:
            # Selective recomputation: the seq x seq scores are the largest activations and the cheapest to redo.
            out = checkpoint(kernels.attention, q, k, v, use_reentrant=False)
        else:
            out = kernels.attention(q, k, v)
        return self.o_proj(out.reshape(b, s, -1))
