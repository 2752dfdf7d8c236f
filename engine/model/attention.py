"""Multi-head self-attention with optional grouped-query K/V heads, rotary positions and a KV cache for decoding."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from engine.config import ModelConfig


class KVCache:
    """One layer's keys and values of the tokens processed so far, preallocated for up to `max_len` tokens."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype):
        self.keys = torch.zeros(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, seq, kv_heads, head_dim) after the cached tokens; returns all keys and values so far."""
        start, end = self.length, self.length + k.size(1)
        if end > self.keys.size(1):
            raise ValueError(f"KV cache full: {end} tokens do not fit its {self.keys.size(1)}")
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden); `rope` is (cos, sin) for Llama, None for GPT-2.

        With `cache` (inference), x continues the cached tokens: a whole prompt into an empty cache, or one token.
        """
        b, s, _ = x.shape
        # -1 heads: the local head count, so a tensor-parallel shard runs the same code.
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if rope is not None:
            q, k = kernels.apply_rotary(q, *rope), kernels.apply_rotary(k, *rope)
        if cache is not None:
            out = self._attend_cached(q, k, v, cache)
        elif self.recompute_core:
            # Selective recomputation: the seq x seq scores are the largest activations and the cheapest to redo.
            out = checkpoint(kernels.attention, q, k, v, use_reentrant=False)
        else:
            out = kernels.attention(q, k, v)
        return self.o_proj(out.reshape(b, s, -1))

    @staticmethod
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attention of the new queries over the cached keys and values followed by the new ones."""
        prefill = cache.length == 0
        if not prefill and q.size(1) > 1:
            # A causal mask for a block of queries after a cache needs bottom-right alignment, which the kernels'
            # contract (square, top-left) does not offer; decoding never needs it.
            raise ValueError("a KV cache takes a whole prompt first, then one token at a time")
        k, v = cache.append(k, v)
        # A prompt is causal within itself; a single new token sees every cached one. SDPA, not the training
        # kernels, because a query shorter than its keys is a shape only SDPA is built and tested for.
        return kernels.attention(q, k, v, causal=prefill, backend="sdpa")
