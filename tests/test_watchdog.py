"""The collective record (engine/parallel/comm.py) and the watchdog's pieces that need no dying process (those are
in tests/test_fault_tolerance.py): every collective goes through the record, which names the group, the caller
and whether the call returned; NCCL's flight recorder is pointed at the run's fault directory."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from engine.parallel import comm
from engine.training.watchdog import describe_call, fault_dir, nccl_flight_recorder_env
from tests.distributed import run_ranks

REPO = Path(__file__).resolve().parent.parent
COLLECTIVE = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|barrier|reduce_scatter\w*|gather_object|"
                        r"batch_isend_irecv|send|recv|all_to_all\w*|scatter\w*)\(")


def test_nothing_calls_a_collective_but_the_record():
    """engine/ and kernels/ reach torch.distributed's collectives only through engine.parallel.comm."""
    files = [p for root in ("engine", "kernels") for p in (REPO / root).rglob("*.py") if p.name != "comm.py"]
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in files
                 for n, line in enumerate(path.read_text().splitlines(), 1) if COLLECTIVE.search(line)]
    assert offenders == [], f"collectives outside engine/parallel/comm.py: {offenders}"


def recorded(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    comm.name_group(group, "dp")
    x = torch.ones(4)
    comm.all_reduce(x, group=group)
    out = torch.empty(2)
    handle = comm.reduce_scatter_flat(out, torch.ones(4), group=group, async_op=True)
    open_before_wait = [c.op for c in comm.LOG.open.values()]
    handle.wait()
    last = comm.LOG.recent[-1]
    return {"ops": [(c.op, c.group, c.ranks, c.shape, c.caller) for c in comm.LOG.recent][-2:],
            "open_before_wait": open_before_wait, "open_after": len(comm.LOG.open),
            "described": describe_call(last), "closed": last.ended is not None, "sum": x.tolist()}


def test_the_record_names_each_collective_and_closes_asynchronous_ones_on_wait():
    for r in run_ranks(2, recorded):
        assert r["sum"] == [2.0] * 4
        assert r["ops"] == [("all_reduce", "dp", [0, 1], [4], "test_watchdog.recorded"),
                            ("reduce_scatter", "dp", [0, 1], [4], "test_watchdog.recorded")]
        assert r["open_before_wait"] == ["reduce_scatter"] and r["open_after"] == 0 and r["closed"]
        assert r["described"].startswith("reduce_scatter on dp [0, 1] from test_watchdog.recorded (float32 [4])")


def test_nccl_flight_recorder_dumps_into_the_run_directory(tmp_path, monkeypatch):
    """On CUDA the flight recorder is on, dumps on a timeout next to our own dumps, and a user's setting wins."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "500")
    env = nccl_flight_recorder_env(tmp_path)
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(fault_dir(tmp_path) / "nccl_trace_rank_")
    assert str(tmp_path / "faults" / "torchrun-abc-0") in env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"
