"""Tensor-parallel mappings and layers against their single-device definitions, inside real gloo ranks.

Each check runs on every TP group the world offers: the whole world, and (with 4 ranks) the tp=2 groups of a
(tp=2, dp=2) mesh, so a layer that used the global rank instead of its TP rank fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel import mappings
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, padded_vocab_size
from engine.parallel.state import init_parallel
from tests.distributed import run_checks

TOL = {"rtol": 1e-5, "atol": 1e-6}
_GROUPS: list = []


def tp_groups(world_size: int) -> list[dist.ProcessGroup]:
    """The TP groups to test on this rank (created once per process, in the same order on every rank)."""
    if not _GROUPS:
        _GROUPS.append(dist.group.WORLD)
        if world_size == 4:
            _GROUPS.append(init_parallel(tp=2, pp=1, dp=2, device=torch.device("cpu")).tp_group)
    return _GROUPS


def every_rank(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Each rank's `t`, gathered with plain all_gather (independent of the code under test)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def rank_tensor(*shape: int, seed: int, group) -> torch.Tensor:
    """A tensor that differs between ranks of `group`."""
    g = torch.Generator().manual_seed(seed * 1000 + dist.get_rank(group))
    return torch.randn(*shape, generator=g)


def shared_tensor(*shape: int, seed: int) -> torch.Tensor:
    """A tensor identical on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run_mapping(fn, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, input gradient) of fn(x) with upstream gradient `grad`."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def check_copy_and_reduce(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        x, g = rank_tensor(3, 4, seed=1, group=group), rank_tensor(3, 4, seed=2, group=group)
        y, dx = run_mapping(lambda t, gr=group: mappings.copy_to_tp(t, gr), x, g)
        torch.testing.assert_close(y, x, **TOL)
        torch.testing.assert_close(dx, sum(every_rank(g, group)), **TOL)
        y, dx = run_mapping(lambda t, gr=group: mappings.reduce_from_tp(t, gr), x, g)
        torch.testing.assert_close(y, sum(every_rank(x, group)), **TOL)
        torch.testing.assert_close(dx, g, **TOL)
        assert not torch.equal(y, x)  # ranks' inputs differ, so the sum is not trivially the input


def check_scatter_and_gather_last_dim(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        x, g = rank_tensor(2, 3, 4 * n, seed=3, group=group), rank_tensor(2, 3, 4, seed=4, group=group)
        y, dx = run_mapping(lambda t, gr=group: mappings.scatter_to_tp_last_dim(t, gr), x, g)
        torch.testing.assert_close(y, x.chunk(n, -1)[r], **TOL)
        torch.testing.assert_close(dx, torch.cat(every_rank(g, group), -1), **TOL)
        x, g = rank_tensor(2, 3, 4, seed=5, group=group), rank_tensor(2, 3, 4 * n, seed=6, group=group)
        y, dx = run_mapping(lambda t, gr=group: mappings.gather_from_tp_last_dim(t, gr), x, g)
        torch.testing.assert_close(y, torch.cat(every_rank(x, group), -1), **TOL)
        torch.testing.assert_close(dx, g.chunk(n, -1)[r], **TOL)
        # A non-contiguous input (a transpose) gathers the same as its contiguous copy.
        xt = rank_tensor(4, 3, seed=7, group=group).t()
        torch.testing.assert_close(mappings.gather_from_tp_last_dim(xt, group),
                                   torch.cat(every_rank(xt.contiguous(), group), -1), **TOL)


def check_sequence_parallel_mappings(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        x, g = rank_tensor(2, 3, 5, seed=8, group=group), rank_tensor(2, 3 * n, 5, seed=9, group=group)
        y, dx = run_mapping(lambda t, gr=group: mappings.gather_from_sp(t, gr), x, g)
        torch.testing.assert_close(y, torch.cat(every_rank(x, group), 1), **TOL)
        torch.testing.assert_close(dx, sum(every_rank(g, group)).chunk(n, 1)[r], **TOL)
        x, g = rank_tensor(2, 3 * n, 5, seed=10, group=group), rank_tensor(2, 3, 5, seed=11, group=group)
        y, dx = run_mapping(lambda t, gr=group: mappings.reduce_scatter_to_sp(t, gr), x, g)
        torch.testing.assert_close(y, sum(every_rank(x, group)).chunk(n, 1)[r], **TOL)
        torch.testing.assert_close(dx, torch.cat(every_rank(g, group), 1), **TOL)
        # Round trip: the ranks' sequence chunks of a shared tensor gather back to it ...
        full = shared_tensor(2, 3 * n, 5, seed=12)
        torch.testing.assert_close(mappings.gather_from_sp(full.chunk(n, 1)[r], group), full, **TOL)
        # ... and gather then reduce-scatter returns n times the chunk, forward and backward.
        chunk = rank_tensor(2, 3, 5, seed=13, group=group)
        y, dx = run_mapping(lambda t, gr=group: mappings.reduce_scatter_to_sp(mappings.gather_from_sp(t, gr), gr),
                            chunk, torch.ones_like(chunk))
        torch.testing.assert_close(y, n * chunk, **TOL)
        torch.testing.assert_close(dx, torch.full_like(chunk, float(n)), **TOL)


def check_gloo_fallbacks_match_native(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        n = dist.get_world_size(group)
        x = rank_tensor(2, 2 * n, 3, seed=14, group=group)
        for dim in (0, 1, -1):
            torch.testing.assert_close(mappings._all_gather_gloo(x, group, dim), torch.cat(every_rank(x, group), dim))
        torch.testing.assert_close(mappings._reduce_scatter_gloo(x, group, 1),
                                   sum(every_rank(x, group)).chunk(n, 1)[dist.get_rank(group)], **TOL)
        torch.testing.assert_close(mappings._reduce_scatter_gloo(x, group, 1), mappings._reduce_scatter(x, group, 1),
                                   **TOL)


def check_identity_without_group(rank: int, world_size: int) -> None:
    x = shared_tensor(2, 4, 6, seed=15)
    for fn in (mappings.copy_to_tp, mappings.reduce_from_tp, mappings.scatter_to_tp_last_dim,
               mappings.gather_from_tp_last_dim, mappings.gather_from_sp, mappings.reduce_scatter_to_sp):
        y, dx = run_mapping(lambda t, f=fn: f(t, None), x, 2 * x)
        torch.testing.assert_close(y, x)
        torch.testing.assert_close(dx, 2 * x)


def _gathered(shard: torch.Tensor, group, dim: int) -> torch.Tensor:
    return torch.cat(every_rank(shard, group), dim)


def check_column_parallel_linear(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        for bias in (True, False):
            for gather_output in (False, True):
                torch.manual_seed(20)
                ref = nn.Linear(6, 4 * n, bias=bias)
                torch.manual_seed(20)
                layer = ColumnParallelLinear(6, 4 * n, bias=bias, gather_output=gather_output, group=group)
                torch.testing.assert_close(_gathered(layer.weight.data, group, 0), ref.weight.data, rtol=0, atol=0)
                x = shared_tensor(2, 3, 6, seed=21)
                g = shared_tensor(2, 3, 4 * n, seed=22)
                xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
                ref(xr).backward(g)
                y = layer(xp)
                expected = ref(x).detach() if gather_output else ref(x).detach().chunk(n, -1)[r]
                torch.testing.assert_close(y.detach(), expected, **TOL)
                y.backward(g if gather_output else g.chunk(n, -1)[r])
                torch.testing.assert_close(xp.grad, xr.grad, **TOL)
                torch.testing.assert_close(_gathered(layer.weight.grad, group, 0), ref.weight.grad, **TOL)
                if bias:
                    torch.testing.assert_close(_gathered(layer.bias.grad, group, 0), ref.bias.grad, **TOL)
                else:
                    assert layer.bias is None


def check_row_parallel_linear(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        for bias in (True, False):
            for input_is_parallel in (True, False):
                torch.manual_seed(30)
                ref = nn.Linear(4 * n, 5, bias=bias)
                torch.manual_seed(30)
                layer = RowParallelLinear(4 * n, 5, bias=bias, input_is_parallel=input_is_parallel, group=group)
                torch.testing.assert_close(_gathered(layer.weight.data, group, 1), ref.weight.data, rtol=0, atol=0)
                x = shared_tensor(2, 3, 4 * n, seed=31)
                g = shared_tensor(2, 3, 5, seed=32)
                xr = x.clone().requires_grad_()
                ref(xr).backward(g)
                xp = (x if not input_is_parallel else x.chunk(n, -1)[r]).clone().requires_grad_()
                y = layer(xp)
                torch.testing.assert_close(y.detach(), ref(x).detach(), **TOL)  # bias added exactly once
                y.backward(g)
                expected_dx = xr.grad if not input_is_parallel else xr.grad.chunk(n, -1)[r]
                torch.testing.assert_close(xp.grad, expected_dx, **TOL)
                torch.testing.assert_close(_gathered(layer.weight.grad, group, 1), ref.weight.grad, **TOL)
                if bias:
                    torch.testing.assert_close(layer.bias.data, ref.bias.data, rtol=0, atol=0)
                    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **TOL)


def check_column_then_row_mlp(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        n = dist.get_world_size(group)
        torch.manual_seed(40)
        ref1, ref2 = nn.Linear(8, 4 * n), nn.Linear(4 * n, 8)
        torch.manual_seed(40)
        col, row = ColumnParallelLinear(8, 4 * n, group=group), RowParallelLinear(4 * n, 8, group=group)
        x = shared_tensor(3, 8, seed=41)
        xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yp = ref2(F.gelu(ref1(xr))), row(F.gelu(col(xp)))
        torch.testing.assert_close(yp, yr, **TOL)
        yr.square().sum().backward()
        yp.square().sum().backward()
        torch.testing.assert_close(xp.grad, xr.grad, **TOL)
        torch.testing.assert_close(_gathered(col.weight.grad, group, 0), ref1.weight.grad, **TOL)
        torch.testing.assert_close(_gathered(row.weight.grad, group, 1), ref2.weight.grad, **TOL)


def check_vocab_parallel_embedding(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        n = dist.get_world_size(group)
        for vocab, divisor in ((4 * n, 1), (4 * n + 1, 1), (10, 4)):
            torch.manual_seed(50)
            ref = nn.Embedding(vocab, 6)
            torch.manual_seed(50)
            emb = VocabParallelEmbedding(vocab, 6, group=group, divisor=divisor)
            padded = padded_vocab_size(vocab, n, divisor)
            assert emb.padded_vocab == padded and padded % (n * divisor) == 0 and padded >= vocab
            full = _gathered(emb.weight.data, group, 0)
            torch.testing.assert_close(full[:vocab], ref.weight.data, rtol=0, atol=0)
            assert full[vocab:].abs().sum() == 0  # padding rows are zero
            ids = torch.cat([torch.arange(vocab), torch.tensor([0, vocab - 1, vocab // 2])]).view(1, -1)
            out, out_ref = emb(ids), ref(ids)
            torch.testing.assert_close(out, out_ref, **TOL)
            g = shared_tensor(*out.shape, seed=51)
            out.backward(g)
            out_ref.backward(g)
            grad = _gathered(emb.weight.grad, group, 0)
            torch.testing.assert_close(grad[:vocab], ref.weight.grad, **TOL)
            assert grad[vocab:].abs().sum() == 0  # padding rows get no gradient
            # Ids in the padding range are never looked up: zero output, and still no gradient into padding rows.
            emb.weight.grad = None
            pad_ids = torch.arange(vocab, padded).view(1, -1)
            out = emb(pad_ids)
            assert out.abs().sum() == 0
            out.backward(torch.ones_like(out))
            assert _gathered(emb.weight.grad, group, 0).abs().sum() == 0
        assert padded > vocab  # the last case did pad


def _padded_logits(logits: torch.Tensor, padded: int) -> torch.Tensor:
    """`logits` widened to `padded` columns with large values, which win the softmax unless they are excluded."""
    extra = torch.full((*logits.shape[:-1], padded - logits.shape[-1]), 50.0)
    return torch.cat([logits, extra], -1)


def check_vocab_parallel_cross_entropy(rank: int, world_size: int) -> None:
    for group in tp_groups(world_size):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        for vocab, ignore in ((4 * n, False), (4 * n + 3, False), (4 * n + 3, True)):
            padded = padded_vocab_size(vocab, n)
            per = padded // n
            logits = shared_tensor(2, 2 * n + 2, vocab, seed=60) * 3
            # A target in every rank's shard (its first and last real column), plus the vocabulary's ends.
            targets = [t for k in range(n) for t in (k * per, min((k + 1) * per, vocab) - 1)] + [0, vocab - 1]
            targets = torch.tensor(targets * 2).view(2, -1)
            if ignore:
                targets[0, 1] = targets[1, -1] = -100
            assert all(((targets >= k * per) & (targets < (k + 1) * per)).any() for k in range(n))
            lr = logits.clone().requires_grad_()
            loss_ref = F.cross_entropy(lr.flatten(0, 1), targets.flatten(), ignore_index=-100)
            loss_ref.backward()
            shard = _padded_logits(logits, padded).chunk(n, -1)[r].clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(shard, targets, group, vocab_start=r * per, vocab_size=vocab)
            torch.testing.assert_close(loss, loss_ref.detach(), **TOL)
            loss.backward()
            grad = _gathered(shard.grad, group, -1)
            torch.testing.assert_close(grad[..., :vocab], lr.grad, **TOL)
            assert grad[..., vocab:].abs().sum() == 0  # padded columns excluded


def check_cross_entropy_after_column_parallel_head(rank: int, world_size: int) -> None:
    # The LM-head pattern: vocab-split logits from a ColumnParallelLinear straight into the parallel loss.
    for group in tp_groups(world_size):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        vocab = 3 * n
        torch.manual_seed(70)
        ref = nn.Linear(5, vocab)
        torch.manual_seed(70)
        head = ColumnParallelLinear(5, vocab, group=group)
        x = shared_tensor(4, 5, seed=71)
        targets = torch.arange(4) * (vocab - 1) // 3
        xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss_ref = F.cross_entropy(ref(xr), targets)
        loss = vocab_parallel_cross_entropy(head(xp), targets, group, vocab_start=r * 3, vocab_size=vocab)
        torch.testing.assert_close(loss, loss_ref, **TOL)
        loss_ref.backward()
        loss.backward()
        torch.testing.assert_close(xp.grad, xr.grad, **TOL)
        torch.testing.assert_close(_gathered(head.weight.grad, group, 0), ref.weight.grad, **TOL)


def check_single_device_cross_entropy(rank: int, world_size: int) -> None:
    logits = shared_tensor(6, 7, seed=80).requires_grad_()
    targets = torch.tensor([0, 6, 3, 3, 1, 5])
    loss = vocab_parallel_cross_entropy(logits, targets, None, vocab_start=0)
    ref = logits.detach().clone().requires_grad_()
    loss_ref = F.cross_entropy(ref, targets)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(logits.grad, ref.grad, **TOL)


CHECKS = [
    check_copy_and_reduce,
    check_scatter_and_gather_last_dim,
    check_sequence_parallel_mappings,
    check_gloo_fallbacks_match_native,
    check_identity_without_group,
    check_column_parallel_linear,
    check_row_parallel_linear,
    check_column_then_row_mlp,
    check_vocab_parallel_embedding,
    check_vocab_parallel_cross_entropy,
    check_cross_entropy_after_column_parallel_head,
    check_single_device_cross_entropy,
]


def test_tensor_parallel_two_ranks():
    run_checks(2, CHECKS)


@pytest.mark.slow  # the 2-rank checks run in the fast tier
def test_tensor_parallel_four_ranks():
    run_checks(4, CHECKS)
