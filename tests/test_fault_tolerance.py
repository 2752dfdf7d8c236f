"""Rank death, hangs and kills during a save, under torchrun (tests/fault_injection.py injects the faults).

- Kill -9: a rank of a tp2 x pp2 x dp2 run SIGKILLs itself at a step; every rank is gone within
  parallel.timeout_s, `torchrun --max-restarts` brings the job back from the last complete checkpoint, the per-step
  losses equal the uninterrupted run's bit for bit, no step is logged twice and no process is left. All in
  `make test-slow`: one kill, one job killed twice, and ten jobs at random ranks and steps.
- Kill during a save, synchronous (`make test`) and asynchronous: the job is killed while a checkpoint's files are being
  written; the rerun resumes from the previous checkpoint, never the interrupted one, and matches the
  uninterrupted run.
- A hang: one rank sleeps inside an all-reduce; every rank exits within the timeout and each one's dump in
  run_dir/faults/ names the collective it was waiting on.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.training.checkpoint import checkpoints_dir, latest_checkpoint
from tests.test_train_cli import REPO, TINY
from tests.test_train_cli import shard as cli_shard  # noqa: F401 (the CLI tests' shard fixture)

TIMEOUT_S = 15  # parallel.timeout_s of these runs
HANG_TIMEOUT_S = 10  # the hang test's: it waits the whole timeout
STEPS, SAVE_EVERY = 8, 2
LAYOUT = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.sequence_parallel=true"]
OWN = {"train.steps": STEPS, "train.save_interval": SAVE_EVERY, "train.keep_last": 0, "train.eval_interval": 0,
       "train.log_interval": 1, "train.global_batch_size": 8, "train.micro_batch_size": 2,
       "optim.warmup_steps": 1, "optim.decay_steps": 10, "parallel.timeout_s": TIMEOUT_S}
ARGS = [a for a in TINY if a.split("=")[0] not in OWN] + [f"{k}={v}" for k, v in OWN.items()]


def torchrun_job(args: list[str], run: Path, nproc: int, restarts: int = 0,
                 **faults: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of engine.train through the fault injector under torchrun; `faults` become
    WEFT_TEST_* variables."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WEFT_TEST_FILE": str(run) + ".fault",
           "WEFT_TEST_STARTS": str(run) + ".starts", **{f"WEFT_TEST_{k.upper()}": v for k, v in faults.items()}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(restarts), "--monitor-interval", "0.5", str(REPO / "tests" / "fault_injection.py"),
           *args, f"train.run_dir={run}"]
    return cmd, env


def torchrun(args: list[str], run: Path, nproc: int, restarts: int = 0, **faults: str) -> subprocess.CompletedProcess:
    """Run `torchrun_job` to its end."""
    cmd, env = torchrun_job(args, run, nproc, restarts, **faults)
    return subprocess.run(cmd, cwd=run.parent, capture_output=True, text=True, timeout=900, env=env)


def uninterrupted(tmp_path_factory, name: str, args: list[str], nproc: int) -> dict[int, float]:
    """The per-step losses of the run `args` on `nproc` ranks, with no fault."""
    run = tmp_path_factory.mktemp(name) / "run"
    r = torchrun(args, run, nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return step_losses(run)


def step_losses(run: Path) -> dict[int, float]:
    """The loss of every step in metrics.jsonl; fails if a step is logged twice."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def starts(run: Path) -> dict[int, list[float]]:
    """Per torchrun attempt, when its processes started."""
    out: dict[int, list[float]] = {}
    for line in Path(str(run) + ".starts").read_text().splitlines():
        attempt, _, t = line.split()
        out.setdefault(int(attempt), []).append(float(t))
    return out


def assert_no_orphans(run: Path) -> None:
    leftover = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True)
    assert leftover.stdout == "", f"orphan processes: {leftover.stdout}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_shard) -> tuple[str, dict[int, float]]:  # noqa: F811
    """The uninterrupted tp2 x pp2 x dp2 run: its per-step losses."""
    return cli_shard, uninterrupted(tmp_path_factory, "reference", [*ARGS, *LAYOUT, f"data.prefix={cli_shard}"], 8)


def kill_trials(tmp_path: Path, reference, kills: list[tuple[int, int]]) -> None:
    """One torchrun job whose attempt i loses rank kills[i][0] at step kills[i][1]; it must end as the reference."""
    shard, expected = reference
    run = tmp_path / "run"
    spec = ",".join(f"{attempt}:{rank}:{step}" for attempt, (rank, step) in enumerate(kills))
    r = torchrun([*ARGS, *LAYOUT, f"data.prefix={shard}"], run, 8, restarts=len(kills), kill=spec)
    assert r.returncode == 0, f"kills {spec}: {r.stderr[-3000:]}"
    began = starts(run)
    assert sorted(began) == list(range(len(kills) + 1)), began
    for attempt, (rank, step) in enumerate(kills):
        resumed_from = (step - 1) // SAVE_EVERY * SAVE_EVERY
        want = f"resuming from {checkpoints_dir(run)}/step_{resumed_from:08d}" if resumed_from else "starting fresh"
        assert want in r.stdout, f"attempt {attempt + 1} after killing rank {rank} at step {step}: {r.stdout[-2000:]}"
        assert re.search(rf"finds lost: .*rank {rank} \(no heartbeat for", r.stderr), f"rank {rank} not named lost"
    # Every rank of a killed attempt was gone, and torchrun had started the next, within the timeout.
    last_kill = float(Path(str(run) + ".fault").read_text())
    assert min(began[len(kills)]) - last_kill < TIMEOUT_S, "the ranks outlived the kill by the timeout"
    assert step_losses(run) == expected, f"kills {spec}: the losses differ from the uninterrupted run's"
    assert_no_orphans(run)


@pytest.mark.slow  # 8 ranks, ~70 s with its reference run; make test kills a dp2 rank during a save instead
def test_a_kill_restarts_and_matches_the_uninterrupted_run(tmp_path, reference):
    """Rank 5 killed in step 6: the restart resumes from step 4 (make test-slow also kills twice in one job, and
    ten times at random)."""
    kill_trials(tmp_path, reference, [(5, 6)])


@pytest.mark.slow
def test_two_kills_restart_and_match_the_uninterrupted_run(tmp_path, reference):
    """Rank 5 killed in step 3 (resumes from step 2), then rank 2 in step 6 of the restart (resumes from 6's
    predecessor, step 4)."""
    kill_trials(tmp_path, reference, [(5, 3), (2, 6)])


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_kill_a_random_rank_at_a_random_step(tmp_path, reference, trial):
    """Ten trials: a random rank (of 8) at a random step (of 8), seeded by the trial number."""
    rng = random.Random(1000 + trial)
    kill_trials(tmp_path, reference, [(rng.randrange(8), rng.randrange(1, STEPS + 1))])


SAVE_ARGS = ["parallel.dp=2"]


@pytest.fixture(scope="module")
def dp_reference(tmp_path_factory, cli_shard) -> tuple[str, dict[int, float]]:  # noqa: F811
    """The uninterrupted dp2 run: its per-step losses."""
    return cli_shard, uninterrupted(tmp_path_factory, "dp_reference", [*ARGS, *SAVE_ARGS, f"data.prefix={cli_shard}"],
                                    2)


def kill_during_save(tmp_path: Path, dp_reference, async_save: bool) -> None:
    """Kill the whole job while step 4's files are written; the rerun resumes from step 2 and matches."""
    shard, expected = dp_reference
    run = tmp_path / "run"
    args = [*ARGS, *SAVE_ARGS, f"data.prefix={shard}", f"train.async_save={str(async_save).lower()}"]
    cmd, env = torchrun_job(args, run, 2, slow_save_step="4")
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    marker = Path(str(run) + ".fault")
    deadline = time.time() + 300
    while not marker.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), f"the save never began: {log.read_text()[-3000:]}"
    # Every process of the job at once, as a lost node would (torchrun's workers are in sessions of their own).
    pattern = f"train.run_dir={run}"
    subprocess.run(["pkill", "-9", "-f", pattern], check=False)
    job.wait(timeout=60)
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).stdout and time.time() < deadline:
        time.sleep(0.2)
    root = checkpoints_dir(run)
    assert latest_checkpoint(run) == root / "step_00000002"
    assert (root / ".tmp-step_00000004").exists() and not (root / "step_00000004").exists()
    r = torchrun(args, run, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {root}/step_00000002" in r.stdout
    assert step_losses(run) == expected
    assert not (root / ".tmp-step_00000004").exists()  # the next save of step 4 cleared the debris
    assert_no_orphans(run)


@pytest.mark.parametrize("async_save", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["sync", "async"])
def test_kill_during_save_resumes_from_the_previous_checkpoint(tmp_path, dp_reference, async_save):
    kill_during_save(tmp_path, dp_reference, async_save)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(8))
def test_kill_during_save_trials(tmp_path, dp_reference, trial):
    """With the two above, ten trials: sync and async alternately."""
    kill_during_save(tmp_path, dp_reference, trial % 2 == 1)


def test_a_hung_rank_ends_the_job_within_the_timeout_and_every_dump_names_its_wait(tmp_path, cli_shard):  # noqa: F811
    """tp2 x pp2: rank 1 sleeps inside its first all-reduce of step 3. The watchdog ends it after the timeout, its
    peers' collectives time out, and each rank's dump names what it waited on."""
    run = tmp_path / "run"
    t0 = time.time()
    args = [a for a in ARGS if not a.startswith("parallel.timeout_s=")] + [f"parallel.timeout_s={HANG_TIMEOUT_S}"]
    r = torchrun([*args, "parallel.tp=2", "parallel.pp=2", f"data.prefix={cli_shard}"], run, 4, hang_rank="1",
                 hang_step="3")
    ended = time.time()
    assert r.returncode != 0
    hung_at = float(Path(str(run) + ".fault").read_text())
    assert ended - hung_at < HANG_TIMEOUT_S + 30, f"the job outlived the hang by {ended - hung_at:.0f} s"
    dumps = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run / "faults").glob("*/rank-*.json")}
    assert sorted(dumps) == [0, 1, 2, 3], r.stderr[-3000:]
    for rank, d in dumps.items():
        late = d["time"] - hung_at
        assert late < HANG_TIMEOUT_S + 10, f"rank {rank} outlived the hang by {late:.0f} s"
        assert d["open"], f"rank {rank}'s dump names no collective it waited on: {d['error']}"
        assert d["step"] == 3
    assert dumps[1]["error"].startswith("hung: all_reduce on tp [0, 1]")
    assert dumps[0]["open"][0]["op"] == "all_reduce" and dumps[0]["open"][0]["group"] == "tp"
    for rank in (2, 3):  # the second stage waits on the first's activations
        assert dumps[rank]["open"][0]["op"].startswith("send/recv recv<-"), dumps[rank]["open"]
    assert "fault: rank 1 (pp 0, dp 0, tp 1) at step 3: waiting in all_reduce on tp [0, 1]" in r.stderr
    assert t0 < hung_at
    assert_no_orphans(run)
    report = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_faults.py"), str(run)],
                            capture_output=True, text=True)
    assert report.returncode == 0 and "4 of 4 ranks left a dump" in report.stdout, report.stderr
    assert "rank     1 (pp 0, dp 0, tp 1) step 3: all_reduce on tp [0, 1]" in report.stdout, report.stdout
