"""Tensor-parallel layers (Megatron-style): linear layers split by columns or rows, a vocab-split embedding, and
a cross entropy over vocab-split logits that never materialises the full vocabulary on one rank.

Every rank builds the full master weight from the same RNG stream and keeps its slice, so with the same seed the
shards concatenate to exactly what a single-device `nn.Linear` / `nn.Embedding` would hold: checkpoints and tests
compare against the unsplit layer directly.
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
    gather_from_tp_last_dim,
    reduce_from_tp,
    scatter_to_tp_last_dim,
    tp_rank,
    tp_size,
)

InitMethod = Callable[[torch.Tensor], object]


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


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


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes its slice of the output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group: dist.ProcessGroup | None = None, init_method: InitMethod | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.group = gather_output, group
        world, rank = tp_size(group), tp_rank(group)
        self.out_per_rank = _divide(out_features, world, "out_features")
        weight, b = _linear_master(in_features, out_features, bias, init_method)
        rows = slice(rank * self.out_per_rank, (rank + 1) * self.out_per_rank)
        self.weight = nn.Parameter(weight[rows].clone())
        self.bias = nn.Parameter(b[rows].clone()) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output shard (..., out/tp), or the full (..., out) with gather_output."""
        # The input is replicated; its gradient is the sum of every rank's partial gradient.
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: partial products are summed over ranks, then the bias added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group: dist.ProcessGroup | None = None, init_method: InitMethod | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group = input_is_parallel, group
        world, rank = tp_size(group), tp_rank(group)
        self.in_per_rank = _divide(in_features, world, "in_features")
        weight, b = _linear_master(in_features, out_features, bias, init_method)
        cols = slice(rank * self.in_per_rank, (rank + 1) * self.in_per_rank)
        self.weight = nn.Parameter(weight[:, cols].clone())
        # Replicated: every rank holds the whole bias and gets its whole (identical) gradient.
        self.bias = nn.Parameter(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full output (..., out) from the input shard (..., in/tp), or from the full input if not input_is_parallel."""
        if not self.input_is_parallel:
            x = scatter_to_tp_last_dim(x, self.group)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        # After the all-reduce, so the bias is added once rather than tp times.
        return y + self.bias if self.bias is not None else y


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = 1) -> int:
    """`vocab_size` rounded up to a multiple of tp * divisor, so every rank holds an equal, aligned slice."""
    multiple = tp * divisor
    return -(-vocab_size // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the tokens in its range, the rest are summed in.

    The vocabulary is padded to a multiple of tp * divisor. Padding rows are zero, and tokens >= vocab_size are never
    looked up in them (they are masked like tokens of another rank's range).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup | None = None,
                 divisor: int = 1, init_method: InitMethod | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        world, rank = tp_size(group), tp_rank(group)
        self.padded_vocab = padded_vocab_size(num_embeddings, world, divisor)
        self.per_rank = self.padded_vocab // world
        self.vocab_start = rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        # Same draw as nn.Embedding(num_embeddings, dim) (normal(0, 1)) on the real rows; padding rows stay zero.
        master = torch.zeros(self.padded_vocab, embedding_dim)
        (init_method or nn.init.normal_)(master[:num_embeddings])
        self.weight = nn.Parameter(master[self.vocab_start : self.vocab_end].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., dim) embeddings of token ids (...), identical on every TP rank."""
        outside = (ids < self.vocab_start) | (ids >= min(self.vocab_end, self.num_embeddings))
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        # Masking the output (not just the index) keeps row 0's gradient free of other ranks' tokens.
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


def _tp_all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> None:
    if tp_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Softmax cross entropy over logits split by vocab; only (tokens,)-sized vectors cross the wire."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        x = logits.float()
        n_local = x.shape[-1]
        columns = torch.arange(vocab_start, vocab_start + n_local, device=x.device)
        x = x.masked_fill(columns >= vocab_size, float("-inf"))  # padding columns take no probability
        # Subtract the global max so exp cannot overflow.
        m = x.max(dim=-1).values
        _tp_all_reduce(m, group, dist.ReduceOp.MAX)
        x = x - m.unsqueeze(-1)
        exp = x.exp()
        sum_exp = exp.sum(dim=-1)
        _tp_all_reduce(sum_exp, group)
        # The target's logit lives on one rank; the others contribute zero.
        valid = targets != ignore_index
        local = targets - vocab_start
        mine = valid & (local >= 0) & (local < n_local)
        local = torch.where(mine, local, torch.zeros_like(local))
        target_logit = torch.where(mine, x.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
        _tp_all_reduce(target_logit, group)
        losses = torch.where(valid, sum_exp.log() - target_logit, 0.0)
        count = valid.sum()
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine, valid, count)
        ctx.logits_dtype = logits.dtype
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine, valid, count = ctx.saved_tensors
        # d(mean loss)/d(logits) = (softmax - onehot(target)) / count, on this rank's columns only.
        g = softmax.scatter_add(-1, local.unsqueeze(-1), -mine.unsqueeze(-1).to(softmax.dtype))
        g = g * (valid.unsqueeze(-1) * (grad / count))
        return g.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup | None,
                                 vocab_start: int, vocab_size: int | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy of `targets` (...) under logits split by vocab (..., V/tp) starting at `vocab_start`.

    Columns at or past `vocab_size` (the padding of a padded vocabulary) are excluded; targets == ignore_index are
    left out of the mean, as in F.cross_entropy.
    """
    limit = math.inf if vocab_size is None else vocab_size
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, group, vocab_start, limit, ignore_index)
