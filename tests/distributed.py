"""Run checks inside N real gloo ranks on CPU, starting the processes once for many checks.

Starting 8 ranks costs ~15 s on 2 cores (each imports torch), so a test module should group its multi-rank
checks into one `run_checks` call rather than launching per check:

    def check_allreduce(rank, world_size): ...          # module-level, so spawned ranks can import it
    def test_many():
        run_checks(4, [check_allreduce, check_other])   # one launch, every failure reported with its rank

A check that raises fails that check on that rank; the others still run. Results come back per rank.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - shipped back to the parent with the traceback
        result = ("error", traceback.format_exc())
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args, timeout: float = 300.0) -> list:
    """Call `fn(rank, world_size, *args)` in `world_size` gloo ranks; return each rank's result.

    Raises AssertionError naming the rank and its traceback if any rank raised, and on timeout (never hangs).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="weft-ranks-") as out_dir:
        ctx = mp.start_processes(_rank_main, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{world_size} ranks did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        results = []
        for rank in range(world_size):
            status, value = pickle.loads(Path(out_dir, f"rank{rank}.pkl").read_bytes())
            if status == "error":
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
        return results


def _run_each(rank: int, world_size: int, checks: Sequence[Callable]) -> dict[str, str | None]:
    import torch.distributed as dist

    outcome: dict[str, str | None] = {}
    for check in checks:
        try:
            check(rank, world_size)
            outcome[check.__name__] = None
        except BaseException:  # noqa: BLE001
            outcome[check.__name__] = traceback.format_exc()
        dist.barrier()  # keep ranks in step so one failing check cannot deadlock the next one's collectives
    return outcome


def run_checks(world_size: int, checks: Sequence[Callable], timeout: float = 300.0) -> None:
    """Run every `check(rank, world_size)` in one launch of `world_size` ranks; fail listing every failed check."""
    per_rank = run_ranks(world_size, _run_each, list(checks), timeout=timeout)
    failures = [f"{name} on rank {r}:\n{tb}" for r, out in enumerate(per_rank) for name, tb in out.items() if tb]
    assert not failures, "\n".join(failures)
