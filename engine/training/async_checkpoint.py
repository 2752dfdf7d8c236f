"""Asynchronous checkpoints (`train.async_save=true`): training goes on while a background thread writes.

The step only pays for the host copy (`snapshot_checkpoint`: pinned memory from a GPU, a clone on the CPU); the
thread then writes, fsyncs, hashes and publishes it exactly as a synchronous save does (`write_checkpoint`). Its
coordination - the barrier, the gather of file records, the broadcast of rank 0's outcome - runs on a gloo group of
its own (`ParallelState.checkpoint_group`), so it never interleaves with training's collectives.

At most one save is in flight: the next save, and the end of the run, wait for it. While one is in flight, every
step boundary asks all ranks in one small all-reduce whether their write failed or is still going, so a failure
stops every rank at the same step, loudly, and a save counts as done only once it is done everywhere.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.distributed as dist

from engine.parallel import comm
from engine.parallel.state import ParallelState
from engine.training.checkpoint import Retention, Snapshot, write_checkpoint
from engine.training.reshard import CheckpointError


class AsyncSaver:
    """One background checkpoint write at a time, for one rank of the run."""

    def __init__(self, run_dir: Path, state: ParallelState, retention: Retention):
        self.run_dir, self.state, self.retention = run_dir, state, retention
        self._thread: threading.Thread | None = None
        self._step: int | None = None  # the step being written
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> int | None:
        """The step whose save has not yet finished on every rank, or None."""
        return self._step

    def save(self, snapshot: Snapshot) -> None:
        """Start writing `snapshot` in the background, after the previous save (if any) is done."""
        self.wait()
        self._step, self._error = snapshot.step, None
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name=f"weft-save-{snapshot.step}",
                                        daemon=True)  # a crash of the run does not wait for it: the save is lost
        self._thread.start()

    def _write(self, snapshot: Snapshot) -> None:
        try:
            write_checkpoint(self.run_dir, snapshot, self.state, self.retention,
                             group=self.state.checkpoint_group)
        except BaseException as e:  # noqa: BLE001 - reported on the main thread at the next step boundary
            self._error = e

    def poll(self) -> None:
        """At a step boundary (every rank): raise if the save in flight failed on any rank; forget it once it is
        done on every rank."""
        if self._step is None:
            return
        failed, running = self._error is not None, self._thread.is_alive()
        if self.state.world_size > 1:
            flags = torch.tensor([failed, running], dtype=torch.int32, device=self.state.device)
            comm.all_reduce(flags, op=dist.ReduceOp.MAX)
            failed, running = (bool(x) for x in flags.tolist())
        if failed:
            self._raise()
        if not running:
            self._thread.join()
            self._step = self._thread = None

    def wait(self) -> None:
        """Block until the save in flight is written everywhere (every rank); raise if it failed."""
        if self._step is None:
            return
        self._thread.join()
        failed = torch.tensor([self._error is not None], dtype=torch.int32, device=self.state.device)
        if self.state.world_size > 1:
            comm.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            self._raise()
        self._step = self._thread = None

    def _raise(self) -> None:
        step, error = self._step, self._error
        self._step = self._thread = None
        where = f": {type(error).__name__}: {error}" if error is not None else " on another rank"
        raise CheckpointError(f"the asynchronous save of step {step} failed{where}; the previous checkpoint is "
                              "intact, and the run stops here")
