"""The language-modelling loss, and the per-shard pieces of a vocabulary-parallel one.

Vocabulary-parallel recipe (each rank holds logits[..., vocab_start : vocab_start + shard]):
    m, s, t = cross_entropy_shard_stats(shard, targets, vocab_start)        # per row, this shard only
    gm = all_reduce(m, MAX); s = all_reduce(s * exp(m - gm), SUM); t = all_reduce(t, SUM)
    lse = gm + log(s); loss_rows = (lse - t) where targets != ignore_index; loss = mean of those
    backward: grad_shard = cross_entropy_shard_grad(shard, targets, vocab_start, lse, dloss/dloss_rows)
The collectives are the caller's (engine.parallel); these functions never communicate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits (..., vocab) against targets (...) over non-ignored targets, in fp32."""
    if resolve_backend(backend, logits.device) == "triton":
        from kernels import triton_cross_entropy  # lazily: plain-PyTorch runs never import Triton

        return triton_cross_entropy.cross_entropy(logits, targets, ignore_index)
    # fp32 because log-softmax over a large vocabulary in bf16 loses most of the loss's precision.
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)


@torch.no_grad()
def cross_entropy_shard_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                              ignore_index: int = -100, *,
                              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a vocabulary shard: (max logit, sum exp(logit - max), target logit or 0 if not in it), fp32."""
    if resolve_backend(backend, logits.device) == "triton":
        from kernels import triton_cross_entropy

        return triton_cross_entropy.shard_stats(logits, targets, vocab_start, ignore_index)
    x = logits.float().reshape(-1, logits.size(-1))
    local = targets.reshape(-1) - vocab_start
    in_shard = (targets.reshape(-1) != ignore_index) & (local >= 0) & (local < x.size(1))
    m = x.max(dim=1).values
    s = torch.exp(x - m[:, None]).sum(dim=1)
    picked = x.gather(1, local.clamp(0, x.size(1) - 1)[:, None])[:, 0]
    return m, s, torch.where(in_shard, picked, 0.0)


@torch.no_grad()
def cross_entropy_shard_grad(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                             grad_rows: torch.Tensor, ignore_index: int = -100, *,
                             backend: str | None = None) -> torch.Tensor:
    """d loss / d shard logits: (exp(logit - lse) - onehot(target)) * grad_rows per row, in the logits' dtype."""
    if resolve_backend(backend, logits.device) == "triton":
        from kernels import triton_cross_entropy

        return triton_cross_entropy.shard_grad(logits, targets, vocab_start, lse, grad_rows, ignore_index)
    x = logits.float().reshape(-1, logits.size(-1))
    grad = torch.exp(x - lse.reshape(-1, 1).float())
    flat = targets.reshape(-1)
    local = flat - vocab_start
    rows = torch.nonzero((flat != ignore_index) & (local >= 0) & (local < x.size(1)))[:, 0]
    grad[rows, local[rows]] -= 1.0
    return (grad * grad_rows.reshape(-1, 1).float()).to(logits.dtype).view(logits.shape)
