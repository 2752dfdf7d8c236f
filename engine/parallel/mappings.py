"""Tensor- and sequence-parallel communication as autograd Functions: each forward collective has its backward twin.

The pairs are Megatron's: a copy's gradient is a sum (all-reduce), a sum's gradient is a copy (identity), a split's
gradient is a concatenation (all-gather) and back. Every mapping takes the TP process group; `None` or a group of
size 1 makes it the identity, so single-device code runs the same layers unchanged.

Sequence parallelism splits activations of shape (batch, seq, hidden) along `dim=1` between the TP ranks outside
the tensor-parallel matmuls; `gather_from_sp` / `reduce_scatter_to_sp` replace copy / all-reduce around them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel import comm

# torch >= 2.13 has the single-tensor collectives for gloo (named *_single); older gloo lacks them.
_all_gather_single = getattr(dist, "all_gather_single", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None)


def tp_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in the TP group (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in the TP group (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _use_gloo_fallback(group: dist.ProcessGroup, native) -> bool:
    # Older torch's gloo has no single-tensor all-gather / reduce-scatter; NCCL always has them.
    return native is None and dist.get_backend(group) == "gloo"


def _all_gather_gloo(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """All-gather along `dim` from the list all_gather that every gloo version has."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    comm.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_gloo(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Reduce-scatter along `dim` as all-reduce then keep own chunk: more traffic, but only needs all_reduce."""
    total = x.clone()
    comm.all_reduce(total, group=group)
    return total.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    if _use_gloo_fallback(group, _all_gather_single):
        return _all_gather_gloo(x.contiguous(), group, dim)
    # The collective concatenates flat buffers along dim 0: gather flat, view as (world, *shape), join along `dim`.
    world = dist.get_world_size(group)
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    comm.all_gather_flat(out, x.contiguous().view(-1), group=group)
    return torch.cat(out.view(world, *x.shape).unbind(0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Sum `x` over ranks and keep this rank's chunk along `dim`."""
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split between {world} ranks")
    if _use_gloo_fallback(group, _reduce_scatter_single):
        return _reduce_scatter_gloo(x, group, dim)
    # The collective splits a flat buffer along dim 0: lay the chunks out rank after rank first.
    chunks = torch.stack(x.chunk(world, dim=dim))
    out = torch.empty(chunks[0].numel(), dtype=x.dtype, device=x.device)
    comm.reduce_scatter_flat(out, chunks.view(-1), group=group)
    return out.view(chunks.shape[1:])


def _split(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """This rank's chunk of `x` along `dim` (no communication)."""
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split between {world} ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def tp_all_reduce_(x: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> None:
    """Reduce `x` over the TP group in place (no autograd: for statistics and gradients); nothing without one."""
    if tp_size(group) > 1:
        comm.all_reduce(x, op=op, group=group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum of `x` over ranks, in a new tensor (the input may be saved by autograd or shared)."""
    out = x.clone()
    comm.all_reduce(out, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (each rank's partial gradient w.r.t. the replicated input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce (sum the partial outputs). Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTPLastDim(torch.autograd.Function):
    """Forward: keep own chunk of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, -1), None


class _GatherFromTPLastDim(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep own chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, -1), None


class _GatherFromSP(torch.autograd.Function):
    """Forward: all-gather along the sequence dim. Backward: reduce-scatter (TP ranks' partial gradients summed)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Forward: reduce-scatter along the sequence dim. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce backward."""
    return x if tp_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a TP region by summing partial outputs: all-reduce forward, identity backward."""
    return x if tp_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim: split forward, all-gather backward."""
    return x if tp_size(group) == 1 else _ScatterToTPLastDim.apply(x, group)


def gather_from_tp_last_dim(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate the ranks' last-dim chunks: all-gather forward, split backward."""
    return x if tp_size(group) == 1 else _GatherFromTPLastDim.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Sequence-parallel to full sequence: all-gather forward, reduce-scatter backward."""
    return x if tp_size(group) == 1 else _GatherFromSP.apply(x, group, dim)


def reduce_scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Partial full-sequence outputs to summed sequence chunks: reduce-scatter forward, all-gather backward."""
    return x if tp_size(group) == 1 else _ReduceScatterToSP.apply(x, group, dim)
