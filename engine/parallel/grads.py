"""Gradients after backward under tensor and pipeline parallelism: partial ones summed over the TP group, a tied
embedding's two pipeline copies summed, and the global norm.

A replicated parameter used on data that differs between TP ranks (a sequence chunk under SP, one rank's query
heads for a replicated K/V head) gets only part of its gradient on each rank; `tp_partial_grad` marks it (see
engine.parallel.layers) and `allreduce_partial_grads` completes it. The norm for clipping counts split parameters
over every rank and replicated ones once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.layers import is_tied_copy
from engine.parallel.mappings import tp_all_reduce_, tp_size

BUCKET_BYTES = 25 * 2**20  # one all-reduce per this much gradient: no whole-model flat copy for large GQA models


def allreduce_partial_grads(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of `tp_partial_grad` parameters over the TP group, in flat buckets."""
    if tp_size(group) == 1:
        return
    grads = [p.grad for p in params if getattr(p, "tp_partial_grad", False) and p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES or i == len(grads) - 1:
            _allreduce_flat(bucket, group)
            bucket, size = [], 0


def _allreduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_tied_embedding_grads(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum a tied embedding's gradient over its two copies, the first and last pipeline stage's (`group`, the
    parallel state's embedding group), so that the copies stay equal."""
    if group is None:
        return
    for p in params:
        if getattr(p, "tied_embedding", None) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def grad_norm(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None,
              pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global L2 norm of the gradients: shards summed over the TP group, replicated parameters counted once,
    stages summed over the pipeline group (a tied embedding's last-stage copy left out: it is the same weight)."""
    sharded, replicated = [], []
    for p in params:
        if p.grad is not None and not is_tied_copy(p):
            (sharded if hasattr(p, "tp_dim") else replicated).append(p.grad.detach().float().square().sum())
    if not sharded and not replicated:
        raise RuntimeError("grad_norm: no parameter has a gradient (was backward run?)")
    device = (sharded + replicated)[0].device
    sq_sharded = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
    tp_all_reduce_(sq_sharded, group)
    sq_replicated = torch.stack(replicated).sum() if replicated else torch.zeros((), device=device)
    total = sq_sharded + sq_replicated
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()
