"""The position-wise feed-forward network: GELU (GPT-2) or SwiGLU (Llama), split by columns then rows across TP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import kernels
from engine.config import ModelConfig
from engine.parallel.layers import ColumnParallelLinear, InitMethod, RowParallelLinear, enter_tp_region


class MLP(nn.Module):
    """down(gelu_tanh(up(x))) for GPT-2 with biases; down(swiglu(gate(x), up(x))) for Llama without.

    Under tensor parallelism each rank holds ffn_hidden_size / tp of the hidden units: one collective in (shared by
    gate and up), one out.
    """

    def __init__(self, cfg: ModelConfig, init: InitMethod, output_init: InitMethod,
                 group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        bias = cfg.arch == "gpt2"
        column = {"group": group, "sequence_parallel": sequence_parallel, "input_mapped": True, "init_method": init}
        self.gate_proj = (ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False, **column)
                          if cfg.arch == "llama" else None)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, bias=bias, **column)
        self.down_proj = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, bias=bias, group=group,
                                           init_method=output_init, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> (..., hidden) (sequence chunks in and out under SP)."""
        x = enter_tp_region(x, self.group, self.sequence_parallel)
        if self.gate_proj is None:
            return self.down_proj(kernels.gelu_tanh(self.up_proj(x)))
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
