"""`python -m engine.launch` (`weft-launch`): torchrun, ending with the exit code the ranks meant.

It takes torchrun's arguments unchanged (`python -m engine.launch --nproc-per-node 8 -m engine.train ...`) and
runs torchrun's own launcher. Plain torchrun turns every outcome but success into exit 1 with a traceback; this
one exits as a single `python -m engine.train` would, so that a job script can tell the cases apart:

    2   invalid configuration (every rank refused it before starting)
    3   stopped on non-finite values, last good state saved
    75  stopped by SIGTERM/SIGUSR1 after a checkpoint: run the same command again to continue
    otherwise the first failed rank's code (128 + N for a rank killed by signal N)

Stops: SIGTERM and SIGUSR1 (Slurm's preemption and time-limit warning) to the launcher are passed on to the ranks,
which checkpoint after the current step; they get `--shutdown-timeout` seconds for that (300 by default here,
torchrun's 30 is too short for a large save) before being killed. A rank ending with 2, 3 or 75 records it in a
per-launch directory (WEFT_EXIT_DIR), which is how the launcher knows after a stop, and why under
`--max-restarts` a restarted rank ends at once with the same code instead of training on after a stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

EXIT_DIR_ENV = "WEFT_EXIT_DIR"
FINAL_CODES = (2, 3, 75)  # outcomes a restart would only repeat
SHUTDOWN_TIMEOUT_S = 300
MEANING = {2: "invalid configuration", 3: "stopped on non-finite values, last good state saved",
           75: "stopped after a checkpoint; run the same command again to continue"}


def record_exit(code: int) -> None:
    """Rank side: note a final exit code for the launcher, when there is one (nothing outside engine.launch)."""
    where = os.environ.get(EXIT_DIR_ENV)
    if where and code in FINAL_CODES:
        path = Path(where) / f"rank-{os.environ.get('RANK', '0')}"
        path.write_text(str(code))


def recorded_codes(where: str | None) -> list[int]:
    """The final codes ranks recorded in the exit directory `where` (none without one)."""
    return [int(p.read_text()) for p in Path(where).glob("rank-*")] if where else []


def recorded_exit() -> int | None:
    """Rank side: the final code an earlier attempt of this launch recorded (a stop, a refused config), or None."""
    codes = recorded_codes(os.environ.get(EXIT_DIR_ENV))
    return min(codes) if codes else None


def failure_code(codes: Sequence[int]) -> int:
    """The launch's exit code from its failed ranks' codes (first failure first; negative: killed by that signal).

    One final code shared by every rank that exited by itself wins: the others were ended by torchrun after it."""
    own = {c for c in codes if c > 0}
    if len(own) == 1 and own <= set(FINAL_CODES):
        return own.pop()
    first = codes[0]
    return 128 - first if first < 0 else first


def _signal_names(value: str) -> str:
    """torchrun's --signals-to-handle with SIGUSR1 added: Slurm's warning must reach the ranks, not kill torchrun."""
    names = [s.strip() for s in value.split(",") if s.strip()]
    return ",".join(names + [n for n in ("SIGTERM", "SIGUSR1") if n not in names])


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv` (default: the command line); return the exit code the ranks meant."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    args.signals_to_handle = _signal_names(args.signals_to_handle)
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    exit_dir = tempfile.mkdtemp(prefix="weft-launch-")
    os.environ[EXIT_DIR_ENV] = exit_dir  # the ranks inherit it
    try:
        run(args)
        code = 0
    except ChildFailedError as e:
        first, _ = e.get_first_failure()
        failures = [e.failures[first], *(f for rank, f in e.failures.items() if rank != first)]
        code = failure_code([f.exitcode for f in failures])
    except SignalException as e:
        # torchrun passed the signal on and waited for the ranks; those that saved and stopped recorded 75. Ranks
        # that were ending by themselves keep their own code: srun --kill-on-bad-exit signals this node's launcher
        # when another node's refused the configuration (2) as this node's ranks did the same.
        recorded = recorded_codes(exit_dir)
        local = str(args.nproc_per_node)  # a count, or torchrun's gpu/cpu/auto
        everyone = len(recorded) == int(local) if local.isdigit() else bool(recorded)
        code = recorded[0] if everyone and len(set(recorded)) == 1 else 128 + e.sigval
        if code == 128 + e.sigval:
            print(f"weft-launch: {signal.Signals(e.sigval).name}: {recorded.count(75)} rank(s) stopped after a "
                  f"checkpoint before --shutdown-timeout ({args.shutdown_timeout} s) ran out", file=sys.stderr)
    finally:
        # The ranks are gone and the code is settled. A signal from here on (srun --kill-on-bad-exit ending the other
        # nodes' launchers once the first exits) must not kill this process during its exit, turning 75 into 143.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        shutil.rmtree(exit_dir, ignore_errors=True)
    if code:
        print(f"weft-launch: exit {code}" + (f" ({MEANING[code]})" if code in MEANING else " (see the ranks' "
                                                                                         "errors above)"),
              file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
