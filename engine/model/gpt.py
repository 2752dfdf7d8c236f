"""The decoder-only transformer, GPT-2 or Llama flavour, built from a ModelConfig (after `fill_defaults`)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from engine.config import ModelConfig
from engine.model.attention import Attention, KVCache
from engine.model.mlp import MLP


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm with a weight and no bias (Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        return kernels.rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The architecture's normalisation over hidden_size."""
    return (LayerNorm if cfg.arch == "gpt2" else RMSNorm)(cfg.hidden_size, cfg.norm_eps)


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)), dropout on each branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden); `cache` holds this layer's earlier keys and values."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Token embedding (+ learned positions for GPT-2), `blocks`, final norm, output head (optionally tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        # normal(0, init_std) matrices and embeddings, zero biases (the norms start at one / zero themselves).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each layer adds two branches to the residual stream; scaling their output projections keeps its variance
        # from growing with depth (GPT-2 / Megatron).
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> fp32 logits (batch, seq, vocab), or the mean cross-entropy against `targets`.

        With `cache` (from `kv_cache`, inference only) the tokens continue the cached ones, at the positions after
        them: a whole prompt into empty caches, then one token at a time.
        """
        start = cache[0].length if cache is not None else 0
        end = start + tokens.size(1)
        if self.pos_emb is not None and end > self.cfg.max_seq_len:
            raise ValueError(f"{end} positions exceed model.max_seq_len={self.cfg.max_seq_len} (learned positions)")
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, end, device=tokens.device))
        x = self.drop(x)
        rope = None
        if self.cfg.arch == "llama":
            cos, sin = kernels.rope_cache(end, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta,
                                          tokens.device)
            rope = (cos[start:], sin[start:])
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, rope, cache[i])
            elif self.cfg.recompute == "full":
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits.float()
        return kernels.cross_entropy(logits, targets)

    def kv_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Empty key/value caches, one per layer, for `forward(..., cache=...)` over up to `max_len` tokens."""
        weight = self.tok_emb.weight
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        return [KVCache(batch, max_len, self.cfg.num_kv_heads, head_dim, weight.device, weight.dtype)
                for _ in self.blocks]

    def num_parameters(self) -> int:
        """Number of unique parameters (a tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())
