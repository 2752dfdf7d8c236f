"""ZeRO data parallelism (Rajbhandari et al., 2020): model states sharded over the data-parallel group.

A model chunk's parameters are laid out in flat buffers ("buckets"), each padded to a multiple of the DP size so
that any parameter count splits into equal shards; DP rank r owns elements [r * S, (r + 1) * S) of every bucket.

    stage 1   full parameters and gradients on every rank; fp32 master weights and AdamW moments only for the
              shard. The last micro-batch's backward reduce-scatters each bucket as it fills; each rank updates its
              shard, and the buckets are all-gathered back into the full parameters.
    stage 2   as 1, but gradients exist whole only while a bucket fills: every micro-batch reduce-scatters them and
              adds its shard into the gradient shard, so micro-batches before the last communicate too.
    stage 3   as 2, and the parameters are sharded too: a part of the model (the embedding, each layer, the final
              norm, the head) is all-gathered just before its forward, freed after it, and gathered again for its
              backward, the next part's gather already in flight.

Per micro-batch and Psi parameters, the wire carries a reduce-scatter of Psi (stages 1 and 2; stage 1 only on the
last micro-batch) and an all-gather of Psi per step; stage 3 gathers Psi in forward and again in backward instead.
Collectives are asynchronous and launched from gradient hooks (and, for stage 3, forward hooks), so they overlap
the computation still running; `overlap=False` waits for each at once, for debugging.

With a 16-bit compute dtype the model holds 16-bit parameters and gradients, and the shard keeps fp32 master
weights ("bf16 params, fp32 main params"); in fp32 the parameter shard is its own master. Gradients are reduced in
`reduce_dtype`. Partial tensor-parallel gradients and a tied embedding's pipeline copies are completed on the
shards afterwards (both are sums, so they commute with the reduce-scatter); a tied embedding is kept in a bucket of
its own, so its shards line up on the first and last stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel import comm
from engine.parallel.data_parallel import GradientSync


@dataclass
class ShardPiece:
    """The part of one parameter inside this rank's shard: elements [start, start + length) of the flattened
    parameter, at [offset, offset + length) of the shard."""

    param: nn.Parameter
    shape: torch.Size  # the parameter's (stage 3 leaves `param` itself empty between uses)
    start: int
    offset: int
    length: int


class Bucket:
    """A flat, padded buffer of some parameters and this DP rank's shard of it."""

    def __init__(self, params: list[nn.Parameter], stage: int, rank: int, world: int, compute_dtype: torch.dtype,
                 device: torch.device, offload: bool = False):
        self.params, self.world = params, world
        self.shapes = [p.shape for p in params]
        self.starts = [0]
        for p in params:
            self.starts.append(self.starts[-1] + p.numel())
        self.numel = self.starts[-1]
        self.shard_size = math.ceil(self.numel / world)
        self.lo = rank * self.shard_size
        self.pieces = []
        for p, a, b in zip(params, self.starts, self.starts[1:], strict=False):
            lo, hi = max(a, self.lo), min(b, self.lo + self.shard_size)
            if lo < hi:
                self.pieces.append(ShardPiece(p, p.shape, lo - a, lo - self.lo, hi - lo))
        source = torch.zeros(self.shard_size * world, dtype=params[0].dtype, device=device)
        with torch.no_grad():
            for p, a in zip(params, self.starts, strict=False):
                source[a : a + p.numel()].copy_(p.detach().reshape(-1))
        full = source.to(compute_dtype)  # the same tensor when the model already computes in that dtype
        self.full: torch.Tensor | None = full
        self.gathering: tuple[dist.Work, torch.Tensor] | None = None  # stage 3: an all-gather in flight
        shard = full[self.lo : self.lo + self.shard_size]
        self.param_shard = shard.clone() if stage == 3 else shard  # what this rank keeps of the parameters
        # The fp32 master weights: the parameter shard itself when the model computes in fp32, else a copy (in host
        # memory when offloaded, even on a CPU-only machine, so that the offload path is the one that runs).
        self.master = (self.param_shard if compute_dtype == torch.float32 and not offload else
                       source[self.lo : self.lo + self.shard_size].to("cpu" if offload else device, torch.float32,
                                                                      copy=True))
        self.grad_full = None  # stage 1: every parameter's .grad is a view into it
        if stage == 1:
            self.grad_full = torch.zeros_like(full)
            self.grad_shard = self.grad_full[self.lo : self.lo + self.shard_size]
        else:
            self.grad_shard = torch.zeros(self.shard_size, dtype=compute_dtype, device=device)
        self.ready = 0
        self.reduced = False  # stage 1: its reduce-scatter was launched this step
        self.pending: list[tuple[dist.Work, torch.Tensor, torch.Tensor]] = []  # (handle, output, input)
        self.users = 0  # stage 3: forwards running on the gathered parameters
        self.pinned = False  # stage 3: gathered for a backward that has not finished
        self.attach(full)
        if stage == 1:
            for p, a in zip(params, self.starts, strict=False):
                p.grad = self.grad_full[a : a + p.numel()].view_as(p)
        if stage == 3:
            self.release()

    def attach(self, full: torch.Tensor) -> None:
        """Point every parameter at its place in the full buffer `full`."""
        self.full = full
        for p, a, shape in zip(self.params, self.starts, self.shapes, strict=False):
            p.data = full[a : a + shape.numel()].view(shape)

    def release(self) -> None:
        """Stage 3: drop the full parameters (autograd may still hold views, freed with the graph)."""
        self.full = None
        empty = torch.empty(0, dtype=self.param_shard.dtype, device=self.param_shard.device)
        for p in self.params:
            p.data = empty

    def master_pieces(self) -> list[tuple[ShardPiece, torch.Tensor]]:
        """Each piece and its view of the master shard."""
        return [(piece, self.master[piece.offset : piece.offset + piece.length]) for piece in self.pieces]

    def grad_pieces(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """(gradient shard view, parameter) of each piece."""
        return [(self.grad_shard[pc.offset : pc.offset + pc.length], pc.param) for pc in self.pieces]


class ZeroDataParallel(GradientSync):
    """ZeRO stage 1, 2 or 3 over `group` for one model chunk: its buckets, hooks and collectives.

    The interface the schedule and trainer use is the data-parallel one (`no_sync`, `finish_grad_sync`,
    `zero_grad`), plus `grads()` (the gradient shards, for the norm and clipping) and `gather_params()` (after the
    optimizer updated the master shards). Under `no_sync` stage 1 accumulates whole gradients locally; stages 2
    and 3 keep no whole gradients, so they reduce every micro-batch regardless.
    """

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None, stage: int, bucket_size_mb: float = 25.0,
                 compute_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32,
                 overlap: bool = True, offload: bool = False, recomputed: bool = False):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage {stage}: expected 1, 2 or 3 (stage 0 is GradientAllReduce)")
        if group is None and dist.is_initialized():
            group = dist.group.WORLD
        self.group, self.stage, self.overlap = group, stage, overlap
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.reduce_dtype = reduce_dtype
        # Parts run under a non-reentrant checkpoint (model.recompute=full) save nothing of the parameters, and its
        # own saved-tensor hooks must stay the innermost; otherwise stage 3 installs its own (`_saving_hooks`).
        self.recomputed = recomputed
        self._saving: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        device = next(module.parameters()).device
        if self.world > 1:  # every replica starts from the first one's weights
            src = dist.get_global_rank(group, 0)
            for p in module.parameters():
                comm.broadcast(p.data, src=src, group=group)
        parts = model_parts(module)
        units = [list(dict.fromkeys(p for p in part.parameters() if p.requires_grad)) for part in parts]
        seen: set[int] = set()
        for unit in units:  # a tied weight belongs to the first part that holds it
            unit[:] = [p for p in unit if id(p) not in seen]
            seen.update(id(p) for p in unit)
        self.buckets: list[Bucket] = []
        make = lambda ps: Bucket(ps, stage, self.rank, self.world, compute_dtype, device, offload)  # noqa: E731
        if stage == 3:
            self.buckets = [make(u) for u in units if u]
        else:
            # Reverse order, roughly the order backward produces gradients; a tied embedding alone.
            limit, current, nbytes = max(1, int(bucket_size_mb * 2**20)), [], 0
            for p in reversed([p for u in units for p in u]):
                if getattr(p, "tied_embedding", None):
                    self.buckets.append(make([p]))
                    continue
                current.append(p)
                nbytes += p.numel() * torch.finfo(compute_dtype).bits // 8
                if nbytes >= limit:
                    self.buckets.append(make(current))
                    current, nbytes = [], 0
            if current:
                self.buckets.append(make(current))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        if stage == 3:
            self._hook_parts(parts)

    # ----------------------------------------------------------------------------------------------- gradients
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket = self.bucket_of[param]
        if self.stage == 1 and not self.sync:
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._reduce(bucket)

    def _reduce(self, bucket: Bucket) -> None:
        """Reduce-scatter the bucket's gradients (pre-divided: gloo has no AVG) towards its shard."""
        bucket.ready, bucket.reduced = 0, True
        if self.stage == 1:
            flat = bucket.grad_full
        else:  # gather this micro-batch's gradients into one flat input, then let autograd's copies go
            flat = torch.zeros(bucket.shard_size * self.world, dtype=self.reduce_dtype, device=bucket.grad_shard.device)
            for p, a in zip(bucket.params, bucket.starts, strict=False):
                if p.grad is not None:
                    flat[a : a + p.grad.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None
            if self.stage == 3:
                bucket.pinned = False
                if bucket.users == 0:
                    bucket.release()
        flat = flat.to(self.reduce_dtype)
        flat.div_(self.world)
        out = torch.empty(bucket.shard_size, dtype=self.reduce_dtype, device=flat.device)
        while bucket.pending:  # the previous micro-batch's reduction of this bucket lands first
            self._land(bucket)
        if self.world == 1:  # one rank: the shard is the whole bucket
            out.copy_(flat)
            return self._land_value(bucket, out)
        handle = comm.reduce_scatter_flat(out, flat, group=self.group, async_op=True)
        bucket.pending.append((handle, out, flat))
        if not self.overlap:
            self._land(bucket)

    def _land(self, bucket: Bucket) -> None:
        handle, out, _ = bucket.pending.pop(0)
        handle.wait()
        self._land_value(bucket, out)

    def _land_value(self, bucket: Bucket, out: torch.Tensor) -> None:
        if self.stage == 1:
            bucket.grad_shard.copy_(out)
        else:
            bucket.grad_shard.add_(out.to(bucket.grad_shard.dtype))

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (launching any whose parameters got no gradient)."""
        for bucket in self.buckets:
            if bucket.ready or (self.stage == 1 and not bucket.reduced):
                self._reduce(bucket)
            while bucket.pending:
                self._land(bucket)

    def grads(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """(gradient shard piece, its parameter) for every piece this rank owns."""
        return [pair for b in self.buckets for pair in b.grad_pieces()]

    def zero_grad(self) -> None:
        """Zero the gradient buffers in place."""
        for b in self.buckets:
            (b.grad_full if b.grad_full is not None else b.grad_shard).zero_()
            b.ready, b.reduced = 0, False

    # ----------------------------------------------------------------------------------------------- parameters
    def gather_params(self) -> None:
        """After the step: the shards' new values into the parameters (all-gathered for stages 1 and 2)."""
        handles = []
        for b in self.buckets:
            if b.master is not b.param_shard:
                b.param_shard.copy_(b.master)
            if self.stage < 3 and self.world > 1:
                handles.append(comm.all_gather_flat(b.full, b.param_shard.clone(), group=self.group,
                                                    async_op=True))
            elif self.stage == 3 and (b.full is not None or b.gathering is not None):
                # Never left gathered across a step (it would be last step's values); normally already freed.
                self._wait_gather(b)
                b.release()
            b.users, b.pinned = 0, False
        for h in handles:
            h.wait()

    def _gather(self, bucket: Bucket) -> None:
        """Stage 3: start all-gathering a bucket's parameters (no-op if gathered or in flight)."""
        if bucket.full is not None or bucket.gathering is not None:
            return
        if self.world == 1:  # the shard is the whole bucket
            bucket.attach(bucket.param_shard)
            return
        full = torch.empty(bucket.shard_size * self.world, dtype=bucket.param_shard.dtype,
                           device=bucket.param_shard.device)
        bucket.gathering = (comm.all_gather_flat(full, bucket.param_shard, group=self.group, async_op=True),
                            full)
        if not self.overlap:
            self._wait_gather(bucket)

    def _wait_gather(self, bucket: Bucket) -> None:
        if bucket.gathering is not None:
            handle, full = bucket.gathering
            handle.wait()
            bucket.attach(full)
            bucket.gathering = None

    def _hook_parts(self, parts: list[nn.Module]) -> None:
        """Stage 3: gather a part's buckets before its forward (and the next part's, ahead) and free them after;
        gather them again when the gradient of its output arrives (and the previous part's, ahead), and keep them
        until their own gradients are reduced. A part using a weight of another (a tied head) gathers that one."""
        buckets = [list(dict.fromkeys(self.bucket_of[p] for p in part.parameters() if p in self.bucket_of))
                   for part in parts]
        for i, part in enumerate(parts):
            after = buckets[i + 1] if i + 1 < len(parts) else []
            before = buckets[i - 1] if i > 0 else []
            part.register_forward_pre_hook(self._pre_forward(buckets[i], after))
            part.register_forward_hook(self._post_forward(buckets[i], before))

    def _saving_hooks(self, mine: list[Bucket]) -> torch.autograd.graph.saved_tensors_hooks:
        """While a part runs forward: what autograd saves of a gathered buffer (a linear layer saves its weight's
        transposed view) is kept as a handle into the bucket, not as a view that would hold the buffer until
        backward; backward rebuilds it from the buffer gathered again."""
        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            for b in mine:
                if b.full is not None and ptr == b.full.untyped_storage().data_ptr():
                    return b, t.size(), t.stride(), t.storage_offset()
            return t

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            b, size, stride, offset = saved
            self._gather(b)  # normally gathered already, by the gradient hook on the part's output
            self._wait_gather(b)
            b.pinned = True
            return b.full.as_strided(size, stride, offset)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _pre_forward(self, mine: list[Bucket], ahead: list[Bucket]) -> Callable:
        def hook(module, _args):
            # A pinned bucket means this forward is its backward's recomputation (model.recompute): the next part
            # is done already, and the backward holds the parameters. It is not counted as a user, since a
            # non-reentrant checkpoint may stop the recomputation early, before the forward hook would uncount it.
            recompute = any(b.pinned for b in mine)
            for b in mine + ([] if recompute else ahead):
                self._gather(b)
            for b in mine:
                self._wait_gather(b)
                b.users += 0 if recompute else 1
            if not (recompute or self.recomputed) and torch.is_grad_enabled():
                saving = self._saving_hooks(mine)
                saving.__enter__()
                self._saving[id(module)] = saving
        return hook

    def _post_forward(self, mine: list[Bucket], ahead: list[Bucket]) -> Callable:
        def on_output_grad(grad):
            for b in mine:
                b.pinned = True
            for b in mine + ahead:
                self._gather(b)
            for b in mine:
                self._wait_gather(b)
            return grad

        def hook(module, _args, output):
            saving = self._saving.pop(id(module), None)
            if saving is not None:
                saving.__exit__(None, None, None)
            if any(b.pinned for b in mine):  # a recomputation: the backward's gather, nothing to uncount
                return
            for b in mine:
                b.users -= 1
                if b.users == 0:
                    b.release()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(on_output_grad)
        return hook

    # ----------------------------------------------------------------------------------------------- accounting
    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds in parameters, gradients and master weights (measured from the tensors)."""
        params = grads = master = 0
        for b in self.buckets:
            gathered = b.full is not None and b.full is not b.param_shard
            held = [b.full] if self.stage < 3 else [b.param_shard] + ([b.full] if gathered else [])
            params += sum(t.numel() * t.element_size() for t in held)
            g = b.grad_full if b.grad_full is not None else b.grad_shard
            grads += g.numel() * g.element_size()
            if b.master is not b.param_shard:
                master += b.master.numel() * b.master.element_size()
        return {"parameters": params, "gradients": grads, "master_weights": master}


def model_parts(module: nn.Module) -> list[nn.Module]:
    """A model chunk's parts in forward order: each child module, a container's children in its place."""
    parts = []
    for child in module.children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            parts.extend(child.children())
        elif any(True for _ in child.parameters()):
            parts.append(child)
    return parts


class ZeroOptimizer:
    """AdamW (or any torch optimizer `make` builds) on the master shards of some ZeroDataParallel chunks, with the
    weight-decay groups of `groups` (torch param-group dicts over the model's parameters)."""

    def __init__(self, chunks: list[ZeroDataParallel], groups: list[dict],
                 make: Callable[[list[dict]], torch.optim.Optimizer]):
        self.chunks = chunks
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        piece_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in groups]
        self.masters: list[tuple[ShardPiece, torch.Tensor, Bucket]] = []  # (piece, its master view, bucket)
        for chunk in chunks:
            for b in chunk.buckets:
                for piece, view in b.master_pieces():
                    piece_groups[group_of[id(piece.param)]]["params"].append(view)
                    self.masters.append((piece, view, b))
        self.optimizer = make(piece_groups)
        self.name = type(self.optimizer).__name__  # what steps the shards (the log says; offload picks one)
        self._piece_of = {id(view): piece for piece, view, _ in self.masters}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the torch optimizer's state (engine.training.checkpoint builds it piece by piece)."""
        self.optimizer.load_state_dict(state_dict)
        if self.name == "DeepSpeedCPUAdam":  # its op takes the step count as a Python int, not a tensor
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = int(state["step"].item())

    def piece(self, view: torch.Tensor) -> ShardPiece:
        """The shard piece a master view (one of the optimizer's tensors) holds."""
        return self._piece_of[id(view)]

    @property
    def param_groups(self) -> list[dict]:
        """The torch optimizer's groups (the learning rate is set on them)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        """The torch optimizer's per-tensor state (AdamW moments of the master pieces)."""
        return self.optimizer.state

    def step(self) -> None:
        """Update the master shards from the gradient shards, then the parameters from the masters."""
        for piece, view, b in self.masters:
            g = b.grad_shard[piece.offset : piece.offset + piece.length]
            view.grad = g.to(view.device, view.dtype)  # a no-op unless 16-bit or offloaded
        self.optimizer.step()
        for _, view, _ in self.masters:
            view.grad = None
        for chunk in self.chunks:
            chunk.gather_params()
