"""The position-wise feed-forward network: GELU (GPT-2) or SwiGLU (Llama)."""

from __future__ import annotations

import torch
from torch import nn

import kernels
from engine.config import ModelConfig


class MLP(nn.Module):
    """down(gelu_tanh(up(x))) for GPT-2 with biases; down(swiglu(gate(x), up(x))) for Llama without."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.arch == "gpt2"
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False) if cfg.arch == "llama" else None
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> (..., hidden)."""
        if self.gate_proj is None:
            return self.down_proj(kernels.gelu_tanh(self.up_proj(x)))
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
