"""Cross entropy over logits split by vocabulary across the TP group, never gathering the full vocabulary.

Each rank holds logits[..., vocab_start : vocab_start + V/tp] (from VocabParallelOutput). The per-row statistics of
its shard (max, sum of exponentials, target logit) come from `kernels` (Triton or PyTorch); the three all-reduces
that combine them are here. Padding columns (a padded vocabulary) are left out of the softmax altogether.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from engine.parallel.mappings import tp_all_reduce_


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Softmax cross entropy over logits split by vocab; only (tokens,)-sized vectors cross the wire.

    The per-shard statistics and gradient come from `kernels` (Triton or PyTorch); the three all-reduces are here.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        n_local = logits.shape[-1]
        # Padding columns take no probability: they are left out of the statistics altogether.
        n_real = int(max(0, min(n_local, vocab_size - vocab_start)))
        real = logits[..., :n_real]
        rows = targets.numel()
        if n_real > 0:
            m, s, t = kernels.cross_entropy_shard_stats(real, targets, vocab_start, ignore_index)
        else:  # a rank holding only padding
            m = torch.full((rows,), -math.inf, device=logits.device)
            s, t = torch.zeros(rows, device=logits.device), torch.zeros(rows, device=logits.device)
        # The global max keeps exp from overflowing; each shard's sum is rescaled to it before summing.
        global_max = m.clone()
        tp_all_reduce_(global_max, group, dist.ReduceOp.MAX)
        s = s * torch.exp(m - global_max)
        tp_all_reduce_(s, group)
        tp_all_reduce_(t, group)  # the target's logit lives on one rank; the others contribute zero
        lse = global_max + s.log()
        valid = targets.reshape(-1) != ignore_index
        count = valid.sum()
        ctx.save_for_backward(real, targets, lse, valid, count)
        ctx.vocab_start, ctx.ignore_index, ctx.n_pad = vocab_start, ignore_index, n_local - n_real
        return torch.where(valid, lse - t, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad):
        real, targets, lse, valid, count = ctx.saved_tensors
        grad_rows = valid * (grad / count)
        g = (kernels.cross_entropy_shard_grad(real, targets, ctx.vocab_start, lse, grad_rows, ctx.ignore_index)
             if real.shape[-1] else real.new_zeros(real.shape))
        if ctx.n_pad:
            g = F.pad(g, (0, ctx.n_pad))
        return g, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup | None,
                                 vocab_start: int, vocab_size: int | None = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy of `targets` (...) under logits split by vocab (..., V/tp) starting at `vocab_start`.

    Columns at or past `vocab_size` (the padding of a padded vocabulary) are excluded; targets == ignore_index are
    left out of the mean, as in F.cross_entropy.
    """
    limit = math.inf if vocab_size is None else vocab_size
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, group, vocab_start, limit, ignore_index)
