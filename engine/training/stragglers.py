"""Stragglers: the rank whose steps take longest, named when it is far behind the median.

Collectives make every rank's step take as long as the slowest one's, so wall-clock step time cannot tell them
apart. What differs is the compute: a step's time less the time this rank spent waiting inside collectives (the
collective record, `engine.parallel.comm.LOG`). Every `train.log_interval` steps each rank's mean compute time per
step is gathered (one all-gather of a number); a rank above `train.straggler_ratio` times the median of the
others (and at least MIN_GAP_S slower) is named in the log and in metrics.jsonl. On CUDA the host measures kernel
launches and waits, not kernels: a rank that waits for its own slow GPU shows, one whose collectives wait on the
GPU (NCCL) may not.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from engine.parallel import comm
from engine.parallel.state import ParallelState

MIN_GAP_S = 0.05  # a straggler is also at least this much slower per step than the median


class StragglerWatch:
    """Times this rank's compute per step; `read()` compares every rank's at a logging step."""

    def __init__(self, state: ParallelState, ratio: float):
        self.state, self.ratio = state, ratio
        self.enabled = ratio > 0 and state.world_size > 1
        self._busy, self._steps = 0.0, 0
        self._t0 = self._blocked0 = 0.0

    def start(self) -> None:
        """A step begins."""
        self._t0, self._blocked0 = time.perf_counter(), comm.LOG.blocked_s

    def stop(self) -> None:
        """The step ends: add its compute time (wall time less time blocked in collectives)."""
        wall = time.perf_counter() - self._t0
        self._busy += max(0.0, wall - (comm.LOG.blocked_s - self._blocked0))
        self._steps += 1

    def read(self) -> dict:
        """Every rank's mean compute time per step since the last read, compared (a collective: every rank calls it
        at the same step); {} when off. Warns, on the logging rank, about a straggler."""
        if not self.enabled or not self._steps:
            return {}
        mine = torch.tensor([self._busy / self._steps], dtype=torch.float64, device=self.state.device)
        every = torch.empty(self.state.world_size, dtype=torch.float64, device=self.state.device)
        comm.all_gather_flat(every, mine)
        self._busy, self._steps = 0.0, 0
        times = every.tolist()
        slowest = max(range(len(times)), key=times.__getitem__)
        median = statistics.median(t for r, t in enumerate(times) if r != slowest)  # of the others
        ratio = times[slowest] / median if median > 0 else 1.0
        # Milliseconds of noise are not a straggler, whatever the ratio (a tiny CPU model's steps).
        straggler = ratio > self.ratio and times[slowest] - median > MIN_GAP_S
        if straggler and self.state.is_logging_rank:
            c = self.state.coords(slowest)
            print(f"warning: straggler: rank {slowest} (pp {c.pp}, dp {c.dp}, tp {c.tp}) computes {times[slowest]:.3f} "
                  f"s per step, {ratio:.1f}x the median {median:.3f} s (train.straggler_ratio={self.ratio})",
                  file=sys.stderr)
        return {"compute_s_median": median, "compute_s_max": times[slowest], "slowest_rank": slowest,
                "straggler_ratio": ratio, "straggler_rank": slowest if straggler else None}
