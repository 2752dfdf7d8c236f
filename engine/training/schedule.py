"""One optimizer step's forward and backward passes over its micro-batches, in a pipeline schedule's order.

A schedule is only an order: each rank's list of actions, "forward (or backward) micro-batch i through my model
chunk c". One executor runs any such list, so a new schedule is a new order, not a new engine, and the bubble
benchmark reads the same lists. The schedules (m micro-batches, pp stages, rank r, v chunks per rank):

    none              F0 B0 F1 B1 ...: no pipeline (pp = 1); the plain gradient-accumulation loop.
    gpipe             every forward, then every backward: m micro-batches' activations held on each stage.
    1f1b              pp - r - 1 warm-up forwards, then one forward and one backward in turn, then the remaining
                      backwards: at most pp micro-batches in flight on stage 0, whatever m is.
    interleaved_1f1b  Megatron's virtual-pipeline schedule: micro-batches go through the chunks in groups of pp
                      (m must be a multiple of pp), with (pp - r - 1) * 2 + (v - 1) * pp warm-up forwards (all of
                      them when m = pp). Its bubble is (pp - 1) / v of 1f1b's, for up to v times the messages.

Before each action the executor exchanges, in one batch, the messages the previous action produced and the ones
this action needs (engine.parallel.pipeline.PipelineExchange): Megatron's send-forward-receive-backward pairing
falls out of it in the steady state. Each chunk's data-parallel gradient reduction is armed only for that
chunk's last backward, so it runs once per step and overlaps the backward passes still to come.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import PIPELINE_SCHEDULES
from engine.parallel.data_parallel import GradientAllReduce
from engine.parallel.pipeline import Message, PipelineExchange

SCHEDULES = ("none", *PIPELINE_SCHEDULES)


@dataclass(frozen=True)
class Action:
    """Forward ('F') or backward ('B') of micro-batch `micro` through this rank's model chunk `chunk`."""

    kind: str
    micro: int
    chunk: int = 0


def schedule_steps(schedule: str, micro_batches: int, pp: int, pp_rank: int,
                   virtual: int = 1) -> list[tuple[Action, ...]]:
    """Pipeline rank `pp_rank`'s actions for one step of `schedule`, grouped into the steps run between two
    message exchanges (one action each, except the interleaved schedule's steady forward/backward pairs)."""
    m = micro_batches
    if schedule == "none" or pp == 1:
        if pp != 1 or virtual != 1:
            raise ValueError(f"pp={pp} with {virtual} model chunks per rank needs a pipeline schedule")
        return [(a,) for i in range(m) for a in (Action("F", i), Action("B", i))]
    if schedule != "interleaved_1f1b" and virtual != 1:
        raise ValueError(f"{virtual} model chunks per rank need the interleaved_1f1b schedule, not {schedule}")
    if schedule == "gpipe":
        return [(Action("F", i),) for i in range(m)] + [(Action("B", i),) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(pp - pp_rank - 1, m)
        return _one_forward_one_backward([Action("F", i) for i in range(m)], [Action("B", i) for i in range(m)],
                                         warmup, paired=False)
    if schedule == "interleaved_1f1b":
        if m % pp:
            raise ValueError(f"interleaved_1f1b runs micro-batches in groups of pp={pp}: {m} is not a multiple")
        total = m * virtual

        def virtual_action(kind: str, k: int) -> Action:
            group, within = divmod(k, pp * virtual)
            chunk = within // pp
            return Action(kind, group * pp + within % pp, chunk if kind == "F" else virtual - 1 - chunk)

        warmup = total if m == pp else min((pp - pp_rank - 1) * 2 + (virtual - 1) * pp, total)
        # Megatron's pairing: a steady forward and backward run back to back, and one exchange sends both results
        # and receives both next inputs. One exchange per action instead deadlocks under NCCL's rendezvous.
        return _one_forward_one_backward([virtual_action("F", k) for k in range(total)],
                                         [virtual_action("B", k) for k in range(total)], warmup, paired=True)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


@functools.lru_cache(maxsize=1024)  # the planner's search asks for the same lists thousands of times
def schedule_actions(schedule: str, micro_batches: int, pp: int, pp_rank: int, virtual: int = 1) -> tuple[Action, ...]:
    """Pipeline rank `pp_rank`'s actions for one step of `schedule`, in order."""
    return tuple(a for step in schedule_steps(schedule, micro_batches, pp, pp_rank, virtual) for a in step)


def _one_forward_one_backward(forwards: list[Action], backwards: list[Action], warmup: int,
                              paired: bool) -> list[tuple[Action, ...]]:
    """`warmup` forwards, then forward/backward pairs (one step each when `paired`), then the backwards left."""
    steady = len(forwards) - warmup
    out = [(a,) for a in forwards[:warmup]]
    for i in range(steady):
        pair = (forwards[warmup + i], backwards[i])
        out += [pair] if paired else [(a,) for a in pair]
    return out + [(a,) for a in backwards[steady:]]


def forward_only(steps: Sequence[tuple[Action, ...]]) -> list[tuple[Action, ...]]:
    """The forwards of a schedule, in its order, one per step (evaluation)."""
    return [(a,) for step in steps for a in step if a.kind == "F"]


def action_messages(action: Action, stage: int, stages: int) -> tuple[Message | None, Message | None]:
    """(the message `action`, run on stage `stage` of `stages`, needs before it runs, the message it produces), None
    where there is none."""
    if action.kind == "F":
        need = Message("act", action.micro, stage - 1) if stage > 0 else None
        made = Message("act", action.micro, stage) if stage < stages - 1 else None
    else:
        need = Message("grad", action.micro, stage + 1) if stage < stages - 1 else None
        made = Message("grad", action.micro, stage) if stage > 0 else None
    return need, made


def communication_plan(steps: Sequence[tuple[Action, ...]], stage_of: Sequence[int],
                       stages: int) -> list[tuple[list[Message], list[Message], tuple[Action, ...]]]:
    """(messages to send, messages to receive, then the actions to run) for each step, plus a last entry that sends
    what the last step produced (with no actions): the batches the executor posts, in order. `stage_of[c]` is
    model chunk c's stage (engine.parallel.pipeline.rank_stages)."""
    plan, pending = [], []
    for step in steps:
        needs, made = [], []
        for action in step:
            need, out = action_messages(action, stage_of[action.chunk], stages)
            needs += [need] if need else []
            made += [out] if out else []
        plan.append((pending, needs, step))
        pending = made
    plan.append((pending, [], ()))
    return plan


@dataclass
class StepStats:
    """What one schedule run saw on this rank: the most (micro-batch, chunk) activations it held at once, and, when
    `timeline` is a list, each action's (kind, micro, chunk, start, end) in time.perf_counter seconds."""

    max_in_flight: int = 0
    timeline: list | None = None


def forward_backward(
    chunks: Sequence[nn.Module],
    steps: Sequence[tuple[Action, ...]],
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    grad_syncs: Sequence[GradientAllReduce] | None,
    autocast: Callable[[], AbstractContextManager],
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    exchange: PipelineExchange | None = None,
    stage_of: Sequence[int] = (0,),
    stages: int = 1,
    dropout_keys: Sequence[int] | None = None,
    stats: StepStats | None = None,
) -> torch.Tensor:
    """Run a schedule's `steps` (or only its forwards, for evaluation) over this rank's model `chunks`.

    `stage_of[c]` is chunk c's stage of `stages`; the first stage reads the micro-batches' inputs, the last their
    targets. Returns the sum of the last stage's micro-batch mean losses (float64; zero on other stages). Without
    `grad_syncs` nothing is differentiated (evaluation, under no_grad).
    """
    m = len(micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=micro_batches[0][0].device)
    training = grad_syncs is not None
    flat = [a for step in steps for a in step]
    last_backward = {a.chunk: a for a in flat if a.kind == "B"}  # each chunk's reduction runs in its last one
    held: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}  # (micro, chunk) -> (input, output)
    stats = stats if stats is not None else StepStats()
    produced: dict[Message, torch.Tensor] = {}
    received: dict[Message, torch.Tensor] = {}
    for sends, recvs, step in communication_plan(steps, stage_of, stages):
        if exchange is not None:
            received.update(exchange.exchange([(msg, produced.pop(msg)) for msg in sends], recvs))
        for action in step:
            started = time.perf_counter()
            chunk, stage = chunks[action.chunk], stage_of[action.chunk]
            key = (action.micro, action.chunk)
            inputs, targets = micro_batches[action.micro]
            if action.kind == "F":
                x = inputs if stage == 0 else received.pop(Message("act", action.micro, stage - 1))
                if stage > 0 and training:
                    x.requires_grad_()
                with autocast():
                    out = chunk(x, targets if stage == stages - 1 else None,
                                dropout_key=dropout_keys[action.micro] if dropout_keys is not None else None)
                if stage == stages - 1:
                    total += out.detach().to(torch.float64)
                else:
                    produced[Message("act", action.micro, stage)] = out.detach()
                if training:
                    held[key] = (x if stage > 0 else None, out)
                    stats.max_in_flight = max(stats.max_in_flight, len(held))
                _record(stats, action, started)
                continue
            x, out = held.pop(key)
            with nullcontext() if action == last_backward[action.chunk] else grad_syncs[action.chunk].no_sync():
                if stage == stages - 1:
                    # Each micro-batch's mean loss counts 1/m towards the global-batch mean.
                    scale_loss(out / m).backward()
                else:
                    torch.autograd.backward(out, grad_tensors=received.pop(Message("grad", action.micro, stage + 1)))
            if stage > 0:
                produced[Message("grad", action.micro, stage)] = x.grad
            _record(stats, action, started)
    return total


def _record(stats: StepStats, action: Action, started: float) -> None:
    if stats.timeline is not None:
        stats.timeline.append((action.kind, action.micro, action.chunk, started, time.perf_counter()))
