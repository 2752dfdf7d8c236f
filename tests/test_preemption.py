"""Stopping on a signal: every rank checkpoints after the same step, exits 75, and the run resumes as if never
stopped (the losses of the uninterrupted run, bit for bit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.parallel.state import init_parallel
from engine.training.checkpoint import latest_checkpoint
from engine.training.preemption import EXIT_STOPPED
from engine.training.trainer import Trainer
from tests.distributed import run_ranks
from tests.test_checkpoint import losses_by_step, make_trainer
from tests.test_train_cli import REPO, TINY, metrics
from tests.test_trainer import write_pattern_shard


def signal_after(trainer: Trainer, step: int, sig: signal.Signals) -> None:
    """Make this process send itself `sig` as soon as optimizer step `step` is done."""
    original = trainer.train_step

    def step_then_signal():
        out = original()
        if trainer.step == step:
            os.kill(os.getpid(), sig)
        return out

    trainer.train_step = step_then_signal


def stop_scenario(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    """DP over every rank: an uninterrupted run; a run whose last rank alone gets SIGUSR1 after step 5 (an evaluation
    step), resumed."""
    state = init_parallel(1, 1, world_size, torch.device("cpu"))
    base = Path(root)
    full = losses_by_step(make_trainer(shard, cache, base / "full", 8, state, dp=world_size).fit())
    stopped = make_trainer(shard, cache, base / "stop", 8, state, dp=world_size)
    if rank == world_size - 1:  # the others learn of it only through the stop flag's all-reduce
        signal_after(stopped, 5, signal.SIGUSR1)
    records = stopped.fit()
    before = losses_by_step(records)
    handler_restored = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    checkpoint = latest_checkpoint(base / "stop")
    resumed = make_trainer(shard, cache, base / "stop", 8, state, dp=world_size)
    resumed.resume(checkpoint)
    return {"full": full, "before": before, "after": losses_by_step(resumed.fit()), "stopped_by": stopped.stopped_by,
            "stopped_at": stopped.step, "checkpoint": checkpoint.name, "handler_restored": handler_restored,
            "finished_by": resumed.stopped_by, "evaluated_at": [r["step"] for r in records if "val_loss" in r]}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("preempt")
    return write_pattern_shard(root / "shard"), str(root / "cache")


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_resume_is_exact(tmp_path, shard):
    """2 DP ranks (dropout 0.1, save_interval 0): SIGUSR1 to rank 1 alone after step 5 -> both save step 5 and
    stop, skipping that step's evaluation (the time goes to the checkpoint); resuming gives steps 6-8 of the
    uninterrupted run bit for bit; the signal handlers are restored."""
    per_rank = run_ranks(2, stop_scenario, *shard, str(tmp_path), timeout=300)
    for rank, r in enumerate(per_rank):
        assert r["stopped_by"] == "SIGUSR1" and r["stopped_at"] == 5, (rank, r["stopped_by"], r["stopped_at"])
        assert r["checkpoint"] == "step_00000005" and r["handler_restored"] and r["finished_by"] is None
        assert sorted(r["before"]) == [1, 2, 3, 4, 5] and sorted(r["after"]) == [6, 7, 8]
        assert r["evaluated_at"] == [0]  # eval_interval 5: skipped at the stop
        assert {**r["before"], **r["after"]} == r["full"], rank
        assert len(set(r["full"].values())) == len(r["full"])  # the losses move: equality is not trivial


def test_sigterm_to_the_cli_checkpoints_exits_75_and_the_same_command_resumes(tmp_path, stdlib_corpus):
    """`python -m engine.train` given SIGTERM mid-run: a checkpoint of the step it stopped after, exit code 75,
    a message saying how to continue; the same command then finishes, each step logged once."""
    from engine.data.preprocess import preprocess

    prefix = str(tmp_path / "stdlib")
    preprocess([stdlib_corpus], prefix, tokenizer="byte", progress=False, log=lambda *a, **k: None)
    run = tmp_path / "run"

    def command(steps: int) -> list[str]:
        return [sys.executable, "-m", "engine.train", *TINY, f"data.prefix={prefix}", f"train.run_dir={run}",
                f"train.steps={steps}", "train.log_interval=1", "train.eval_interval=0", "optim.warmup_steps=1",
                "optim.decay_steps=400"]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a pipe nobody drains could fill and block it
        proc = subprocess.Popen(command(400), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
        watchdog = threading.Timer(120, proc.kill)  # never hang, whatever the child does
        watchdog.start()
        try:
            for line in proc.stdout:  # training has started once step 2 is logged
                if line.startswith("step      2 |"):
                    proc.send_signal(signal.SIGTERM)
                    break
            proc.communicate()
        finally:
            watchdog.cancel()
            proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == EXIT_STOPPED, err
    stopped_at = int(latest_checkpoint(run).name.removeprefix("step_"))
    assert 2 <= stopped_at < 400
    assert f"SIGTERM: stopped after step {stopped_at} of 400, checkpoint saved; run the same command again" in err
    assert [m["step"] for m in metrics(run) if "loss" in m] == list(range(1, stopped_at + 1))
    r = subprocess.run(command(stopped_at + 3), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {run / 'checkpoints' / f'step_{stopped_at:08d}'}" in r.stdout
    assert [m["step"] for m in metrics(run) if "loss" in m] == list(range(1, stopped_at + 4))


def test_a_second_signal_before_the_stop_kills_at_once():
    """A run that hangs before it can stop (a dead peer, a stuck file system) still dies on the second SIGTERM, once
    it comes after the repeat window (shortened here)."""
    code = ("import os, signal, time\n"
            "from engine.training import preemption\n"
            "from engine.training.preemption import StopSignals\n"
            "preemption.REPEAT_WINDOW_S = 0.1\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "    print('first: stop requested', stop.received == signal.SIGTERM, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "    print('survived the second')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stderr)
    assert "first: stop requested True" in r.stdout and "survived" not in r.stdout
    assert "SIGTERM again: stopping now, without a checkpoint" in r.stderr
