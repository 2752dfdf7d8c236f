"""Triton SwiGLU and tanh-GELU, forward and backward, matching kernels.activations.

Elementwise over flat contiguous tensors, fp32 math. The backward kernels recompute the activation from the saved
inputs instead of saving intermediate results (memory-bound either way, and it keeps one tensor less alive).
"""

# Triton convention: upper-case kernel arguments are pointers and compile-time constants.

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
# sqrt(2 / pi): gelu_tanh(x) = 0.5 x (1 + tanh(z)) with z = SQRT_2_OVER_PI (x + 0.044715 x^3).
SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _sigmoid(z):
    # exp of -|z| only: never overflows (tl.sigmoid's exp(-z) reaches inf for z < -88; right, but noisy).
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    # silu'(g) = sig + g sig (1 - sig)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_fwd(X, Y, n, BLOCK: tl.constexpr, K: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # 0.5 (1 + tanh(z)) = sigmoid(2 z): no tanh needed (libdevice calls do not run in the interpreter), and no
    # 1 + tanh cancellation for very negative x.
    s = _sigmoid(2.0 * K * (x + 0.044715 * x * x * x))
    tl.store(Y + offs, (x * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh_bwd(DY, X, DX, n, BLOCK: tl.constexpr, K: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(2.0 * K * (x + 0.044715 * x * x * x))
    # d/dx x s(x) = s + x s (1 - s) * 2 K (1 + 3 * 0.044715 x^2)
    dx = s + x * s * (1.0 - s) * (2.0 * K) * (1.0 + 3.0 * 0.044715 * x * x)
    tl.store(DX + offs, (dy * dx).to(DX.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        _swiglu_fwd[_grid(y.numel())](gate, up, y, y.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        _swiglu_bwd[_grid(gate.numel())](dy.contiguous(), gate, up, dgate, dup, gate.numel(), BLOCK=BLOCK)
        return dgate, dup


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _gelu_tanh_fwd[_grid(x.numel())](x, y, x.numel(), BLOCK=BLOCK, K=SQRT_2_OVER_PI)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        _gelu_tanh_bwd[_grid(x.numel())](dy.contiguous(), x, dx, x.numel(), BLOCK=BLOCK, K=SQRT_2_OVER_PI)
        return dx


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated MLP activation (Triton)."""
    if gate.shape != up.shape:  # broadcasting: expand here so autograd sums the gradients back
        gate, up = torch.broadcast_tensors(gate, up)
    return _SwiGLU.apply(gate, up)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's GELU (Triton)."""
    return _GeluTanh.apply(x)
