"""One optimizer step's forward and backward passes over its micro-batches.

This is the seam pipeline schedules plug into: a schedule takes the model and this rank's micro-batches for one
global batch, runs every forward and backward, and returns the summed (unscaled) micro-batch losses. Without
pipelining it is a plain loop whose last backward triggers the data-parallel gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from engine.parallel.data_parallel import GradientAllReduce


def forward_backward_no_pipelining(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grad_sync: GradientAllReduce,
    autocast: Callable[[], AbstractContextManager],
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> torch.Tensor:
    """Forward and backward every micro-batch; gradients are all-reduced only after the last one."""
    n = len(micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0][0].device)
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == n - 1
        with nullcontext() if last else grad_sync.no_sync():
            with autocast():
                loss = model(inputs, targets)
            # Each micro-batch's mean loss counts 1/n towards the global-batch mean.
            scale_loss(loss / n).backward()
        total += loss.detach().to(torch.float64)
    return total
