"""A rank that fails inside the pipeline schedule takes the whole job down quickly, and says where it was.

8 ranks (tp 2 x pp 2 x dp 2) under torchrun; the last stage's rank 7 raises in a forward of step 3 while its
neighbours wait on it. Every rank must be gone within 60 s of the failure, the job must exit non-zero, and the
message must name the rank and its pipeline stage. No rank may hang in a receive.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train_cli import REPO, TINY, shard  # noqa: F401 (shard: the CLI tests' shard fixture)


@pytest.mark.slow  # a fault trial of 8 ranks; tests/test_fault_tolerance.py has the fast tier's
def test_a_failing_last_stage_stops_every_rank_within_a_minute(tmp_path, shard):  # noqa: F811
    run, marker = tmp_path / "run", tmp_path / "failed_at"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WEFT_TEST_FAIL_RANK": "7",
           "WEFT_TEST_FAIL_STEP": "3", "WEFT_TEST_FILE": str(marker)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
           str(REPO / "tests" / "fault_injection.py"), *TINY, f"data.prefix={shard}", f"train.run_dir={run}",
           "parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.sequence_parallel=true",
           "train.global_batch_size=8", "train.micro_batch_size=2", "parallel.timeout_s=45"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    ended = time.time()
    assert r.returncode != 0
    assert marker.exists(), r.stderr[-3000:]
    assert ended - float(marker.read_text()) < 60, "ranks outlived the failure by a minute"
    assert "rank 7 of 8 (pipeline stage 1, tensor rank 1, data rank 1) failed in step 3" in r.stderr, r.stderr[-3000:]
    assert "(pipeline stage 0, tensor rank 1, data rank 1) stopped in step 3: PipelinePeerError" in r.stderr
    assert "out of memory (injected by the test)" in r.stderr
    leftover = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True)
    assert leftover.stdout == "", f"orphan processes: {leftover.stdout}"
    assert Path(run / "metrics.jsonl").exists()  # it trained steps 1-2 before the failure
