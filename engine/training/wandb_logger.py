"""Weights & Biases logging for the logging rank (`logging.wandb=true`): the config once, then every metrics record.

W&B drops a row whose `step=` is not above the last one it has seen, and a resumed run re-logs steps after its
checkpoint; so we never pass `step=`. Every metric is plotted against our own axis instead: `trainer/step`, a
column of every row (`define_metric`); `train/tokens_seen`, in every row too, is the other x-axis a panel can
take. A resumed run (the same `run_id`, `resume="allow"`) therefore keeps every row it logs.

Record fields are logged under their names of engine.training.metrics (`loss` -> `train/loss`, `val_loss` ->
`val/loss`, `step_time_s` -> `perf/step_time_s`, ...), in the sections train/, val/, perf/, memory/ and system/.
None and non-finite values are left out (as metrics.jsonl writes them as null).

Secrets: the W&B API key reaches wandb only through its own login/environment handling; nothing here copies it.
The config we log is scrubbed of keys that look like credentials and of any string equal to `WANDB_API_KEY`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config import LoggingConfig
from engine.training.metrics import GROUPS, scalars

STEP_KEY = "trainer/step"
_SECRET_KEY = re.compile(r"api[_-]?key|secret|passw(or)?d|credential|auth[_-]?token|access[_-]?token", re.I)
REDACTED = "<redacted>"


def wandb_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One W&B row from a metrics record: its step as `trainer/step`, every other value under its metric name."""
    return {STEP_KEY: record["step"], **scalars(record)}


def scrub(config: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A copy of `config` without credential-like keys and with any string equal to one of `secrets` redacted."""
    if isinstance(config, Mapping):
        return {k: scrub(v, secrets) for k, v in config.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(config, (list, tuple)):
        return [scrub(v, secrets) for v in config]
    if isinstance(config, str) and any(s and s in config for s in secrets):
        return REDACTED
    return config


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logging.wandb=true but the `wandb` package is not installed: `pip install wandb`, or "
                           "set logging.wandb=false") from None
    return wandb


class WandbRun:
    """One W&B run on the logging rank: `start`, then `log` each metrics record, then `finish`."""

    def __init__(self, wandb_module, run):
        self._wandb, self._run = wandb_module, run
        self._run_id: str = run.id

    @property
    def run_id(self) -> str:
        """The W&B run id: keep it (the checkpoint's metadata) and pass it back to `start` to resume this run."""
        return self._run_id

    @classmethod
    def start(cls, cfg: LoggingConfig, run_dir: str | os.PathLike, config: Mapping[str, Any],
              run_id: str | None = None) -> WandbRun:
        """Start (run_id None) or resume (run_id of an earlier run) a run; offline files go to run_dir/wandb/."""
        wandb = _import_wandb()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        secrets = tuple(v for v in (os.environ.get("WANDB_API_KEY"),) if v)
        settings = wandb.Settings(
            x_disable_stats=True,  # no system-metrics sampler process (wandb-symon)
            console="off",  # our console lines stay ours; W&B does not capture or re-upload them
            reinit="finish_previous",  # a run still active in this process is finished, never silently reused
        )
        run = wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_name or run_dir.name,
            id=run_id, resume="allow", dir=str(run_dir), mode=cfg.wandb_mode,
            config=scrub(dict(config), secrets), settings=settings,
        )
        run.define_metric(STEP_KEY)
        for group in GROUPS:
            run.define_metric(f"{group}/*", step_metric=STEP_KEY)
        return cls(wandb, run)

    def log(self, record: Mapping[str, Any]) -> None:
        """Log one metrics record (a training or an evaluation line) as a row at its `trainer/step`."""
        if "step" not in record:
            raise ValueError(f"a metrics record needs a 'step' field: {sorted(record)}")
        self._run.log(wandb_row(record))  # never step=: W&B would drop re-logged steps after a resume

    def __enter__(self) -> WandbRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(0 if exc_type is None else 1)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Finish the run (exit_code != 0 marks it failed; preempted: W&B shows it preempted, to be resumed) and
        stop wandb-core, so no process is left behind."""
        if self._run is None:
            return
        try:
            if preempted:
                self._run.mark_preempting()
            self._run.finish(exit_code=exit_code)
        finally:
            self._run = None
            self._wandb.teardown()
