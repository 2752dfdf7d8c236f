"""Tensor-parallel layers (Megatron-style): linear layers split by columns or rows, and a vocab-split embedding and
output layer (their loss is engine.parallel.cross_entropy).

Every rank builds the full master weight from the same RNG stream and keeps its slice, so with the same seed the
shards concatenate to exactly what a single-device `nn.Linear` / `nn.Embedding` would hold: checkpoints and tests
compare against the unsplit layer directly. With `group=None` each layer is its plain single-device self.

Parameters carry how they are laid out across the TP group, for checkpoints, gradient clipping and the gradient
reduction below:
    tp_dim            the dimension a sharded parameter is split along (absent: replicated)
    tp_vocab          its rows are this rank's slice of the padded vocabulary (the value: the real vocabulary size)
    tp_partial_grad   replicated, but each rank's gradient covers only its part of the work (its sequence chunk,
                      its query heads): the true gradient is the sum over the TP group
    tied_embedding    a tied embedding split across pipeline stages: "embedding" on the first stage, "copy" (the
                      head's own weight, kept equal to it) on the last (engine.model.gpt)
With sequence parallelism (`sequence_parallel=True`) the activations between the TP regions are split along the
sequence (dim 1): column layers all-gather their input, row layers reduce-scatter their output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel.mappings import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp_last_dim,
    tp_rank,
    tp_size,
)

InitMethod = Callable[[torch.Tensor], object]


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


def enter_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """The full input of a TP region: copy (all-reduce backward), or all-gather of sequence chunks under SP."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """Sum the ranks' partial outputs: all-reduce, or reduce-scatter into sequence chunks under SP."""
    return reduce_scatter_to_sp(x, group) if sequence_parallel else reduce_from_tp(x, group)


def mark_partial_grad(*params: nn.Parameter | None) -> None:
    """Flag replicated parameters whose per-rank gradients must be summed over the TP group."""
    for p in params:
        if p is not None:
            p.tp_partial_grad = True


def is_tied_copy(p: nn.Parameter) -> bool:
    """True for a last pipeline stage's copy of a tied embedding: the same weight as the first stage's, so it is
    neither saved nor counted twice."""
    return getattr(p, "tied_embedding", None) == "copy"


def _linear_master(in_features: int, out_features: int, bias: bool,
                   init_method: InitMethod | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full weight and bias, drawn in the same order and distribution as `nn.Linear.reset_parameters`."""
    weight = torch.empty(out_features, in_features)
    b = torch.empty(out_features) if bias else None
    if init_method is None:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if b is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(b, -bound, bound)
    else:
        init_method(weight)
        if b is not None:
            b.zero_()  # Megatron's convention when the weight init is custom
    return weight, b


def _shard(full: torch.Tensor, dim: int, rank: int, world: int) -> nn.Parameter:
    """This rank's chunk of `full` along `dim`, as a parameter that records the split."""
    p = nn.Parameter(full.chunk(world, dim=dim)[rank].clone())
    if world > 1:
        p.tp_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes its slice of the output features.

    `input_mapped=True` when the caller already entered the TP region (`enter_tp_region`) for several layers that
    share one input (q/k/v, gate/up): one collective for all of them instead of one each.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group: dist.ProcessGroup | None = None, init_method: InitMethod | None = None,
                 sequence_parallel: bool = False, input_mapped: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group = gather_output, group
        self.sequence_parallel, self.input_mapped = sequence_parallel, input_mapped
        world, rank = tp_size(group), tp_rank(group)
        self.out_per_rank = _divide(out_features, world, "out_features")
        weight, b = _linear_master(in_features, out_features, bias, init_method)
        self.weight = _shard(weight, 0, rank, world)
        self.bias = _shard(b, 0, rank, world) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output shard (..., out/tp), or the full (..., out) with gather_output."""
        if not self.input_mapped:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: partial products are summed over ranks, then the bias added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group: dist.ProcessGroup | None = None, init_method: InitMethod | None = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group, self.sequence_parallel = input_is_parallel, group, sequence_parallel
        world, rank = tp_size(group), tp_rank(group)
        self.in_per_rank = _divide(in_features, world, "in_features")
        weight, b = _linear_master(in_features, out_features, bias, init_method)
        self.weight = _shard(weight, 1, rank, world)
        # Replicated: every rank holds the whole bias. Its gradient is whole too, unless the output is a sequence
        # chunk (SP), when each rank sees only its chunk's share.
        self.bias = nn.Parameter(b) if b is not None else None
        if sequence_parallel and world > 1:
            mark_partial_grad(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full output (..., out) from the input shard (..., in/tp) (a sequence chunk of it under SP)."""
        if not self.input_is_parallel:
            x = scatter_to_tp_last_dim(x, self.group)
        y = exit_tp_region(F.linear(x, self.weight), self.group, self.sequence_parallel)
        # After the reduction, so the bias is added once rather than tp times.
        return y + self.bias if self.bias is not None else y


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = 1) -> int:
    """`vocab_size` rounded up to a multiple of tp * divisor, so every rank holds an equal, aligned slice."""
    multiple = tp * divisor
    return -(-vocab_size // multiple) * multiple


def vocab_parallel_loss(vocab_size: int, tp: int, divisor: int = 1) -> bool:
    """Whether the loss needs the vocabulary-parallel cross entropy: the logits are split (tp > 1) or padded."""
    return tp > 1 or padded_vocab_size(vocab_size, tp, divisor) != vocab_size


class _VocabShard(nn.Module):
    """A (padded vocabulary / tp, dim) weight: this rank's rows of the vocabulary, padding rows zero.

    The real rows are drawn as one (vocab_size, dim) tensor, exactly as the unpadded single-device layer would, and
    the padding rows from no RNG stream at all, so the real rows are the same whatever tp and the padding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup | None, divisor: int,
                 init_method: InitMethod | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        world, rank = tp_size(group), tp_rank(group)
        self.padded_vocab = padded_vocab_size(num_embeddings, world, divisor)
        self.per_rank = self.padded_vocab // world
        self.vocab_start = rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        master = torch.zeros(self.padded_vocab, embedding_dim)
        (init_method or nn.init.normal_)(master[:num_embeddings])  # nn.Embedding's normal(0, 1) by default
        self.weight = _shard(master, 0, rank, world)
        self.weight.tp_vocab = num_embeddings


class VocabParallelEmbedding(_VocabShard):
    """Embedding table split by vocabulary rows; each rank looks up the tokens in its range, the rest are summed in.

    The vocabulary is padded to a multiple of tp * divisor. Tokens >= vocab_size are never looked up in the zero
    padding rows (they are masked like tokens of another rank's range).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup | None = None,
                 divisor: int = 1, init_method: InitMethod | None = None, sequence_parallel: bool = False):
        super().__init__(num_embeddings, embedding_dim, group, divisor, init_method)
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., dim) embeddings of token ids (...), identical on every TP rank (a sequence chunk of them under SP)."""
        outside = (ids < self.vocab_start) | (ids >= min(self.vocab_end, self.num_embeddings))
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        # Masking the output (not just the index) keeps row 0's gradient free of other ranks' tokens.
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_tp_region(out, self.group, self.sequence_parallel)


class VocabParallelOutput(_VocabShard):
    """The output layer: logits for this rank's slice of the padded vocabulary, x @ W_shard^T.

    Tied to the embedding by assigning `output.weight = embedding.weight` (both split the padded vocabulary the
    same way); the loss is `engine.parallel.cross_entropy` on the slice, so the full logits never exist on one rank.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup | None = None,
                 divisor: int = 1, init_method: InitMethod | None = None, sequence_parallel: bool = False):
        super().__init__(num_embeddings, embedding_dim, group, divisor, init_method)
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, dim) (a sequence chunk under SP) -> this rank's logits (batch, seq, padded_vocab / tp)."""
        return F.linear(enter_tp_region(x, self.group, self.sequence_parallel), self.weight)

    def full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """The whole unpadded vocabulary's logits from every rank's slice (inference only: it gathers them)."""
        return gather_from_tp_last_dim(local, self.group)[..., : self.num_embeddings]
