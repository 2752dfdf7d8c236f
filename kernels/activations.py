"""The MLP activations: GPT-2's tanh-approximated GELU and Llama's SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def gelu_tanh(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's GELU."""
    if resolve_backend(backend, x.device) == "triton":
        from kernels import triton_activations  # lazily: plain-PyTorch runs never import Triton

        return triton_activations.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, the gated MLP activation."""
    if resolve_backend(backend, gate.device) == "triton":
        from kernels import triton_activations

        return triton_activations.swiglu(gate, up)
    return F.silu(gate) * up
