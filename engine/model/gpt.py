"""The decoder-only transformer, GPT-2 or Llama flavour, built from a ModelConfig (after `fill_defaults`).

One model for every layout: given a tensor-parallel group it splits its matrices, heads and vocabulary across it
(engine.parallel.layers); without one it is the plain single-device model. Both draw the same full weights from
the same seed, so a tensor-parallel run starts from exactly the single-device model.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from engine.config import ModelConfig
from engine.model.attention import Attention, KVCache
from engine.model.mlp import MLP
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.layers import InitMethod, VocabParallelEmbedding, VocabParallelOutput, mark_partial_grad
from engine.parallel.mappings import tp_rank, tp_size
from engine.parallel.random import RankLocalDropout


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


def make_norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.Module:
    """The architecture's normalisation over hidden_size (on sequence chunks, so partial gradients, under SP)."""
    norm = (LayerNorm if cfg.arch == "gpt2" else RMSNorm)(cfg.hidden_size, cfg.norm_eps)
    if sequence_parallel:
        mark_partial_grad(*norm.parameters())
    return norm


def make_dropout(p: float, group: dist.ProcessGroup | None, sequence_parallel: bool) -> nn.Module:
    """Dropout on the residual stream: the shared stream on replicated activations, per-rank on sequence chunks."""
    return RankLocalDropout(p, group) if sequence_parallel else nn.Dropout(p)


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)), dropout on each branch."""

    def __init__(self, cfg: ModelConfig, init: InitMethod, output_init: InitMethod,
                 group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.attn_norm = make_norm(cfg, sequence_parallel)
        self.attn = Attention(cfg, init, output_init, group, sequence_parallel)
        self.mlp_norm = make_norm(cfg, sequence_parallel)
        self.mlp = MLP(cfg, init, output_init, group, sequence_parallel)
        self.drop = make_dropout(cfg.dropout, group, sequence_parallel)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden) (sequence chunks under SP); `cache`: this layer's KV."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Token embedding (+ learned positions for GPT-2), `blocks`, final norm, output head (optionally tied).

    `tp_group` splits the model across a tensor-parallel group; `sequence_parallel` also splits the activations
    between its matmuls along the sequence. The vocabulary is padded to a multiple of
    tp * model.make_vocab_size_divisible_by with zero rows that are never predicted.
    """

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup | None = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.cfg, self.tp_group = cfg, tp_group
        self.sequence_parallel = sequence_parallel and tp_size(tp_group) > 1
        sp = self.sequence_parallel
        init = partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        # Each layer adds two branches to the residual stream; scaling their output projections keeps its variance
        # from growing with depth (GPT-2 / Megatron).
        output_init = partial(nn.init.normal_, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
        divisor = cfg.make_vocab_size_divisible_by
        self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, divisor, init, sp)
        self.pos_emb = None
        if cfg.arch == "gpt2":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            init(self.pos_emb.weight)
            if sp:
                mark_partial_grad(self.pos_emb.weight)
        self.drop = make_dropout(cfg.dropout, tp_group, sp)
        self.blocks = nn.ModuleList(Block(cfg, init, output_init, tp_group, sp) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg, sp)
        # A tied head's own weight is replaced at once: not worth a draw from the RNG stream.
        head_init = nn.init.zeros_ if cfg.tie_embeddings else init
        self.head = VocabParallelOutput(cfg.vocab_size, cfg.hidden_size, tp_group, divisor, head_init, sp)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

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
        if self.sequence_parallel and (cache is not None or tokens.size(1) % tp_size(self.tp_group)):
            raise ValueError(f"sequence parallelism needs the sequence ({tokens.size(1)} tokens) to split evenly "
                             f"between the {tp_size(self.tp_group)} TP ranks, and no KV cache")
        x = self.tok_emb(tokens)  # this rank's sequence chunk under SP
        if self.pos_emb is not None:
            chunk = x.size(1)
            first = start + (tp_rank(self.tp_group) * chunk if self.sequence_parallel else 0)
            x = x + self.pos_emb(torch.arange(first, first + chunk, device=tokens.device))
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
        logits = self.head(self.norm(x))  # this rank's slice of the padded vocabulary, for the whole sequence
        if targets is None:
            return self.head.full_logits(logits).float()
        if self.head.padded_vocab == self.cfg.vocab_size and tp_size(self.tp_group) == 1:
            return kernels.cross_entropy(logits, targets)
        return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.head.vocab_start, self.cfg.vocab_size)

    def kv_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Empty key/value caches, one per layer, for `forward(..., cache=...)` over up to `max_len` tokens."""
        weight = self.tok_emb.weight
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        return [KVCache(batch, max_len, block.attn.local_kv_heads, head_dim, weight.device, weight.dtype)
                for block in self.blocks]

    def num_parameters(self) -> int:
        """Number of unique parameters on this rank (a tied embedding/head counted once; vocabulary padding in)."""
        return sum(p.numel() for p in self.parameters())
