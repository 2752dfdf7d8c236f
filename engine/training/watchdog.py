"""The watchdog: a rank that is stuck in a collective, or whose peer is gone, ends the job quickly and leaves a
record of what it was waiting on.

Every rank runs a daemon thread (`Watchdog`) that
- writes a heartbeat into the rendezvous store every `interval` seconds (`weft/<launch>/beat/<rank>`), and
- watches this rank's collective record (`engine.parallel.comm.LOG`): a call still open after
  `parallel.timeout_s` means the rank is hung (gloo's own timeout raises in a rank blocked in its C++ wait; this
  catches a rank stuck anywhere else inside a collective, and NCCL's asynchronous ones). It dumps and exits 1.

Whatever ends a rank - an exception (a peer's closed connection, gloo's timeout, an out-of-memory) or the hang
check - `report()` writes `run_dir/faults/<launch>/rank-NNNNN.json` (the open and recent collectives, the step,
the error, the ranks found lost) and one line to stderr. A lost rank is one whose heartbeat stopped without it
reporting a failure: killed, out of host memory, its node gone. `tools/inspect_faults.py` puts the ranks' dumps
side by side. On NCCL, torch's flight recorder also dumps its trace of in-flight collectives next to them
(`nccl_flight_recorder_env`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from engine.parallel.comm import LOG, CollectiveLog
from engine.parallel.state import ParallelState

EXIT_FAULT = 1  # a rank hung or failed: the job is down, a restart resumes from the last complete checkpoint


def launch_id() -> str:
    """This launch of the job, stable across its ranks: Slurm's job and restart, or torchrun's run id and restart."""
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return f"port-{os.environ.get('MASTER_PORT', '0')}"


def fault_dir(run_dir: Path) -> Path:
    """Where this launch's ranks write their dumps."""
    return Path(run_dir) / "faults" / launch_id()


def nccl_flight_recorder_env(run_dir: Path) -> dict[str, str]:
    """NCCL settings for a fault that names its collectives: errors surfaced asynchronously (the watchdog tears the
    process down), and torch's flight recorder of the last 2000 collectives dumped on a timeout next to our dumps.
    The user's own values win."""
    prefix = str(fault_dir(run_dir) / "nccl_trace_rank_")
    wanted = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
              "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": prefix,
              "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


class Watchdog:
    """One rank's heartbeat and hang check (a daemon thread), and its fault report."""

    def __init__(self, state: ParallelState, run_dir: Path, timeout_s: float, log: CollectiveLog = LOG):
        self.state, self.run_dir, self.timeout_s, self.log = state, Path(run_dir), timeout_s, log
        self.interval = min(5.0, max(0.5, timeout_s / 20))
        self._store = None
        self._store_lock = threading.Lock()  # a TCPStore client is not safe to share between threads
        self._prefix = f"weft/{launch_id()}"
        self._stop = threading.Event()
        self._reported = threading.Lock()
        self._report_done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="weft-watchdog", daemon=True)

    def start(self) -> Watchdog:
        """Connect to the rendezvous store (heartbeats need one; without it they are skipped) and start watching."""
        self.started = time.time()
        if self.state.world_size > 1 and "MASTER_ADDR" in os.environ:
            try:
                self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                            is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
            except (RuntimeError, ValueError) as e:
                print(f"warning: the watchdog cannot reach the rendezvous store ({e}); lost ranks will not be "
                      "named", file=sys.stderr)
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the run is over)."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
            call = self.log.oldest_open()
            if call is not None and time.time() - call.started > self.timeout_s:
                self.report(f"hung: {describe_call(call)} for more than parallel.timeout_s={self.timeout_s:g} s")
                sys.stderr.flush()
                os._exit(EXIT_FAULT)

    def _beat(self) -> None:
        self._store_call("set", f"{self._prefix}/beat/{self.state.rank}", repr(time.time()))

    def _store_call(self, method: str, *args):
        """A store operation, or None once the store is unreachable (under srun rank 0 hosts it, and may be gone)."""
        with self._store_lock:
            if self._store is None:
                return None
            try:
                return getattr(self._store, method)(*args)
            except (RuntimeError, OSError):
                self._store = None
                return None

    def lost_ranks(self) -> list[tuple[int, float]]:
        """(rank, seconds since its last heartbeat) for every rank that stopped beating without reporting a
        failure; waits up to three heartbeats for a death that just happened to show."""
        if self._store is None:
            return []
        world = self.state.world_size
        deadline = time.time() + 3 * self.interval
        while True:
            # Only keys that exist: a get of a missing one waits for it (a rank that died before its first beat).
            keys = {r: f"{self._prefix}/beat/{r}" for r in range(world)
                    if self._store_call("check", [f"{self._prefix}/beat/{r}"])}
            beats = self._store_call("multi_get", list(keys.values())) if keys else []
            failed = {r for r in range(world) if self._store_call("check", [f"{self._prefix}/failed/{r}"])}
            if beats is None or self._store is None:
                return []
            now = time.time()
            last = dict(zip(keys, (float(b) for b in beats), strict=True))
            silent = {r: now - last.get(r, self.started) for r in range(world) if r not in failed}
            lost = [(r, s) for r, s in silent.items() if r != self.state.rank and s > 1.5 * self.interval]
            if lost or time.time() > deadline:
                return lost
            time.sleep(self.interval / 2)

    def report(self, error: str) -> Path | None:
        """Write this rank's dump and say what it was doing, then look for lost ranks and add them; the first report
        of a rank wins: a second one (the main thread's error while the watchdog thread reports a hang, or the
        reverse) waits for it to finish, so that the process does not end in the middle of it, and returns None.
        The dump comes first: the launcher may end this process at any moment."""
        if not self._reported.acquire(blocking=False):
            self._report_done.wait(timeout=60)
            return None
        try:
            return self._report(error)
        finally:
            self._report_done.set()

    def _report(self, error: str) -> Path | None:
        self._store_call("set", f"{self._prefix}/failed/{self.state.rank}", error[:200])
        c = self.state.coords()
        record = {"rank": self.state.rank, "world_size": self.state.world_size, "pp": c.pp, "dp": c.dp, "tp": c.tp,
                  "launch": launch_id(), "time": time.time(), "error": error, "lost_ranks": [],
                  "heartbeats": self._store is not None,
                  **self.log.snapshot()}
        path = self._write(record)
        call = self.log.oldest_open()
        doing = f"waiting in {describe_call(call)}" if call is not None else "in no collective"
        print(f"fault: rank {self.state.rank} (pp {c.pp}, dp {c.dp}, tp {c.tp}) at step {self.log.step}: {doing}; "
              f"dump {path}", file=sys.stderr, flush=True)
        lost = self.lost_ranks()
        if lost:
            record["lost_ranks"] = [{"rank": r, "silent_s": round(s, 1)} for r, s in lost]
            self._write(record)
            print(f"fault: rank {self.state.rank} finds lost: " + ", ".join(
                f"rank {r} (no heartbeat for {s:.1f} s, no error reported: killed, out of memory or its node is "
                "gone)" for r, s in lost), file=sys.stderr, flush=True)
        return path

    def _write(self, record: dict) -> Path | None:
        path = fault_dir(self.run_dir) / f"rank-{self.state.rank:05d}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)
        except OSError as e:
            print(f"warning: cannot write the fault dump {path}: {e}", file=sys.stderr)
            return None
        return path


def describe_call(call, now: float | None = None) -> str:
    """`all_reduce on tp [2, 3] from engine.parallel.grads.grad_norm (float32 [2]), 12.0 s` for a record (a comm
    Call, or its dict in a dump): how long it took, or had waited by `now` (default: the present)."""
    c = call if isinstance(call, dict) else vars(call)
    tensor = f" ({c['dtype']} {c['shape']})" if c.get("shape") is not None else ""
    waited = (c["ended"] or now or time.time()) - c["started"]
    return f"{c['op']} on {c['group']} {c['ranks']} from {c['caller']}{tensor}, {waited:.1f} s"
