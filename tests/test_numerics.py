"""Numerical faults (engine/training/numerics.py): a NaN planted in one rank's gradient is skipped by every rank,
leaving every parameter and optimizer moment bit-equal to before, or stops the run with its last good state saved;
max_skipped_steps stops a run that keeps producing them; a diverging run exits 3 from the command line; the
loss-spike detector flags a jump and survives a resume.

The NaN goes into rank 1's gradients after the data-parallel all-reduce, where only that replica sees it: without
the world-wide vote it would skip alone and the replicas would drift apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.training.checkpoint import checkpoints_dir, load_full_weights, read_meta, step_dir_name
from engine.training.numerics import EXIT_DIVERGED, SpikeDetector
from tests.distributed import run_ranks
from tests.test_train_cli import TINY, train
from tests.test_train_cli import shard as cli_shard  # noqa: F401 (the CLI tests' shard fixture)
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard

BAD_STEP = 3


def plant_nan(trainer, rank: int, step: int) -> None:
    """From now on, rank `rank`'s gradients hold a NaN after they are complete in step `step` (1-based)."""
    compute = trainer.compute_gradients

    def planted() -> float:
        loss = compute()
        if trainer.state.rank == rank and trainer.step + 1 == step:
            g, _ = trainer.grads()[0]
            g.view(-1)[0] = float("nan")
        return loss

    trainer.compute_gradients = planted


def snapshot(trainer) -> list[torch.Tensor]:
    """Every parameter and every optimizer state tensor of this rank, copied."""
    moments = [v.clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in trainer.model.parameters()] + moments


def skip_on_two_ranks(rank: int, world_size: int, shard: str, cache: str, root: str, zero: int) -> dict:
    cfg = tiny_config(shard, cache, "llama", global_batch=8, micro=2)
    cfg.parallel.dp, cfg.parallel.zero_stage = world_size, zero
    trainer = start_trainer(cfg, Path(root) / f"skip-zero{zero}")
    plant_nan(trainer, 1, BAD_STEP)
    for _ in range(BAD_STEP - 1):
        trainer.train_step()
    before = snapshot(trainer)
    bad = trainer.train_step()
    after = snapshot(trainer)
    good = trainer.train_step()
    return {"unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            "moved": not all(torch.equal(a, b) for a, b in zip(after, snapshot(trainer), strict=True)),
            "counts": (trainer.skipped_steps, trainer.nonfinite_steps, trainer.step), "bad_norm": bad["grad_norm"],
            "next_loss": good["loss"], "weights": [p.detach().clone() for p in trainer.model.parameters()]}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("numerics")
    return write_pattern_shard(root / "shard"), str(root / "cache")


@pytest.mark.parametrize("zero", [0, 2])
def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, shard, zero):
    """dp 2 (replicated, and ZeRO 2): the step is skipped on both ranks, bit for bit, and training goes on in step."""
    per_rank = run_ranks(2, skip_on_two_ranks, *shard, str(tmp_path), zero, timeout=300)
    for rank, r in enumerate(per_rank):
        assert r["unchanged"], f"rank {rank}: the skipped step changed parameters or optimizer state"
        assert r["moved"], f"rank {rank}: the step after the skipped one did not train"
        assert r["counts"] == (1, 1, BAD_STEP + 1), rank
        assert math.isfinite(r["next_loss"])
    if zero == 0:  # replicas: still identical after the skip
        for a, b in zip(per_rank[0]["weights"], per_rank[1]["weights"], strict=True):
            assert torch.equal(a, b)


def stop_on_two_ranks(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    cfg = tiny_config(shard, cache, "gpt2", global_batch=8, micro=2)
    cfg.parallel.dp = world_size
    cfg.train.nonfinite, cfg.train.steps, cfg.train.save_interval = "stop", 6, 2
    trainer = start_trainer(cfg, Path(root))
    plant_nan(trainer, 1, BAD_STEP)
    records = trainer.fit()
    return {"diverged": trainer.diverged, "step": trainer.step, "logged": [r["step"] for r in records if "loss" in r]}


def test_stop_saves_the_last_good_state_and_reports_the_step(tmp_path, shard):
    """train.nonfinite=stop: both ranks stop after the bad step; its checkpoint holds the previous step's weights
    (bit for bit) with the bad batch passed over, and the bad step is logged once."""
    per_rank = run_ranks(2, stop_on_two_ranks, *shard, str(tmp_path), timeout=300)
    for r in per_rank:
        assert r["diverged"] == f"step {BAD_STEP}: the gradient norm is not finite (train.nonfinite=stop)"
        assert r["step"] == BAD_STEP
    ckpt = checkpoints_dir(tmp_path)
    saved = load_full_weights(ckpt / step_dir_name(BAD_STEP))
    good = load_full_weights(ckpt / step_dir_name(BAD_STEP - 1))
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in saved)
    meta = read_meta(ckpt / step_dir_name(BAD_STEP))
    assert (meta["nonfinite_steps"], meta["skipped_steps"], meta["consumed_samples"]) == (1, 1, 8 * BAD_STEP)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3] and steps[-1]["grad_norm"] is None
    assert steps[-1]["nonfinite_steps"] == 1


def test_max_skipped_steps_stops_a_run_that_keeps_diverging(tmp_path, shard):
    """skip with max_skipped_steps=2: the third non-finite step stops the run, with a checkpoint."""
    cfg = tiny_config(*shard)
    cfg.train.steps, cfg.train.max_skipped_steps = 8, 2
    trainer = start_trainer(cfg, tmp_path)
    original = trainer.compute_gradients

    def nan_loss_from_step_3() -> float:
        loss = original()
        return float("nan") if trainer.step + 1 >= 3 else loss

    trainer.compute_gradients = nan_loss_from_step_3
    trainer.fit()
    assert trainer.step == 5 and trainer.nonfinite_steps == 3
    assert trainer.diverged == ("step 5: 3 steps skipped for non-finite values, more than "
                                "train.max_skipped_steps=2")
    assert read_meta(checkpoints_dir(tmp_path) / step_dir_name(5))["nonfinite_steps"] == 3


def test_a_diverging_run_exits_3_from_the_command_line(tmp_path, cli_shard):  # noqa: F811
    """optim.lr=1e30 blows the weights up after the first step: train.nonfinite=stop exits 3 and says why."""
    r = train([*TINY, f"data.prefix={cli_shard}", f"train.run_dir={tmp_path / 'run'}", "optim.lr=1e30",
               "optim.min_lr=0", "optim.clip_grad=0", "train.nonfinite=stop", "train.eval_interval=0"], tmp_path)
    assert r.returncode == EXIT_DIVERGED, r.stderr[-3000:]
    assert "not finite (train.nonfinite=stop)" in r.stderr and "error: stopped at step" in r.stderr
    latest = (checkpoints_dir(tmp_path / "run") / "latest").read_text().strip()
    assert read_meta(checkpoints_dir(tmp_path / "run") / latest)["nonfinite_steps"] == 1


def test_spike_detector_flags_a_jump_and_learns_a_new_level():
    """A jump far above a noisy plateau is flagged (with the window's mean); a lasting new level stops being one."""
    detector = SpikeDetector(window=20, threshold=6.0)
    plateau = [2.0 + 0.01 * math.sin(i) for i in range(20)]
    assert [detector.check(x) for x in plateau] == [None] * 20
    mean = detector.check(5.0)
    assert mean == pytest.approx(sum(plateau) / 20)
    assert detector.check(float("nan")) is None  # non-finite losses are numerics' other business
    flagged = [detector.check(5.0 + 0.01 * math.sin(i)) is not None for i in range(30)]
    assert flagged[-1] is False  # the window now holds the new level
    restored = SpikeDetector(window=20, threshold=6.0)
    restored.load_state_dict(detector.state_dict())
    assert restored.check(20.0) == detector.check(20.0)
    off = SpikeDetector(window=0, threshold=6.0)
    assert all(off.check(x) is None for x in [*plateau, 100.0])


def test_spikes_are_counted_in_metrics_and_resume_with_the_window(tmp_path, shard):
    """A planted loss jump is counted in loss_spikes; a run resumed after it keeps the count and the window."""
    def run(run_dir: Path, steps: int, resume: Path | None = None):
        cfg = tiny_config(*shard)
        cfg.train.steps, cfg.train.save_interval, cfg.train.spike_window, cfg.train.eval_interval = steps, 4, 4, 0
        trainer = start_trainer(cfg, run_dir)
        if resume is not None:
            trainer.resume(resume)
        original = trainer.compute_gradients
        trainer.compute_gradients = lambda: original() + (50.0 if trainer.step + 1 == 4 else 0.0)
        return trainer, trainer.fit()

    full, records = run(tmp_path / "full", 8)
    counts = [r["loss_spikes"] for r in records if "loss" in r]
    assert full.loss_spikes == 1 and counts == [0, 0, 0, 1, 1, 1, 1, 1]  # from step 4
    resumed, _ = run(tmp_path / "resumed", 8, checkpoints_dir(tmp_path / "full") / step_dir_name(4))
    assert resumed.loss_spikes == 1 and list(resumed.spikes.losses) == list(full.spikes.losses)
