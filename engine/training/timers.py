"""Where a training step's time goes: wall-clock phases (data, forward-backward, ...) summed between two log rows.

A phase is a `with timer.phase(name):` block around real work. Phases do not overlap: one opened inside another is
carved out of it (the pipeline's waits for its neighbours out of forward-backward). A row reads, per step, the
mean time in each phase since the previous row, the mean step time, and what no phase covered as `other`, so the
phases add up to the step time by construction.

On CPU a phase is timed with time.perf_counter. On CUDA it is timed with CUDA events recorded on the current
stream, so a phase is the GPU timeline between its two marks: forward-backward is the kernels' time, `data` is the
time the GPU waited for the host's batch (zero when loading hid behind the previous step's kernels), a wait for a
collective is the time the stream stood still for it. Nothing is synchronised per phase or per micro-batch; a
row's read waits for its last event only, where the row's other values (the loss, memory) synchronise anyway.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

# The phases of a step, in order; each is logged as `<phase>_s` (seconds per step), with `other_s` the rest.
PHASES = ("data", "forward_backward", "dp_comm", "pipeline_bubble", "optimizer", "eval", "checkpoint")


class PhaseTimer:
    """Sums each phase's time over the steps between two `read()`s (`count_step()` once per step)."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._device = device
        self._open: list[str] = []  # phases entered and not yet left, innermost last
        self._spans: list[tuple[str, str | None, object, object]] = []  # (phase, enclosing phase, start, end)
        self.restart()

    def restart(self) -> None:
        """Start a new window now, forgetting everything timed so far."""
        self._spans.clear()
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._steps = 0
        self._start = self._mark()

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self._cuda else end - start

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (one of PHASES), carved out of the phase it is nested in."""
        if name not in self._totals:
            raise ValueError(f"unknown phase {name!r}; expected one of {', '.join(PHASES)}")
        outer = self._open[-1] if self._open else None
        self._open.append(name)
        start = self._mark()
        try:
            yield
        finally:
            self._spans.append((name, outer, start, self._mark()))
            self._open.pop()
            self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        """Add finished spans into the totals (on CUDA, those whose end event has completed, unless `wait`)."""
        done = 0
        for name, outer, start, end in self._spans:
            if self._cuda and not wait and not end.query():
                break  # events complete in stream order: the later ones are still pending too
            seconds = self._seconds(start, end)
            self._totals[name] += seconds
            if outer is not None:
                self._totals[outer] -= seconds
            done += 1
        del self._spans[:done]

    def count_step(self) -> None:
        """One more training step in the current window."""
        self._steps += 1

    def read(self) -> dict[str, float]:
        """`step_time_s` and each `<phase>_s`, `other_s`: seconds per step since the last read; starts a new window."""
        end = self._mark()
        if self._cuda:
            end.synchronize()
        self._fold(wait=True)
        steps = max(self._steps, 1)
        wall = self._seconds(self._start, end)
        out = {"step_time_s": wall / steps, **{f"{name}_s": total / steps for name, total in self._totals.items()},
               "other_s": (wall - sum(self._totals.values())) / steps}
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._steps, self._start = 0, end
        return out


class TimedExchange:
    """A pipeline exchange (engine.parallel.pipeline.PipelineExchange) whose every call is the `pipeline_bubble`
    phase: the schedule's executor does nothing else while it waits on its neighbours' sends and receives."""

    def __init__(self, exchange, timer: PhaseTimer):
        self._exchange, self._timer = exchange, timer

    def exchange(self, sends: Sequence, recvs: Sequence) -> dict:
        """The wrapped exchange's `exchange`, timed."""
        with self._timer.phase("pipeline_bubble"):
            return self._exchange.exchange(sends, recvs)
