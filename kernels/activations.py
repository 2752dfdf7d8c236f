"""The MLP activations: GPT-2's tanh-approximated GELU and Llama's SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def gelu_tanh(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's GELU."""
    resolve_backend(backend)  # the PyTorch reference is the only implementation in this build
    return F.gelu(x, approximate="tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, the gated MLP activation."""
    resolve_backend(backend)
    return F.silu(gate) * up
