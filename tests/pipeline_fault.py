"""A torchrun entry point for tests/test_pipeline_failure.py: `engine.train` with one rank failing mid-schedule.

WEFT_TEST_FAIL_RANK's last model chunk raises in its second forward of optimizer step WEFT_TEST_FAIL_STEP, as an
out-of-memory would: its neighbours are then inside the same pipeline schedule, waiting on it. The time of the
failure goes to WEFT_TEST_FAIL_FILE.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import engine.train
import engine.training.trainer as trainer_module

FAIL_RANK, FAIL_STEP = int(os.environ["WEFT_TEST_FAIL_RANK"]), int(os.environ["WEFT_TEST_FAIL_STEP"])
schedule = trainer_module.forward_backward
training_calls = 0


class Failing:
    """A chunk whose second call raises."""

    def __init__(self, chunk):
        self.chunk, self.calls = chunk, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            Path(os.environ["WEFT_TEST_FAIL_FILE"]).write_text(str(time.time()))
            raise RuntimeError("out of memory (injected by the test)")
        return self.chunk(*args, **kwargs)


def forward_backward(chunks, steps, micro_batches, grad_syncs, *args, **kwargs):
    """The real schedule, with the last chunk failing at the chosen step on the chosen rank."""
    global training_calls
    if grad_syncs is not None:
        training_calls += 1
        if training_calls == FAIL_STEP and int(os.environ["RANK"]) == FAIL_RANK:
            chunks = [*chunks[:-1], Failing(chunks[-1])]
    return schedule(chunks, steps, micro_batches, grad_syncs, *args, **kwargs)


trainer_module.forward_backward = forward_backward
if __name__ == "__main__":
    engine.train.main()
