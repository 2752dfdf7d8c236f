"""Triton RMSNorm and LayerNorm over the last dimension, forward and backward, matching kernels.norms.

Each program normalises BLOCK_M whole rows held in registers (statistics in fp32); the backward kernels loop over
row blocks grid-stride so each program sums its rows' weight gradients into one fp32 partial row, and the few
partials are summed on the host side (no atomics, deterministic).
"""

# Triton convention: upper-case kernel arguments are pointers and compile-time constants.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import flat_rows, reduction_programs, row_tile


@triton.jit
def _tile(rows, n_rows, n_cols, BLOCK_N: tl.constexpr):
    """Columns, mask and flat offsets of the (rows, BLOCK_N) tile of a (n_rows, n_cols) matrix."""
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return cols, mask, rows.to(tl.int64)[:, None] * n_cols + cols[None, :]  # int64: rows * cols can pass 2^31


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, n_rows, n_cols, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols, mask, offs = _tile(rows, n_rows, n_cols, BLOCK_N)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    # As the reference: round the normalised row to x's dtype before the weight scales it.
    xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (xhat * w[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        _, mask, offs = _tile(rows, n_rows, n_cols, BLOCK_N)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)) with g = dL/dxhat = dy * w.
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + tl.program_id(0) * n_cols + cols, dw, mask=cols < n_cols)


@triton.jit
def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols, mask, offs = _tile(rows, n_rows, n_cols, BLOCK_N)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    # Two passes over the registers (mean, then centred squares): no E[x^2] - E[x]^2 cancellation.
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    tl.store(MEAN + rows, mean, mask=rows < n_rows)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, n_rows, n_cols, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        _, mask, offs = _tile(rows, n_rows, n_cols, BLOCK_N)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rows < n_rows, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w.
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / n_cols
        c2 = tl.sum(g, axis=1) / n_cols
        dx = rstd[:, None] * (g - c2[:, None] - xhat * c1[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + tl.program_id(0) * n_cols + cols, dw, mask=cols < n_cols)
    tl.store(DB_PARTIAL + tl.program_id(0) * n_cols + cols, db, mask=cols < n_cols)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = flat_rows(x)
        n_rows, n_cols = x2.shape
        block_m, block_n, warps = row_tile(n_cols)
        # The reference multiplies weight (often fp32) by x's dtype, so the result has the promoted dtype.
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(triton.cdiv(n_rows, block_m),)](x2, weight.contiguous(), y, rstd, n_rows, n_cols, eps,
                                                       BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        block_m, block_n, warps = row_tile(n_cols)
        programs = reduction_programs(x2.device, triton.cdiv(n_rows, block_m))
        dx = torch.empty_like(x2)
        dw = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](flat_rows(dy), x2, weight.contiguous(), rstd, dx, dw, n_rows, n_cols,
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # as autocast treats F.layer_norm
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = flat_rows(x)
        n_rows, n_cols = x2.shape
        block_m, block_n, warps = row_tile(n_cols)
        y = torch.empty_like(x2)  # F.layer_norm keeps x's dtype
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _layer_norm_fwd[(triton.cdiv(n_rows, block_m),)](x2, weight.contiguous(), bias.contiguous(), y, mean, rstd,
                                                         n_rows, n_cols, eps, BLOCK_M=block_m, BLOCK_N=block_n,
                                                         num_warps=warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.view(x.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        block_m, block_n, warps = row_tile(n_cols)
        programs = reduction_programs(x2.device, triton.cdiv(n_rows, block_m))
        dx = torch.empty_like(x2)
        dw = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        db = torch.empty_like(dw)
        _layer_norm_bwd[(programs,)](flat_rows(dy), x2, weight.contiguous(), mean, rstd, dx, dw, db, n_rows, n_cols,
                                     BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        return dx.view(dy.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(ctx.bias_dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, the statistics in fp32 (Triton)."""
    return _RMSNorm.apply(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (Triton)."""
    return _LayerNorm.apply(x, weight, bias, eps)
