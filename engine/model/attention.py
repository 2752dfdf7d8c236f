"""Multi-head self-attention with optional grouped-query K/V heads, rotary positions and a KV cache for decoding."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from engine.config import ModelConfig
from engine.parallel.layers import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    enter_tp_region,
    mark_partial_grad,
)
from engine.parallel.mappings import tp_rank, tp_size


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
    """Causal self-attention: q/k/v projections, RoPE (Llama), the attention core, output projection.

    Under tensor parallelism each rank runs num_heads / tp query heads. Grouped-query K/V heads are split the same
    way when tp divides them; when tp exceeds them, every rank holds all K/V heads (a small matrix) and uses the
    one its query heads share, and their gradients are summed over the TP group.
    """

    def __init__(self, cfg: ModelConfig, init: InitMethod, output_init: InitMethod,
                 group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        bias = cfg.arch == "gpt2"
        tp = tp_size(group)
        if cfg.num_heads % tp or (cfg.num_kv_heads % tp and tp % cfg.num_kv_heads):
            raise ValueError(f"{cfg.num_heads} heads and {cfg.num_kv_heads} KV heads do not split across {tp} "
                             "tensor-parallel ranks: TP must divide the heads, and divide or be a multiple of the "
                             "KV heads")
        self.head_dim = cfg.hidden_size // cfg.num_heads
        kv_size = cfg.num_kv_heads * self.head_dim
        column = {"bias": bias, "sequence_parallel": sequence_parallel, "input_mapped": True, "init_method": init}
        # Separate projections (not one fused QKV) map 1:1 onto HF's and split cleanly by head, grouped-query or
        # not; they share one collective on their common input.
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.hidden_size, group=group, **column)
        split_kv = cfg.num_kv_heads % tp == 0
        kv_group = group if split_kv else None  # None: the whole (replicated) K/V projection on every rank
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_size, group=kv_group, **column)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_size, group=kv_group, **column)
        self.local_kv_heads = cfg.num_kv_heads // tp if split_kv else 1
        # The K/V head this rank's query heads belong to, when the K/V heads are replicated.
        self.kv_head = None if split_kv else tp_rank(group) // (tp // cfg.num_kv_heads)
        if not split_kv:
            mark_partial_grad(*self.k_proj.parameters(), *self.v_proj.parameters())
        self.o_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=bias, group=group,
                                        init_method=output_init, sequence_parallel=sequence_parallel)
        self.recompute_core = cfg.recompute == "selective"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden); `rope` is (cos, sin) for Llama, None for GPT-2.

        Under SP, x and the output are this rank's sequence chunk. With `cache` (inference), x continues the
        cached tokens: a whole prompt into an empty cache, or one token.
        """
        x = enter_tp_region(x, self.group, self.sequence_parallel)
        b, s, _ = x.shape
        # -1 heads: the local head count, so a tensor-parallel shard runs the same code.
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self._project_kv(self.k_proj, x).view(b, s, -1, self.head_dim)
        v = self._project_kv(self.v_proj, x).view(b, s, -1, self.head_dim)
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

    def _project_kv(self, proj: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
        """K or V of this rank's heads; from replicated K/V weights, only the rows of the head it uses."""
        if self.kv_head is None:
            return proj(x)
        rows = slice(self.kv_head * self.head_dim, (self.kv_head + 1) * self.head_dim)
        return F.linear(x, proj.weight[rows], proj.bias[rows] if proj.bias is not None else None)

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
