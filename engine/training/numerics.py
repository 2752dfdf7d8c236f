"""Numerical faults: a non-finite loss or gradient norm, decided the same way on every rank, and loss spikes.

Every step, after the gradient norm, each rank votes on two flags (its loss is not finite, its gradient norm is
not finite) in one MAX all-reduce over the world. The vote matters without ZeRO too: data-parallel replicas hold
the same gradients only if nothing went wrong on one of them after the all-reduce, and a replica that stepped
while the others skipped would drift apart silently. What happens next is `train.nonfinite`:

    skip  the update is dropped (the parameters, optimizer moments and step count stay as they were) and the step
          is counted in `nonfinite_steps` and `skipped_steps`; more than `train.max_skipped_steps` such steps stop
          the run as `stop` does
    stop  the step is skipped as above and saved: the weights and optimizer state from before it, the data
          position after its batch; then the run exits EXIT_DIVERGED

fp16 is the exception: an overflowing gradient norm with a finite loss is the loss scaler's business (skip, halve
the scale), counted in `skipped_steps` only. A loss spike - the loss above the mean of the last `spike_window`
finite losses by `spike_threshold` standard deviations - is logged with a warning and counted in `loss_spikes`.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from engine.parallel import comm

EXIT_DIVERGED = 3  # the run stopped on non-finite values (train.nonfinite); its last good state is saved


def nonfinite_vote(loss: float, grad_norm: torch.Tensor, world: bool) -> tuple[bool, bool]:
    """(the loss is not finite, the gradient norm is not finite) on any rank: one MAX all-reduce over the world."""
    flags = torch.tensor([not math.isfinite(loss), not bool(torch.isfinite(grad_norm))], dtype=torch.int32,
                         device=grad_norm.device)
    if world and dist.is_initialized():
        comm.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, norm_bad = flags.tolist()
    return bool(loss_bad), bool(norm_bad)


class SpikeDetector:
    """Flags a loss far above the recent ones: more than `threshold` standard deviations over the mean of the last
    `window` finite losses (once the window holds `window // 2` of them; `window` 0 disables it). Spikes join the
    window too, so a lasting change of level stops being flagged once the window has seen it."""

    def __init__(self, window: int, threshold: float):
        self.threshold = threshold
        self.losses: deque[float] = deque(maxlen=window) if window > 0 else deque(maxlen=0)

    def check(self, loss: float) -> float | None:
        """Add `loss`; the window's mean before it if it is a spike, else None."""
        if self.losses.maxlen == 0 or not math.isfinite(loss):
            return None
        n, spike = len(self.losses), None
        if n >= max(2, self.losses.maxlen // 2):
            mean = sum(self.losses) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (n - 1))
            spike = mean if loss > mean + self.threshold * std else None
        self.losses.append(loss)
        return spike

    def state_dict(self) -> list[float]:
        """The window, for checkpoints (a resumed run flags what the uninterrupted one would)."""
        return list(self.losses)

    def load_state_dict(self, losses: list[float]) -> None:
        """Restore `state_dict()`."""
        self.losses.clear()
        self.losses.extend(losses)
