"""Which samples each data-parallel rank reads: a pure function of `consumed_samples`.

Global batch b is samples [b*G, (b+1)*G) of the dataset's (already shuffled) stream; data-parallel rank r reads the
contiguous slice [r*G/D, (r+1)*G/D) of it and cuts that into micro-batches. Because nothing else is remembered,
resuming at any `consumed_samples` - with the same or a different data-parallel size - continues the identical
global sample stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchSampler:
    """Micro-batches of sample indices for one data-parallel rank."""

    total_samples: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        g, m, d = self.global_batch_size, self.micro_batch_size, self.dp_size
        if m < 1 or d < 1 or g < 1:
            raise ValueError(f"batch sizes and dp size must be positive (global {g}, micro {m}, dp {d})")
        if g % (m * d):
            raise ValueError(f"global batch {g} is not a multiple of micro batch {m} x data-parallel size {d}")
        if not 0 <= self.dp_rank < d:
            raise ValueError(f"dp_rank {self.dp_rank} outside a data-parallel group of {d}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per rank per global batch."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def rank_share(self, consumed_samples: int) -> np.ndarray:
        """This rank's sample indices of the global batch that starts at `consumed_samples`."""
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}")
        if consumed_samples + self.global_batch_size > self.total_samples:
            raise IndexError(f"global batch at {consumed_samples} runs past the {self.total_samples} samples")
        per_rank = self.global_batch_size // self.dp_size
        start = consumed_samples + self.dp_rank * per_rank
        return np.arange(start, start + per_rank, dtype=np.int64)

    def micro_batches(self, consumed_samples: int) -> list[np.ndarray]:
        """`rank_share` cut into `accumulation_steps` micro-batches."""
        return np.split(self.rank_share(consumed_samples), self.accumulation_steps)

    def from_consumed(self, consumed_samples: int) -> Iterator[list[np.ndarray]]:
        """Every remaining global batch's micro-batches for this rank, starting at `consumed_samples`."""
        c = consumed_samples
        while c + self.global_batch_size <= self.total_samples:
            yield self.micro_batches(c)
            c += self.global_batch_size
