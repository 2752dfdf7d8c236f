"""The language-modelling loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits (..., vocab) against targets (...) over non-ignored targets, in fp32."""
    resolve_backend(backend)  # the PyTorch reference is the only implementation in this build
    # fp32 because log-softmax over a large vocabulary in bf16 loses most of the loss's precision.
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)
