"""Stragglers (engine/training/stragglers.py): a rank whose compute is slow is named in metrics.jsonl, though every
rank's wall-clock step takes as long as its (the others wait for it inside collectives)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.distributed import run_ranks
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard


def slow_rank_1(rank: int, world_size: int, shard: str, cache: str, root: str, ratio: float) -> list[dict]:
    cfg = tiny_config(shard, cache, global_batch=8, micro=2)
    cfg.parallel.dp, cfg.train.steps, cfg.train.eval_interval, cfg.train.log_interval = world_size, 4, 0, 2
    cfg.train.straggler_ratio = ratio
    trainer = start_trainer(cfg, Path(root))
    compute = trainer.compute_gradients

    def slow() -> float:
        if rank == 1:
            time.sleep(0.3)  # a slow device: outside any collective, so it counts as compute
        return compute()

    trainer.compute_gradients = slow
    return [r for r in trainer.fit() if "loss" in r]


def test_a_slow_rank_is_named_and_the_others_are_not(tmp_path):
    """dp 2, rank 1 0.3 s slower per step: both ranks' records name it, with its compute time and the median."""
    shard, cache = write_pattern_shard(tmp_path / "shard"), str(tmp_path / "cache")
    for rank, records in enumerate(run_ranks(2, slow_rank_1, shard, cache, str(tmp_path / "run"), 1.5)):
        assert [r["step"] for r in records] == [2, 4]
        for r in records:
            assert r["straggler_rank"] == 1 and r["slowest_rank"] == 1, (rank, r)
            assert r["compute_s_max"] > r["compute_s_median"] + 0.25


def test_a_zero_ratio_gathers_nothing():
    """train.straggler_ratio=0 (or one rank): no collective, no fields."""
    import torch

    from engine.parallel.state import ParallelState
    from engine.training.stragglers import StragglerWatch

    two = ParallelState(tp=1, pp=1, dp=2, rank=0, device=torch.device("cpu"))
    off, alone = StragglerWatch(two, 0.0), StragglerWatch(ParallelState(1, 1, 1, 0, torch.device("cpu")), 1.5)
    for watch in (off, alone):
        watch.start()
        watch.stop()
        assert watch.read() == {}
