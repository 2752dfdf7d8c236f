"""Pipeline parallelism's layout and wiring: which layers each stage holds, and how neighbouring stages exchange
activations and their gradients. The order of work (schedules) is engine/training/schedule.py.

Stages. The model's layers are cut into pp x v consecutive stages (v = virtual stages, model chunks per rank):
evenly by default, or by an explicit list of counts. Stage s lives on pipeline rank s mod pp as its chunk s // pp,
so with v > 1 each rank holds v slices spread along the model (Megatron's interleaved layout) and activations
wrap from the last rank back to the first between chunks. Stage 0 also holds the embedding, the last stage the
final norm, the head and the loss.

Exchange. Every message between stages is one tensor of a shape known in advance from the config: (micro batch,
sequence, hidden), the sequence divided by tp under sequence parallelism. Both sides allocate it, so nothing is
pickled or negotiated on the hot path. Point-to-point messages between two ranks are matched in the order they
are posted (NCCL ignores tags, and we use none on gloo either, so both backends behave alike): a schedule must
send on each (sender, receiver) pair in the order the receiver receives, activations and gradients together
(they share a pair when pp = 2). tests/test_pipeline_schedule.py checks that of every schedule. One exchange posts
its sends and receives together with `batch_isend_irecv` and waits for all of them: on NCCL the ops of one batch
run as one group, so a rank sending to a neighbour that is sending back cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.parallel import comm
from engine.parallel.state import ParallelState


def stage_layers(num_layers: int, stages: int, counts: Sequence[int] | None = None) -> list[range]:
    """The layer range of each of `stages` stages: `counts` layers each, or an even split."""
    if counts is None:
        if num_layers % stages:
            raise ValueError(f"{num_layers} layers do not split evenly into {stages} stages; give explicit counts")
        counts = [num_layers // stages] * stages
    if len(counts) != stages or any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(f"stage layer counts {list(counts)} must be {stages} positive numbers summing to "
                         f"{num_layers}")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def rank_stages(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stages pipeline rank `pp_rank` holds, one per model chunk, in chunk order."""
    return [chunk * pp + pp_rank for chunk in range(virtual)]


def pipeline_place(pp_rank: int, pp: int, virtual: int) -> str:
    """Where a pipeline rank sits, for messages: `pipeline stage 1`, or `pipeline rank 1: stages 1, 3`."""
    if virtual == 1:
        return f"pipeline stage {pp_rank}"
    return f"pipeline rank {pp_rank}: stages {', '.join(map(str, rank_stages(pp_rank, pp, virtual)))}"


class PipelinePeerError(RuntimeError):
    """A pipeline neighbour went away (its process failed) or fell silent for parallel.timeout_s."""


@dataclass(frozen=True)
class Message:
    """One tensor between neighbouring stages: the activation `stage` sends forward (kind 'act') or the gradient it
    sends back (kind 'grad'), for micro-batch `micro`."""

    kind: str
    micro: int
    stage: int

    def destination(self) -> int:
        """The stage that receives it."""
        return self.stage + 1 if self.kind == "act" else self.stage - 1


class PipelineExchange:
    """Fixed-shape sends and receives between this rank's stages and their neighbours, over the pipeline group."""

    def __init__(self, state: ParallelState, shape: tuple[int, ...], dtype: torch.dtype):
        self.state, self.shape, self.dtype = state, tuple(shape), dtype

    def _peer(self, stage: int) -> int:
        return self.state.pp_peer(stage)  # stage s lives on pipeline rank s mod pp

    def exchange(self, sends: Sequence[tuple[Message, torch.Tensor]], recvs: Sequence[Message]) -> dict:
        """Send each (message, tensor), receive each message; returns {message: received tensor}."""
        if not sends and not recvs:
            return {}
        ops, received = [], {}
        for message, tensor in sends:
            if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
                raise RuntimeError(f"pipeline stage {message.stage} produced a {tuple(tensor.shape)} {tensor.dtype} "
                                   f"{message.kind}, but stages exchange {self.shape} {self.dtype} tensors (from "
                                   "train.micro_batch_size, train.seq_len, model.hidden_size)")
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), self._peer(message.destination()),
                                  self.state.pp_group))
        for message in recvs:
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.state.device)
            received[message] = buffer
            ops.append(dist.P2POp(dist.irecv, buffer, self._peer(message.stage), self.state.pp_group))
        try:
            comm.batch_isend_irecv(ops).wait()
        except RuntimeError as e:  # a neighbour died (connection closed) or went silent (parallel.timeout_s)
            peers = sorted({op.peer for op in ops})
            raise PipelinePeerError(f"the pipeline exchange with rank(s) {peers} failed: that neighbour failed or "
                                    f"hangs (see its own error; silence is bounded by parallel.timeout_s): {e}") from e
        return received


def exchange_shape(micro_batch: int, seq_len: int, hidden: int, tp: int, sequence_parallel: bool) -> tuple[int, ...]:
    """The activation shape between stages: (micro batch, sequence or this rank's chunk of it under SP, hidden)."""
    return (micro_batch, seq_len // tp if sequence_parallel and tp > 1 else seq_len, hidden)

