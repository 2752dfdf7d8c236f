"""Random streams under tensor parallelism: which dropout masks must agree between TP ranks, and which must not.

Outside the TP regions without sequence parallelism every TP rank holds the same activations, so dropout there
draws from the default stream, seeded the same on every TP rank: the masks agree across the group and equal the
single-device run's. Where ranks hold different data (sequence chunks under SP), a shared stream would repeat one
mask on every chunk; `RankLocalDropout` draws those masks from a per-TP-rank stream instead.

That stream is not a generator state of its own to carry around: each call seeds a fresh generator from one draw
of the default stream (the same draw on every TP rank) mixed with the TP rank. So it is reproduced by whatever
reproduces the default stream: activation recomputation (torch.utils.checkpoint restores the default state before
re-running) and checkpoint/resume (which saves the default state) need nothing extra. The seed's `.item()` is a
graph break under `train.compile`, once per dropout; SP runs with dropout 0 (the usual for pretraining) skip it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.mappings import tp_rank

_SEED_RANGE = 2**62
# Spreads the TP ranks' seeds apart (any odd constant works; this is 2^64 / golden ratio).
_RANK_STRIDE = 0x9E3779B97F4A7C15


def rank_generator(device: torch.device, rank: int) -> torch.Generator:
    """A generator on `device` seeded from one draw of the default CPU stream and `rank`."""
    shared = int(torch.randint(_SEED_RANGE, (1,)).item())
    return torch.Generator(device=device).manual_seed((shared + rank * _RANK_STRIDE) % _SEED_RANGE)


class RankLocalDropout(nn.Module):
    """Dropout whose mask comes from a per-TP-rank stream: for activations that differ between TP ranks."""

    def __init__(self, p: float, group: dist.ProcessGroup | None):
        super().__init__()
        self.p, self.group = p, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p), in training."""
        if not self.training or self.p == 0.0:
            return x
        generator = rank_generator(x.device, tp_rank(self.group))
        # A bool mask: what autograd keeps for backward is 1 byte per element, as for nn.Dropout.
        keep = torch.rand(x.shape, device=x.device, generator=generator) >= self.p
        return torch.where(keep, x / (1.0 - self.p), 0.0)

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        return f"p={self.p}"
