"""engine.launch: torchrun's launcher ending with the code the ranks meant. A refused configuration exits 2 (plain
torchrun: 1), SIGUSR1 to the launcher checkpoints every rank and exits 75 (plain torchrun dies of it), and under
--max-restarts a stop is not trained past by the restarted ranks. A stop signal delivered twice at once (to the
whole process group, and passed on by the launcher) still checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.launch import failure_code
from engine.training.preemption import REPEAT_WINDOW_S, StopSignals
from tests.test_train_cli import REPO, TINY
from tests.test_train_cli import shard as cli_shard  # noqa: F401 (the CLI tests' shard fixture)

LONG = [*TINY, "train.steps=100000", "train.log_interval=1", "train.eval_interval=0", "parallel.dp=2"]


@pytest.fixture
def launch():
    """Start `python -m engine.launch` with two ranks of engine.train in its own process group; whatever is left
    of it at the end of the test is killed."""
    started = []

    def start(args: list[str], run: Path, restarts: int = 0) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "engine.launch", "--standalone", "--nproc-per-node", "2", "--max-restarts",
               str(restarts), "--monitor-interval", "0.5", "-m", "engine.train", *args, f"train.run_dir={run}"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        started.append(subprocess.Popen(cmd, cwd=run.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_for_steps(run: Path, proc: subprocess.Popen, steps: int = 2) -> None:
    """Until metrics.jsonl holds `steps` lines (the ranks are in the step loop)."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never logged its first steps"
        time.sleep(0.2)


def test_failure_code_prefers_the_ranks_own_final_code():
    assert failure_code([2, 2]) == 2
    assert failure_code([75, -15]) == 75  # the second rank was ended by torchrun after the first exited
    assert failure_code([1, 75]) == 1
    assert failure_code([-9, 1]) == 137
    assert failure_code([3]) == 3


def test_a_refused_configuration_exits_2(tmp_path, cli_shard, launch):  # noqa: F811
    """Plain torchrun ends with 1 and a traceback; the launcher with the ranks' 2 and no traceback."""
    proc = launch([*TINY, f"data.prefix={cli_shard}", "model.num_heads=3"], tmp_path / "run")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "model.num_heads=3" in err and "weft-launch: exit 2 (invalid configuration)" in err
    assert "Traceback" not in err


def test_sigusr1_to_the_launcher_checkpoints_and_exits_75(tmp_path, cli_shard, launch):  # noqa: F811
    run = tmp_path / "run"
    proc = launch([*LONG, f"data.prefix={cli_shard}"], run)
    wait_for_steps(run, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGUSR1: stopped after step" in err and "Traceback" not in err
    assert (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_stop_signal_delivered_twice_at_once_still_checkpoints(tmp_path, cli_shard, launch):  # noqa: F811
    """SIGTERM to the whole process group (as `scancel` and Ctrl-C-like tools do): each rank gets it directly and
    again from the launcher, and must take both as one request."""
    run = tmp_path / "run"
    proc = launch([*LONG, f"data.prefix={cli_shard}"], run)
    wait_for_steps(run, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "again: stopping now" not in err and (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_under_restarts_a_stop_of_the_ranks_is_not_trained_past(tmp_path, cli_shard, launch):  # noqa: F811
    """SIGUSR1 to the ranks only, with --max-restarts 2: torchrun restarts them, and they end at once with 75."""
    run = tmp_path / "run"
    proc = launch([*LONG, f"data.prefix={cli_shard}"], run, restarts=2)
    wait_for_steps(run, proc)
    subprocess.run(["pkill", "-USR1", "-f", f"[-]u -m engine.train .*train.run_dir={run}"], check=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert err.count("already ended with exit 75; not restarting") == 2  # rank 0 of each restart
    steps = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(steps) == 1


def test_a_repeat_within_the_window_is_one_request():
    """In-process: two SIGTERMs at once set the flag once and do not kill; the process lives on."""
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == signal.SIGTERM
    assert REPEAT_WINDOW_S >= 1
