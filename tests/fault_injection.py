"""A torchrun entry point for the fault tests: `engine.train` with one fault injected, chosen by environment.

    WEFT_TEST_FAIL_RANK, WEFT_TEST_FAIL_STEP   that rank's last model chunk raises in its second forward of that
                                               optimizer step, as an out-of-memory would (its pipeline neighbours
                                               are then inside the same schedule, waiting on it)
    WEFT_TEST_KILL=A:R:S[,A:R:S...]            in attempt A (0: the first, 1: the first torchrun restart or Slurm
                                               requeue, ...) rank R SIGKILLs itself as step S starts
    WEFT_TEST_HANG_RANK, WEFT_TEST_HANG_STEP   that rank enters an all-reduce of that step and sleeps there
    WEFT_TEST_SLOW_SAVE_STEP                   every rank's file writes of that step's checkpoint take seconds,
                                               after WEFT_TEST_FILE says the save began (the test kills it then)

The time of the fault goes to WEFT_TEST_FILE. Each process appends "<restart count> <rank> <time>" to
WEFT_TEST_STARTS when it starts, so a test can see when the restarted attempt began.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0")))
if "WEFT_TEST_STARTS" in os.environ:  # before importing torch: when the process began, not when it was ready
    with open(os.environ["WEFT_TEST_STARTS"], "a") as f:
        f.write(f"{ATTEMPT} {RANK} {time.time()}\n")

import engine.parallel.comm as comm  # noqa: E402
import engine.train  # noqa: E402
import engine.training.checkpoint as checkpoint  # noqa: E402
import engine.training.trainer as trainer_module  # noqa: E402

KILLS = {tuple(int(x) for x in kill.split(":")) for kill in os.environ.get("WEFT_TEST_KILL", "").split(",") if kill}


def env_int(name: str) -> int | None:
    """An integer from the environment, or None."""
    return int(os.environ[name]) if name in os.environ else None


def mark() -> None:
    """Record when the fault happened."""
    Path(os.environ["WEFT_TEST_FILE"]).write_text(str(time.time()))


schedule = trainer_module.forward_backward
training_calls = 0


class Failing:
    """A chunk whose second call raises."""

    def __init__(self, chunk):
        self.chunk, self.calls = chunk, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            mark()
            raise RuntimeError("out of memory (injected by the test)")
        return self.chunk(*args, **kwargs)


def forward_backward(chunks, steps, micro_batches, grad_syncs, *args, **kwargs):
    """The real schedule, with the chosen fault at the chosen step on the chosen rank."""
    global training_calls
    if grad_syncs is not None:
        training_calls += 1
        step = comm.LOG.step
        if training_calls == env_int("WEFT_TEST_FAIL_STEP") and env_int("WEFT_TEST_FAIL_RANK") == RANK:
            chunks = [*chunks[:-1], Failing(chunks[-1])]
        if (ATTEMPT, RANK, step) in KILLS:
            mark()
            os.kill(os.getpid(), signal.SIGKILL)
    return schedule(chunks, steps, micro_batches, grad_syncs, *args, **kwargs)


trainer_module.forward_backward = forward_backward

all_reduce = comm.all_reduce


def hanging_all_reduce(tensor, *args, **kwargs):
    """The chosen rank's first all-reduce of the chosen step is recorded as begun, then never returns."""
    if comm.LOG.step == env_int("WEFT_TEST_HANG_STEP") and env_int("WEFT_TEST_HANG_RANK") == RANK:
        comm.LOG.begin("all_reduce", kwargs.get("group"), tensor)
        mark()
        time.sleep(3600)
    return all_reduce(tensor, *args, **kwargs)


comm.all_reduce = hanging_all_reduce

file_record = checkpoint.file_record


def slow_file_record(path):
    """The chosen step's files take 3 s each to become durable (a slow file system), so a kill lands mid-save."""
    if path.parent.name == f".tmp-step_{env_int('WEFT_TEST_SLOW_SAVE_STEP') or -1:08d}":
        mark()
        time.sleep(3)
    return file_record(path)


checkpoint.file_record = slow_file_record

if __name__ == "__main__":
    engine.train.main()
