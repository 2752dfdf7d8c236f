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

from engine.parallel import comm
from engine.parallel.layers import is_tied_copy
from engine.parallel.mappings import tp_all_reduce_, tp_size

BUCKET_BYTES = 25 * 2**20  # one all-reduce per this much gradient: no whole-model flat copy for large GQA models


Grads = Iterable[tuple[torch.Tensor, nn.Parameter]]  # (a gradient, or a ZeRO shard's piece of it; its parameter)


def param_grads(params: Iterable[nn.Parameter]) -> list[tuple[torch.Tensor, nn.Parameter]]:
    """(gradient, parameter) of every parameter that has one."""
    return [(p.grad, p) for p in params if p.grad is not None]


def allreduce_partial_grads(grads: Grads, group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of `tp_partial_grad` parameters over the TP group, in flat buckets."""
    if tp_size(group) == 1:
        return
    grads = [g for g, p in grads if getattr(p, "tp_partial_grad", False)]
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
    comm.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_tied_embedding_grads(grads: Grads, group: dist.ProcessGroup | None) -> None:
    """Sum a tied embedding's gradient over its two copies, the first and last pipeline stage's (`group`, the
    parallel state's embedding group), so that the copies stay equal."""
    if group is None:
        return
    for g, p in grads:
        if getattr(p, "tied_embedding", None):
            comm.all_reduce(g, group=group)


def grad_norm(grads: Grads, group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None = None,
              dp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global L2 norm of the gradients: shards summed over the TP group, replicated parameters counted once,
    stages summed over the pipeline group (a tied embedding's last-stage copy left out: it is the same weight), and
    ZeRO's gradient shards summed over `dp_group` (None: the gradients are whole on every DP rank)."""
    sharded, replicated, device = [], [], None
    for g, p in grads:
        device = g.device
        if not is_tied_copy(p):
            (sharded if hasattr(p, "tp_dim") else replicated).append(g.detach().float().square().sum())
    if not sharded and not replicated and dp_group is None:
        raise RuntimeError("grad_norm: no parameter has a gradient (was backward run?)")
    sq = torch.stack([torch.stack(parts).sum() if parts else torch.zeros((), device=device)
                      for parts in (sharded, replicated)])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:  # each shard holds its own elements
        comm.all_reduce(sq, group=dp_group)
    sq_sharded, sq_replicated = sq[0].clone(), sq[1]
    tp_all_reduce_(sq_sharded, group)
    total = sq_sharded + sq_replicated
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        comm.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grads_(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale `grads` in place so their global `norm` is at most `max_norm` (torch's clip_grads_with_norm_ rule)."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), same in by_kind.items():
        torch._foreach_mul_(same, coef.to(device))
