"""The decoder-only transformer, GPT-2 or Llama flavour, built from a ModelConfig (after `fill_defaults`).

One model for every layout: given a tensor-parallel group it splits its matrices, heads and vocabulary across it
(engine.parallel.layers); without one it is the plain single-device model. Given a range of layers it is one
pipeline stage: the embedding when the range starts at layer 0, the final norm, head and loss when it ends at the
last layer (one process: every layer, both ends). The model never asks which pipeline rank it is on.

Every part draws its initial weights from its own stream, seeded from (seed, part): the embeddings, each layer by
its global index, the final norm and head. So a stage holding layers i..j, or a tensor-parallel rank keeping its
slice, starts from exactly the single-device model's weights. Parameter names keep the global layer index
(`blocks.7.attn.q.weight` on whichever stage holds layer 7), so checkpoints do not depend on the layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
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
from engine.parallel.layers import (
    InitMethod,
    VocabParallelEmbedding,
    VocabParallelOutput,
    mark_partial_grad,
    vocab_parallel_loss,
)
from engine.parallel.mappings import tp_rank, tp_size
from engine.parallel.random import KeyedDropout, mix_seed

# Stream ids of the parts that are not layers (layers use their global index, >= 0).
_EMBEDDING_PART, _FINAL_PART = -1, -2


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


def make_dropout(p: float, site: int, group: dist.ProcessGroup | None, sequence_parallel: bool) -> KeyedDropout:
    """Dropout on the residual stream at `site`: one mask for replicated activations, one per rank on SP chunks."""
    return KeyedDropout(p, site, group if sequence_parallel else None)


@contextlib.contextmanager
def part_stream(seed: int, part: int) -> Iterator[None]:
    """Draw a model part's initial weights from its own CPU stream, leaving the default stream as it was (weights
    are drawn on the CPU; torch.manual_seed would also reseed, and leave changed, every CUDA generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(mix_seed(seed, part))
        yield


class Block(nn.Module):
    """One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)), dropout on each branch."""

    def __init__(self, cfg: ModelConfig, index: int, init: InitMethod, output_init: InitMethod,
                 group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.attn_norm = make_norm(cfg, sequence_parallel)
        self.attn = Attention(cfg, init, output_init, group, sequence_parallel)
        self.mlp_norm = make_norm(cfg, sequence_parallel)
        self.mlp = MLP(cfg, init, output_init, group, sequence_parallel)
        self.drop = make_dropout(cfg.dropout, index + 1, group, sequence_parallel)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, dropout_key: int | None = None) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden) (sequence chunks under SP); `cache`: this layer's KV."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache), dropout_key, 0)
        return x + self.drop(self.mlp(self.mlp_norm(x)), dropout_key, 1)


class GPT(nn.Module):
    """Token embedding (+ learned positions for GPT-2), `blocks`, final norm, output head (optionally tied).

    `tp_group` splits the model across a tensor-parallel group; `sequence_parallel` also splits the activations
    between its matmuls along the sequence. The vocabulary is padded to a multiple of
    tp * model.make_vocab_size_divisible_by with zero rows that are never predicted. `layers` (default: all) makes it
    the pipeline stage holding those layers; `seed` (default: the default generator's seed) seeds every part's
    initial weights. A last stage without the embedding holds its own copy of a tied embedding (`head.weight`),
    started equal to it; the trainer keeps the two equal. Both carry `tied_embedding` ("embedding" on the first
    stage, "copy" on the last): the copy is saved, counted in the gradient norm and decayed as the embedding.
    """

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup | None = None,
                 sequence_parallel: bool = False, layers: range | None = None, seed: int | None = None):
        super().__init__()
        self.cfg, self.tp_group = cfg, tp_group
        self.sequence_parallel = sequence_parallel and tp_size(tp_group) > 1
        self.layers = range(cfg.num_layers) if layers is None else layers
        if not (0 <= self.layers.start < self.layers.stop <= cfg.num_layers and self.layers.step == 1):
            raise ValueError(f"layers {self.layers} is not a non-empty range of the model's {cfg.num_layers} layers")
        self.has_embedding, self.has_head = self.layers.start == 0, self.layers.stop == cfg.num_layers
        seed = torch.initial_seed() if seed is None else seed
        sp = self.sequence_parallel
        init = partial(nn.init.normal_, mean=0.0, std=cfg.init_std)
        # Each layer adds two branches to the residual stream; scaling their output projections keeps its variance
        # from growing with depth (GPT-2 / Megatron).
        output_init = partial(nn.init.normal_, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
        divisor = cfg.make_vocab_size_divisible_by
        self.tok_emb = self.pos_emb = self.drop = self.norm = self.head = None
        if self.has_embedding:
            with part_stream(seed, _EMBEDDING_PART):
                self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, divisor, init, sp)
                if cfg.arch == "gpt2":
                    self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
                    init(self.pos_emb.weight)
                    if sp:
                        mark_partial_grad(self.pos_emb.weight)
            self.drop = make_dropout(cfg.dropout, 0, tp_group, sp)
        blocks = {}
        for i in self.layers:
            with part_stream(seed, i):
                blocks[str(i)] = Block(cfg, i, init, output_init, tp_group, sp)
        self.blocks = nn.ModuleDict(blocks)  # keyed by global layer index
        if self.has_head:
            with part_stream(seed, _FINAL_PART):
                self.norm = make_norm(cfg, sp)
                # A tied head's own weight is replaced at once: not worth a draw from the RNG stream.
                head_init = nn.init.zeros_ if cfg.tie_embeddings else init
                self.head = VocabParallelOutput(cfg.vocab_size, cfg.hidden_size, tp_group, divisor, head_init, sp)
            if cfg.tie_embeddings and self.has_embedding:
                self.head.weight = self.tok_emb.weight
            elif cfg.tie_embeddings:  # the embedding is on the first stage: start this copy from its weights
                with part_stream(seed, _EMBEDDING_PART), torch.no_grad():
                    first = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, divisor, init, sp)
                    self.head.weight.copy_(first.weight)
                self.head.weight.tied_embedding = "copy"
        if cfg.tie_embeddings and self.has_embedding and not self.has_head:
            self.tok_emb.weight.tied_embedding = "embedding"  # its copy is the last stage's head

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, dropout_key: int | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> fp32 logits (batch, seq, vocab), or the mean cross-entropy against `targets`.

        A stage without the embedding takes the previous stage's hidden states (batch, seq, hidden; sequence chunks
        under SP) instead of tokens, and one without the head returns its hidden states. With `cache` (from
        `kv_cache`, inference only) the tokens continue the cached ones, at the positions after them: a whole
        prompt into empty caches, then one token at a time. `dropout_key` names the micro-batch for dropout
        (engine.parallel.random).
        """
        start = cache[0].length if cache is not None else 0
        tp = tp_size(self.tp_group)
        seq = tokens.size(1) * (tp if self.sequence_parallel and not self.has_embedding else 1)
        end = start + seq
        if self.has_embedding:
            if self.pos_emb is not None and end > self.cfg.max_seq_len:
                raise ValueError(f"{end} positions exceed model.max_seq_len={self.cfg.max_seq_len} (learned "
                                 "positions)")
            if self.sequence_parallel and (cache is not None or tokens.size(1) % tp):
                raise ValueError(f"sequence parallelism needs the sequence ({tokens.size(1)} tokens) to split "
                                 f"evenly between the {tp} TP ranks, and no KV cache")
            x = self.tok_emb(tokens)  # this rank's sequence chunk under SP
            if self.pos_emb is not None:
                chunk = x.size(1)
                first = start + (tp_rank(self.tp_group) * chunk if self.sequence_parallel else 0)
                x = x + self.pos_emb(torch.arange(first, first + chunk, device=tokens.device))
            x = self.drop(x, dropout_key)
        else:
            x = tokens
        rope = None
        if self.cfg.arch == "llama":
            cos, sin = kernels.rope_cache(end, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta,
                                          x.device)
            rope = (cos[start:], sin[start:])
        for i, block in enumerate(self.blocks.values()):
            if cache is not None:
                x = block(x, rope, cache[i])
            elif self.cfg.recompute == "full":
                x = checkpoint(block, x, rope, None, dropout_key, use_reentrant=False)
            else:
                x = block(x, rope, dropout_key=dropout_key)
        if not self.has_head:
            return x
        logits = self.head(self.norm(x))  # this rank's slice of the padded vocabulary, for the whole sequence
        if targets is None:
            return self.head.full_logits(logits).float()
        if not vocab_parallel_loss(self.cfg.vocab_size, tp, self.cfg.make_vocab_size_divisible_by):
            return kernels.cross_entropy(logits, targets)
        return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.head.vocab_start, self.cfg.vocab_size)

    def kv_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """Empty key/value caches, one per layer, for `forward(..., cache=...)` over up to `max_len` tokens."""
        weight = next(self.parameters())
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        return [KVCache(batch, max_len, block.attn.local_kv_heads, head_dim, weight.device, weight.dtype)
                for block in self.blocks.values()]

    def num_parameters(self) -> int:
        """Number of unique parameters on this rank (a tied embedding/head counted once; vocabulary padding in).

        A last stage's copy of a tied embedding is counted: it is memory this rank holds.
        """
        return sum(p.numel() for p in self.parameters())


def parameter_names(cfg: ModelConfig) -> set[str]:
    """Every parameter name of the whole single-process model (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return {name for name, _ in GPT(cfg, seed=0).named_parameters()}


class GPTChunks(nn.ModuleList):
    """This rank's model chunks (pipeline stages), whose parameters are named as in the whole model.

    `named_parameters` chains the chunks' own names (`blocks.7.mlp.up_proj.weight`, not `1.blocks.7...`): the
    chunks hold disjoint layers, so the names are unique, and they are the single-process model's names.
    """

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """(global name, parameter) of every chunk, in chunk order."""
        for chunk in self:
            yield from chunk.named_parameters(prefix, recurse, remove_duplicate)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The whole model's forward, when one chunk holds it (no pipeline); stages run through a schedule."""
        if len(self) != 1 or not (self[0].has_embedding and self[0].has_head):
            raise RuntimeError("these chunks are pipeline stages: run them through engine.training.schedule")
        return self[0](*args, **kwargs)
