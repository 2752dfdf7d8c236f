"""Dynamic loss scaling for fp16, with the overflow decision agreed by every rank.

fp16 gradients underflow at the loss's natural scale, so the loss is multiplied by `scale` before backward and the
gradients divided by it after. A gradient that overflowed (inf or NaN anywhere in the model) means the step is
skipped and the scale halved; `growth_interval` clean steps in a row double it. Under tensor or pipeline
parallelism each rank sees only its own parameters' gradients, so one rank's overflow must skip the step on all
of them: the overflow is the world-wide vote on the gradient norm (`engine.training.numerics.nonfinite_vote`)
taken before anyone steps, and every rank keeps the same scale. (torch.amp.GradScaler decides per rank.) The
constants are GradScaler's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DynamicLossScaler:
    """The loss scale and its growth/backoff rule; `found_inf` is the world-wide overflow vote."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale_value, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # clean steps since the scale last changed

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: times the current scale."""
        return loss * self.scale_value

    def unscale_(self, grads: Iterable[torch.Tensor]) -> None:
        """Divide every gradient (or ZeRO gradient shard) by the scale, in place."""
        inv = 1.0 / self.scale_value
        for g in grads:
            g.mul_(inv)

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow; grow after `growth_interval` clean steps."""
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        """JSON-able state for checkpoints."""
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (or a torch GradScaler's, as earlier checkpoints hold)."""
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state.get("growth_tracker", state.get("_growth_tracker", 0)))
