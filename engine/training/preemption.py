"""Stopping on a signal: every rank checkpoints after the same step and exits, so a preempted job resumes.

Slurm sends SIGTERM when it preempts a job (with the partition's GraceTime) and, with `#SBATCH --signal=USR1@300`,
SIGUSR1 that many seconds before the time limit; `kill` and container runtimes send SIGTERM too. Here a signal only
raises a flag. After each step every rank learns whether any rank got one, by a MAX all-reduce of one number (the
signal may reach the ranks during different steps, or reach only some of them), and then all save and stop
together: the run exits with EXIT_STOPPED, which `slurm/pretrain.sbatch` turns into a requeue, and rerunning the
same command resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import NoReturn

import torch
import torch.distributed as dist

from engine.launch import record_exit
from engine.parallel import comm

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped before the end, checkpoint saved, run it again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A repeat this soon is the same request delivered twice (`scancel` signals every process of the step, and the
# launcher passes its own copy on), not a second one.
REPEAT_WINDOW_S = 5.0


class StopSignals:
    """While inside, SIGTERM and SIGUSR1 request a stop instead of killing the process (main thread only); a second
    one before the stop (REPEAT_WINDOW_S after the first or later) kills it the default way, for a run that hangs
    (or a user who means it)."""

    def __init__(self):
        self.received = 0  # the signal number, 0 for none
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: installed from C
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received and time.monotonic() - self._received_at < REPEAT_WINDOW_S:
            return
        if self.received:
            print(f"{signal.Signals(signum).name} again: stopping now, without a checkpoint", file=sys.stderr)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received, self._received_at = signum, time.monotonic()

    def requested(self, device: torch.device, distributed: bool) -> str | None:
        """The name of a stop signal that any rank received, or None; with `distributed`, a collective that every
        rank must call at the same point (a one-number all-reduce on `device`)."""
        received = self.received
        if distributed:
            flag = torch.tensor([received], dtype=torch.int32, device=device)
            comm.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        return signal.Signals(received).name if received else None


def exit_together(code: int, distributed: bool) -> NoReturn:
    """End the process with `code` (EXIT_STOPPED, or numerics' EXIT_DIVERGED) once every rank is here (the
    checkpoint is saved and durable).

    The ranks leave together and at once: under `srun --kill-on-bad-exit` the first exit 75 has Slurm terminate the
    others, and a rank still tearing down (interpreter, process groups) when its KillWait ends would be killed, turning
    the job's exit code from 75 into 137 (no requeue). Nothing is left to tear down that the OS does not reclaim.
    """
    for sig in STOP_SIGNALS:  # from here a signal (srun ending the ranks after the first exit) changes nothing
        signal.signal(sig, signal.SIG_IGN)
    if distributed:
        comm.barrier()
    record_exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
