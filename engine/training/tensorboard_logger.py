"""TensorBoard logging for the logging rank (`logging.tensorboard=true`): every metrics record as scalars.

The scalars are the W&B ones (engine.training.metrics: `train/loss`, `perf/step_time_s`, ...), at the record's
`step`, written with torch's SummaryWriter into `train.run_dir/tensorboard/`; `tensorboard --logdir` on it (or
on a directory of runs) shows them, grouped by prefix.

A resumed run appends a new event file to the same directory. Its first event purges, in TensorBoard's reading,
every event of an earlier file at a step after the checkpoint (SummaryWriter's `purge_step`): those steps were
logged before a crash and are logged again, so each step shows once. A fresh run (step 0) purges every earlier
event in the directory, as it moves an older metrics.jsonl aside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.training.metrics import scalars


class TensorBoardRun:
    """The run's TensorBoard event files: `log` each metrics record, then `close`."""

    def __init__(self, run_dir: str | os.PathLike, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("logging.tensorboard=true but the `tensorboard` package is not installed: "
                               "`pip install tensorboard`, or set logging.tensorboard=false") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        # Steps from start_step + 1 on are this run's to log (0 purges everything: a fresh run).
        self._writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else 0)
        self._last_step: dict[str, int] = {}  # tag -> the step of its last point

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one metrics record's values as scalars at its step, one point per tag and step (an evaluation row
        repeats its step's `train/tokens_seen` and `train/consumed_samples`, which W&B's tokens axis needs)."""
        step = record["step"]
        for key, value in scalars(record).items():
            if self._last_step.get(key) != step:
                self._writer.add_scalar(key, value, step)
                self._last_step[key] = step

    def close(self) -> None:
        """Flush the events to disk and close the file."""
        self._writer.close()
