"""Triton rotary embedding (rotate-half convention), forward and backward, matching kernels.rope.apply_rotary.

y = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) for the halves x1, x2 of head_dim. One program
rotates every head of one (batch, position): cos/sin are read once per position and shared across heads.
"""

# Triton convention: upper-case kernel arguments are pointers and compile-time constants.

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, seq_len, n_heads, sx_b, sx_s, sx_h, sx_d, sc_s, sc_d, ss_s, ss_d,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    row = tl.program_id(0)  # = batch * seq_len + position
    b = row // seq_len
    s = row % seq_len
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cos1 = tl.load(COS + s * sc_s + d * sc_d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + s * sc_s + (d + HALF) * sc_d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + s * ss_s + d * ss_d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + s * ss_s + (d + HALF) * ss_d, mask=dmask, other=0.0).to(tl.float32)
    x_row = X + b.to(tl.int64) * sx_b + s.to(tl.int64) * sx_s
    y_row = Y + row.to(tl.int64) * n_heads * 2 * HALF  # Y is a fresh contiguous (batch, seq, heads, head_dim)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & dmask[None, :]
        x_ptr = x_row + h[:, None] * sx_h + d[None, :] * sx_d
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # The transpose of the forward map: dx1 = dy1 cos1 + dy2 sin2, dx2 = dy2 cos2 - dy1 sin1.
            y1 = x1 * cos1[None, :] + x2 * sin2[None, :]
            y2 = x2 * cos2[None, :] - x1 * sin1[None, :]
        else:
            y1 = x1 * cos1[None, :] - x2 * sin1[None, :]
            y2 = x2 * cos2[None, :] + x1 * sin2[None, :]
        y_ptr = y_row + h[:, None] * (2 * HALF) + d[None, :]
        tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    batch, seq, heads, dim = x.shape
    if dim % 2 or cos.shape != (seq, dim) or sin.shape != (seq, dim):
        raise ValueError(f"apply_rotary: x {tuple(x.shape)} needs an even head_dim and cos/sin of shape "
                         f"({seq}, {dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_half))
    _rotary_kernel[(batch * seq,)](x, cos, sin, y, seq, heads, *x.stride(), *cos.stride(), *sin.stride(),
                                   HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward,
                                   num_warps=4 if block_h * block_half <= 2048 else 8)
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None, cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, cos, sin = ctx.saved_tensors
        dx = _rotate(dy, cos, sin, backward=True) if ctx.needs_input_grad[0] else None
        dcos = dsin = None
        if x is not None:
            # cos/sin are fixed buffers in the model; when a caller does want their gradients, plain PyTorch does
            # it: sum over batch and heads of dy * x and dy * rotate_half(x).
            dyf, xf = dy.float(), x.float()
            x1, x2 = xf.chunk(2, dim=-1)
            if ctx.needs_input_grad[1]:
                dcos = (dyf * xf).sum((0, 2)).to(cos.dtype)
            if ctx.needs_input_grad[2]:
                dsin = (dyf * torch.cat((-x2, x1), dim=-1)).sum((0, 2)).to(sin.dtype)
        return dx, dcos, dsin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by the angles in cos/sin (seq, head_dim); computed in fp32 (Triton)."""
    return _Rotary.apply(x, cos, sin)
