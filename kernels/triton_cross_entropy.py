"""Triton cross-entropy for large vocabularies, matching kernels.cross_entropy, plus its vocab-parallel pieces.

No (rows, vocab) softmax is ever materialised. The forward streams each row through BLOCK_V-wide chunks keeping an
online max and rescaled sum of exponentials (and picks the target logit), giving per-row statistics; the backward
streams the row again and writes softmax - onehot directly as the logits' gradient.

The same two kernels serve a vocabulary split across tensor-parallel ranks: `shard_stats` gives each shard's
(max, sum-exp, target logit); the caller all-reduces them into the global log-sum-exp and passes it to `shard_grad`.
"""

# Triton convention: upper-case kernel arguments are pointers and compile-time constants.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRETED


@triton.jit
def _stats_kernel(LOGITS, TARGETS, MAX, SUMEXP, PICKED, n_cols, stride_row, vocab_start, ignore_index,
                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Rescale the running sum to the new max: exp(x - m) never overflows.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    target = tl.load(TARGETS + row)
    local = target - vocab_start
    in_shard = (target != ignore_index) & (local >= 0) & (local < n_cols)
    picked = tl.load(base + tl.where(in_shard, local, 0), mask=in_shard, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(PICKED + row, picked)


@triton.jit
def _grad_kernel(LOGITS, TARGETS, LSE, SCALE, GRAD, n_cols, stride_row, grad_stride_row, vocab_start, ignore_index,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    out = GRAD + row.to(tl.int64) * grad_stride_row
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)  # d loss / d (this row's loss); 0 for ignored rows
    target = tl.load(TARGETS + row)
    local = tl.where(target == ignore_index, -1, target - vocab_start)  # -1: matches no column
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)  # softmax over the whole vocabulary (lse is global)
        p = tl.where(cols == local, p - 1.0, p)
        tl.store(out + cols, (p * scale).to(GRAD.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> tuple[int, int]:
    """(chunk width, warps): wide chunks on GPU for fewer reduction rounds, narrow when interpreted."""
    cap = 128 if INTERPRETED else 16384
    block = min(cap, triton.next_power_of_2(n_cols))
    return block, 4 if block <= 2048 else 16


def _rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits as (rows, vocab) with unit column stride, targets as contiguous (rows,)."""
    logits2 = logits.reshape(-1, logits.shape[-1])
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    targets1 = targets.reshape(-1).contiguous()
    if targets1.numel() != logits2.shape[0]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    return logits2, targets1


def _stats(logits2: torch.Tensor, targets1: torch.Tensor, vocab_start: int,
           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = logits2.shape
    out = torch.empty(3, n_rows, dtype=torch.float32, device=logits2.device)
    block, warps = _block_v(n_cols)
    if n_rows:
        _stats_kernel[(n_rows,)](logits2, targets1, out[0], out[1], out[2], n_cols, logits2.stride(0), vocab_start,
                                 ignore_index, BLOCK_V=block, num_warps=warps)
    return out[0], out[1], out[2]


def _grad(logits2: torch.Tensor, targets1: torch.Tensor, vocab_start: int, lse: torch.Tensor,
          scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    n_rows, n_cols = logits2.shape
    grad = torch.empty(logits2.shape, dtype=logits2.dtype, device=logits2.device)
    block, warps = _block_v(n_cols)
    if n_rows:
        _grad_kernel[(n_rows,)](logits2, targets1, lse.float().contiguous(), scale.float().contiguous(), grad,
                                n_cols, logits2.stride(0), grad.stride(0), vocab_start, ignore_index, BLOCK_V=block,
                                num_warps=warps)
    return grad


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        logits2, targets1 = _rows(logits, targets)
        m, s, picked = _stats(logits2, targets1, 0, ignore_index)
        lse = m + torch.log(s)
        valid = targets1 != ignore_index
        n_valid = valid.sum()
        # Mean over non-ignored targets; none at all gives 0/0 = nan, as F.cross_entropy does.
        loss = torch.where(valid, lse - picked, 0.0).sum() / n_valid
        ctx.save_for_backward(logits2, targets1, lse, valid, n_valid)
        ctx.ignore_index, ctx.shape = ignore_index, logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits2, targets1, lse, valid, n_valid = ctx.saved_tensors
        scale = torch.where(valid, grad_loss.float() / n_valid, 0.0)
        grad = _grad(logits2, targets1, 0, lse, scale, ctx.ignore_index)
        return grad.view(ctx.shape), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (..., vocab) against targets (...) over non-ignored targets, in fp32 (Triton)."""
    return _CrossEntropy.apply(logits, targets, ignore_index)


@torch.no_grad()
def shard_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a vocabulary shard: (max logit, sum exp(logit - max), target logit or 0 if not in it), fp32."""
    return _stats(*_rows(logits, targets), vocab_start, ignore_index)


@torch.no_grad()
def shard_grad(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, lse: torch.Tensor,
               grad_rows: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """d loss / d shard logits: (exp(logit - lse) - onehot(target)) * grad_rows per row, in the logits' dtype."""
    logits2, targets1 = _rows(logits, targets)
    return _grad(logits2, targets1, vocab_start, lse.reshape(-1), grad_rows.reshape(-1), ignore_index).view(
        logits.shape)
