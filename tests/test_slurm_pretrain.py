"""slurm/pretrain.sbatch on a real two-node Slurm cluster started on this machine (see tests/slurm_cluster.py).

Jobs span both nodes (gloo, CPU): one rank per node, or 2 per node as pipeline 2 x data parallel 2, started by srun
per rank or, with LAUNCHER=torchrun, by engine.launch per node. A job warned of its time limit (SIGUSR1 to the ranks,
as `--signal=USR1@300` sends it, or to the batch shell alone, as `--signal=B:USR1@300` does), and a job preempted
by a job of a higher-priority partition (SIGTERM to the ranks, then a requeue by Slurm), must checkpoint on every
rank, come back, resume, and finish with the very losses of the same job run without interruption. A cancelled job
saves but must not requeue itself, and a failing one must not be requeued. Every job ends its log with its status
line. Skipped unless root with Slurm installed; `test_a_short_job_completes` is CI's Slurm smoke test (.ci/run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.data.preprocess import preprocess
from tests.slurm_cluster import slurm_cluster
from tests.test_slurm_preprocess import TERMINAL
from tests.test_train_cli import REPO, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A local cluster whose jobs run this interpreter, meet on loopback and find this checkout; 2 CPUs per node,
    for 2 ranks per node."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus=2) as env:
        yield {**env, "WEFT_PYTHON": sys.executable, "WEFT_HOME": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "GLOO_SOCKET_IFNAME": "lo"}


def job_state(env: dict[str, str], job: str) -> tuple[str, int]:
    """(state, restart count) of a job, from scontrol."""
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "UNKNOWN"), int(restarts.group(1)) if restarts else 0


# The jobs' shapes on the two nodes: (CPU ranks per node, steps, overrides)
SHAPES = {"dp2": (1, 200, ()), "pp2_dp2": (2, 100, ("parallel=pp2", "parallel.dp=2")), "short": (1, 5, ())}


def submit(env: dict[str, str], workdir: Path, run_dir: Path, prefix: str, shape: str = "dp2", extra: tuple = (),
           launcher: str = "srun") -> str:
    """sbatch pretrain.sbatch for 2 nodes in `shape` (`extra`: more overrides); returns the job id."""
    ranks_per_node, steps, overrides = SHAPES[shape]
    args = [*TINY, f"data.prefix={prefix}", f"data.cache_dir={workdir / 'cache'}", f"train.run_dir={run_dir}",
            f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0", "optim.warmup_steps=1",
            f"optim.decay_steps={steps}", *overrides, *extra]
    out = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--ntasks-per-node={ranks_per_node}",
                          "--cpus-per-task=1", "--gpus-per-node=0",
                          f"--output={run_dir.parent / (run_dir.name + '-%j.out')}",
                          str(REPO / "slurm" / "pretrain.sbatch"), *args],
                         env={**env, "LAUNCHER": launcher}, cwd=workdir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait_done(env: dict[str, str], job: str, log: Path, timeout: float = 300.0) -> tuple[str, int]:
    """Wait for the job to end (a requeue is not an end); returns (state, restarts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, restarts = job_state(env, job)
        if state in TERMINAL:
            return state, restarts
        if state == "PENDING" and restarts:  # Slurm holds a requeued job ~2 min before it may start again
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True,
                           timeout=30)
        time.sleep(1)
    raise AssertionError(f"job {job} still {state} after {timeout:.0f} s:\n{log.read_text() if log.exists() else ''}")


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines if "loss" in m]
    assert steps == sorted(set(steps)), "a step logged twice"
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def statuses(text: str, job: str) -> list[str]:
    """The status lines the job's runs printed at their end, oldest first."""
    return re.findall(rf"^weft job {job}: (.*)$", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def shard(stdlib_corpus, tmp_path_factory) -> str:
    """The prefix of a byte-level shard of the built-in corpus."""
    prefix = str(tmp_path_factory.mktemp("shard") / "stdlib")
    preprocess([stdlib_corpus], prefix, tokenizer="byte", progress=False, log=lambda *a, **k: None)
    return prefix


def test_a_short_job_completes(tmp_path, slurm_env, shard):
    """A few steps on both nodes: every step logged once, the job COMPLETED and its status line says so."""
    run_dir = tmp_path / "short"
    job = submit(slurm_env, tmp_path, run_dir, shard, "short")
    log = tmp_path / f"short-{job}.out"
    assert wait_done(slurm_env, job, log) == ("COMPLETED", 0), log.read_text()
    assert statuses(log.read_text(), job) == ["completed"], log.read_text()
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, shard, tmp_path_factory) -> Callable[[str], dict[int, float]]:
    """The per-step losses of a shape's job run without interruption (by srun; each shape once)."""
    workdir = tmp_path_factory.mktemp("pretrain")
    done: dict[str, dict[int, float]] = {}

    def full_losses(shape: str) -> dict[int, float]:
        if shape not in done:
            full_dir = workdir / f"full-{shape}"
            job = submit(slurm_env, workdir, full_dir, shard, shape)
            assert wait_done(slurm_env, job, workdir / f"{full_dir.name}-{job}.out") == ("COMPLETED", 0)
            full = losses(full_dir)
            steps = SHAPES[shape][1]
            assert sorted(full) == list(range(1, steps + 1))
            assert len(set(full.values())) > steps // 2  # the losses move: equality below is not trivial
            done[shape] = full
        return done[shape]

    return full_losses


def wait_for_steps(run_dir: Path, log: Path, steps: int = 2) -> None:
    """Wait until the run has logged `steps` training steps."""
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < steps:
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)


ROUTES = {  # how the job is told to stop: the command, and the signal its ranks see
    "time-limit-USR1": (["scancel", "--signal=USR1", "{job}"], "SIGUSR1"),
    "time-limit-B-USR1": (["scancel", "--signal=USR1", "--batch", "{job}"], "SIGUSR1"),
    # --exclusive: the job needs the nodes' every CPU, so Slurm must preempt the running one
    "preempted": (["sbatch", "--partition=urgent", "--nodes=2", "--exclusive", "--output=/dev/null",
                   "--wrap=sleep 2"], "SIGTERM"),
}
STOPS = [  # (route, launcher, shape)
    *((route, "srun", "dp2") for route in ROUTES),
    *(("time-limit-USR1", launcher, "pp2_dp2") for launcher in ("srun", "torchrun")),
]


@pytest.mark.parametrize(("route", "launcher", "shape"), STOPS, ids=["-".join(case) for case in STOPS])
def test_a_stopped_job_checkpoints_comes_back_and_resumes_exactly(tmp_path, slurm_env, uninterrupted, shard, route,
                                                                  launcher, shape):
    """Every rank saves the same step and exits 75, the script requeues the job (its status line says why), the job
    runs again (restart 1) and resumes from that checkpoint; every step is logged once with the uninterrupted job's
    loss, bit for bit, under either launcher."""
    full = uninterrupted(shape)
    steps = SHAPES[shape][1]
    run_dir = tmp_path / "stopped"
    job = submit(slurm_env, tmp_path, run_dir, shard, shape, launcher=launcher)
    log = tmp_path / f"stopped-{job}.out"
    wait_for_steps(run_dir, log)
    command, seen = ROUTES[route]
    subprocess.run([arg.format(job=job) for arg in command], env=slurm_env, check=True, capture_output=True,
                   timeout=30)
    state, restarts = wait_done(slurm_env, job, log)
    text = log.read_text()
    assert (state, restarts) == ("COMPLETED", 1), text
    assert f"launcher {launcher}" in text, text
    stopped = re.search(rf"{seen}: stopped after step (\d+) of {steps}, checkpoint saved", text)
    assert stopped and 2 <= int(stopped.group(1)) < steps, text
    assert "restart 1" in text and "SIGTERM to the batch shell" not in text, text
    assert statuses(text, job) == ["requeued (exit 75, stopped after a checkpoint)", "completed"], text
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{int(stopped.group(1)):08d}'}" in text, text
    assert losses(run_dir) == full


def test_a_cancelled_job_saves_and_does_not_requeue_itself(tmp_path, slurm_env, shard):
    """scancel: the ranks still save the step they were in, but the job ends CANCELLED instead of coming back."""
    run_dir = tmp_path / "cancelled"
    job = submit(slurm_env, tmp_path, run_dir, shard)
    log = tmp_path / f"cancelled-{job}.out"
    wait_for_steps(run_dir, log)
    subprocess.run(["scancel", job], env=slurm_env, check=True, timeout=30)
    state, restarts = wait_done(slurm_env, job, log)
    time.sleep(2)  # the batch shell's last lines
    text = log.read_text()
    assert (state, restarts) == ("CANCELLED", 0), text
    assert "the job is ending, it will not requeue" in text and "requeueing" not in text, text
    saved = re.search(r"SIGTERM: stopped after step (\d+) of \d+, checkpoint saved", text)
    assert saved and (run_dir / "checkpoints" / f"step_{int(saved.group(1)):08d}").is_dir(), text
    assert statuses(text, job) == ["cancelled (exit 75, checkpoint saved: submit again to continue)"], text


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_a_failing_job_is_not_requeued(tmp_path, slurm_env, launcher):
    """A job whose training fails (here: its configuration) ends FAILED, once, with the error in its log and the
    ranks' exit code 2 in its status line (srun ends the other node's tasks when one fails: --kill-on-bad-exit)."""
    job = submit(slurm_env, tmp_path, tmp_path / "bad", str(tmp_path / "no-such-shard"), launcher=launcher)
    log = tmp_path / f"bad-{job}.out"
    assert wait_done(slurm_env, job, log) == ("FAILED", 0)
    text = log.read_text()
    assert "error: invalid configuration" in text and "training exited with" in text and "requeue" not in text, text
    assert statuses(text, job) == ["failed (exit 2)"], text


def test_a_job_that_loses_a_rank_is_requeued_and_resumes_exactly(tmp_path, slurm_env, uninterrupted, shard):
    """Rank 1 is SIGKILLed at step 120 of the first run (tests/fault_injection.py, run as the job's Python): srun
    ends the other rank, the script requeues the job (a failure, within WEFT_MAX_REQUEUES), and the second run
    resumes from step 100 with the uninterrupted job's losses, every step logged once."""
    full = uninterrupted("dp2")
    python = tmp_path / "python-with-faults"  # `$WEFT_PYTHON -m engine.train ARGS` -> the injector with ARGS
    python.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {REPO / 'tests' / 'fault_injection.py'} \"$@\"\n")
    python.chmod(0o755)
    env = {**slurm_env, "WEFT_PYTHON": str(python), "WEFT_TEST_KILL": "0:1:120",
           "WEFT_TEST_FILE": str(tmp_path / "killed_at")}
    run_dir = tmp_path / "killed"
    job = submit(env, tmp_path, run_dir, shard, extra=("train.save_interval=50", "parallel.timeout_s=30"))
    log = tmp_path / f"killed-{job}.out"
    state, restarts = wait_done(env, job, log)
    text = log.read_text()
    assert (state, restarts) == ("COMPLETED", 1), text
    assert "requeueing job" in text and "(requeue 1 of WEFT_MAX_REQUEUES=3)" in text, text
    assert statuses(text, job) == ["requeued (exit 137, requeue 1 of WEFT_MAX_REQUEUES=3)", "completed"], text
    assert f"resuming from {run_dir / 'checkpoints' / 'step_00000100'}" in text, text
    assert losses(run_dir) == full
