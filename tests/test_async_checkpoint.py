"""Asynchronous checkpoints (train.async_save, engine/training/async_checkpoint.py): the files equal a synchronous
save's, training goes on while they are written, one save at most is in flight, the end of the run waits for the
last one, and a write that fails in the background stops every rank at the same step with an error.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import engine.training.checkpoint as checkpoint
from engine.training.checkpoint import CheckpointError, checkpoints_dir, latest_checkpoint, step_dir_name
from tests.distributed import run_ranks
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("async")
    return write_pattern_shard(root / "shard"), str(root / "cache")


def config(shard, async_save: bool, steps: int = 6, dp: int = 1):
    cfg = tiny_config(*shard, global_batch=8, micro=2)
    cfg.parallel.dp = dp
    cfg.train.steps, cfg.train.save_interval, cfg.train.keep_last, cfg.train.eval_interval = steps, 2, 0, 0
    cfg.train.async_save = async_save
    return cfg


def digests(run: Path, step: int) -> dict[str, str]:
    """Every file's SHA-256 but meta.json's (whose config says which mode wrote it)."""
    files = json.loads((checkpoints_dir(run) / step_dir_name(step) / "manifest.json").read_text())["files"]
    return {name: r["sha256"] for name, r in files.items() if name != "meta.json"}


def test_async_checkpoints_equal_synchronous_ones(tmp_path, shard):
    """The same losses, and every step's files bit for bit; the run ends with its last checkpoint published."""
    sync = start_trainer(config(shard, False), tmp_path / "sync").fit()
    asynchronous = start_trainer(config(shard, True), tmp_path / "async").fit()
    assert [r.get("loss") for r in sync] == [r.get("loss") for r in asynchronous]
    for step in (2, 4, 6):
        assert digests(tmp_path / "sync", step) == digests(tmp_path / "async", step)
    assert latest_checkpoint(tmp_path / "async").name == step_dir_name(6)


def test_training_goes_on_while_one_save_at_a_time_is_written(tmp_path, shard, monkeypatch):
    """Files that take 0.5 s each to become durable: later steps run while a save is in flight, and two saves
    never overlap."""
    writing, overlaps, lock = set(), [], threading.Lock()
    file_record = checkpoint.file_record

    def slow(path):
        with lock:
            writing.add(path.parent.name)
            overlaps.append(len(writing))
        time.sleep(0.5)
        try:
            return file_record(path)
        finally:
            with lock:
                writing.discard(path.parent.name)

    monkeypatch.setattr(checkpoint, "file_record", slow)
    trainer = start_trainer(config(shard, True, steps=8), tmp_path)
    seen = []
    step = trainer.train_step

    def watched():
        seen.append((trainer.step + 1, trainer.saver.in_flight))
        return step()

    trainer.train_step = watched
    trainer.fit()
    assert any(in_flight is not None and s > in_flight for s, in_flight in seen), seen  # steps ran meanwhile
    assert max(overlaps) == 1
    assert trainer.saver.in_flight is None and latest_checkpoint(tmp_path).name == step_dir_name(8)


def failing_save_on_rank_1(rank: int, world_size: int, shard: tuple, root: str) -> dict:
    file_record = checkpoint.file_record

    def failing(path):
        if rank == 1 and path.parent.name == f".tmp-{step_dir_name(4)}":
            raise OSError(28, "No space left on device")
        return file_record(path)

    checkpoint.file_record = failing
    trainer = start_trainer(config(shard, True, steps=8, dp=world_size), Path(root))
    try:
        trainer.fit()
    except CheckpointError as e:
        return {"error": str(e), "step": trainer.step, "latest": latest_checkpoint(root).name}
    return {"error": None}


def test_a_failed_background_save_stops_every_rank_at_the_same_step(tmp_path, shard):
    """Rank 1's disk fills while writing step 4: both ranks raise at one step boundary, naming the step; the
    previous checkpoint stays the latest."""
    per_rank = run_ranks(2, failing_save_on_rank_1, shard, str(tmp_path), timeout=300)
    assert per_rank[0]["step"] == per_rank[1]["step"] > 4
    for r in per_rank:
        assert "the asynchronous save of step 4 failed" in r["error"] and r["latest"] == step_dir_name(2)
    assert "No space left on device" in per_rank[1]["error"]
