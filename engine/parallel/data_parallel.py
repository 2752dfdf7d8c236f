"""Data parallelism: gradients averaged over the DP group in buckets, each launched as soon as it is complete.

Every parameter's `.grad` is a view into one flat buffer per bucket, so autograd accumulates micro-batch
gradients in place and a bucket's all-reduce needs no copy. Buckets hold parameters in reverse registration order
- roughly the order backward produces their gradients - so the first buckets' communication overlaps the rest of
backward. On gradient-accumulation micro-steps nothing is communicated; only the last micro-batch's backward
launches the all-reduces (`sync=True`), and `finish_grad_sync` waits for them before the optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel import comm


class _Bucket:
    """A flat gradient buffer shared by a few parameters, and the state of its all-reduce."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, device: torch.device):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.ready = 0
        self.handle: comm.Handle | None = None
        offset = 0
        for p in params:
            p.grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


class GradientSync:
    """The switch the schedule flips on micro-batches before the last: `sync` is False inside `no_sync()`."""

    sync = True

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (micro-batches before the last)."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


class GradientAllReduce(GradientSync):
    """Averages the gradients of `module`'s parameters over `group` after backward."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None, bucket_size_mb: float = 25.0):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        limit = max(1, int(bucket_size_mb * 2**20))
        current: list[nn.Parameter] = []
        nbytes = 0
        for p in reversed(params):
            current.append(p)
            nbytes += p.numel() * p.element_size()
            if nbytes >= limit:
                self.buckets.append(_Bucket(current, p.dtype, p.device))
                current, nbytes = [], 0
        if current:
            self.buckets.append(_Bucket(current, current[0].dtype, current[0].device))
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        if self.size > 1:
            # Start every replica from the first one's weights, whatever each rank's initialisation did.
            src = dist.get_global_rank(group, 0)
            for p in module.parameters():
                comm.broadcast(p.data, src=src, group=group)
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self._bucket_of[param]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        # Pre-divide and sum: gloo has no AVG reduction.
        bucket.buffer.div_(self.size)
        bucket.handle = comm.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's all-reduce (launching any whose parameters got no gradient)."""
        if self.size == 1:
            return
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket)
            bucket.handle.wait()
            bucket.handle = None
            bucket.ready = 0

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds in parameters and gradients (every replica holds them all; no master copies)."""
        params = sum(p.numel() * p.element_size() for b in self.buckets for p in b.params)
        grads = sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)
        return {"parameters": params, "gradients": grads, "master_weights": 0}

    def zero_grad(self) -> None:
        """Zero the gradient buffers in place (the `.grad` views must survive between steps)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.ready = 0
