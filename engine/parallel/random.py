"""Dropout masks that do not depend on the layout: the same mask for the same sample, layer and site, wherever the
layer runs.

A mask is drawn from a generator seeded by mixing three integers: the micro-batch's key (the trainer derives it
from the run's seed and the index of the micro-batch's first sample in the sample stream), the dropout site (the
embedding, or one of a layer's two residual branches, numbered by the layer's global index), and, where ranks hold
different data (sequence chunks under SP), the tensor-parallel rank. Nothing else goes in, so:
  - a pipeline stage draws exactly the masks the single process draws for its layers (no shared stream to advance);
  - tensor-parallel ranks without SP hold the same activations and draw the same mask, the single process's;
  - data-parallel ranks draw the single process's masks for their samples;
  - activation recomputation and resume reproduce every mask with no generator state to save.
Without a key (a model called directly, outside the trainer) the key is one draw of the default CPU stream, so
seeded code stays reproducible. A generator is seeded per call from Python integers (no device sync); under
`train.compile` that host-side generator is a graph break per dropout with p > 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.mappings import tp_rank

_MASK64 = 2**64 - 1
_SEED_RANGE = 2**62


def mix_seed(*values: int) -> int:
    """A well-spread 62-bit seed from integers (splitmix64 finalisation of each in turn)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h % _SEED_RANGE


class KeyedDropout(nn.Module):
    """Dropout whose mask is a function of (micro-batch key, site, and the TP rank when `group` is given)."""

    def __init__(self, p: float, site: int, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.p, self.site, self.group = p, site, group

    def forward(self, x: torch.Tensor, key: int | None = None, branch: int = 0) -> torch.Tensor:
        """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p), in training.

        `branch` tells apart several uses of one module in a layer (attention and MLP outputs).
        """
        if not self.training or self.p == 0.0:
            return x
        if key is None:
            key = int(torch.randint(_SEED_RANGE, (1,)).item())
        seed = mix_seed(key, self.site, branch, tp_rank(self.group) if self.group is not None else -1)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        # A bool mask: what autograd keeps for backward is 1 byte per element, as for nn.Dropout.
        keep = torch.rand(x.shape, device=x.device, generator=generator) >= self.p
        return torch.where(keep, x / (1.0 - self.p), 0.0)

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        return f"p={self.p}, site={self.site}" + (", per TP rank" if self.group is not None else "")
