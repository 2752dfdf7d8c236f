"""Checkpoints: resume == uninterrupted (bit for bit), crash-safe saves, clear errors, no unpickling."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from engine.parallel.state import ParallelState, init_parallel
from engine.training.checkpoint import (
    CheckpointError,
    checkpoint_weights,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    snapshot_checkpoint,
    write_checkpoint,
)
from engine.training.trainer import Trainer
from tests.distributed import run_ranks
from tests.test_trainer import tiny_config, write_pattern_shard

SINGLE = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))


class CrashError(RuntimeError):
    """A stand-in for a node failure."""


def make_trainer(shard: str, cache: str, run_dir: Path, steps: int, state: ParallelState = SINGLE,
                 precision: str = "fp32", dp: int = 1, **train) -> Trainer:
    """A trainer whose learning-rate schedule does not depend on train.steps (so runs can be extended)."""
    cfg = tiny_config(shard, cache, precision=precision, dp=dp, global_batch=16, micro=2)
    cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.decay_steps = steps, 2, 10
    cfg.model.dropout = 0.1  # so the restored RNG state matters
    for k, v in train.items():
        setattr(cfg.train, k, v)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, state, run_dir)


def losses_by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def crash_at(trainer: Trainer, step: int) -> None:
    """Make the trainer fail when it starts optimizer step `step`."""
    original = trainer.train_step

    def failing():
        if trainer.step + 1 == step:
            raise CrashError(f"node lost at step {step}")
        return original()

    trainer.train_step = failing


def resume_scenarios(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    """Per precision: losses of an uninterrupted run, a crashed-and-resumed run, and a finished-then-extended run."""
    state = init_parallel(1, 1, world_size, torch.device("cpu"))
    out = {}
    for precision in ("fp32", "bf16"):
        base = Path(root) / precision
        full = losses_by_step(make_trainer(shard, cache, base / "full", 8, state, precision, world_size).fit())
        crashed = make_trainer(shard, cache, base / "crash", 8, state, precision, world_size, save_interval=3)
        crash_at(crashed, 6)
        with pytest.raises(CrashError):
            crashed.fit()
        resumed = make_trainer(shard, cache, base / "crash", 8, state, precision, world_size, save_interval=3)
        meta = resumed.resume(latest_checkpoint(base / "crash"))
        after_crash = losses_by_step(resumed.fit())
        short = make_trainer(shard, cache, base / "extend", 4, state, precision, world_size)
        first = losses_by_step(short.fit())
        longer = make_trainer(shard, cache, base / "extend", 8, state, precision, world_size)
        longer.resume(latest_checkpoint(base / "extend"))
        extended = {**first, **losses_by_step(longer.fit())}
        out[precision] = {"full": full, "resumed_from": meta["step"], "after_crash": after_crash, "extended": extended}
    return out


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    return write_pattern_shard(root / "shard"), str(root / "cache")


def test_resume_is_bitwise_identical_dp2_with_accumulation(tmp_path, shard):
    """DP=2, 4 micro-batches per rank, dropout on: resuming after a crash, or extending a finished run, gives the
    uninterrupted run's losses exactly (==), in fp32 and in bf16 autocast."""
    per_rank = run_ranks(2, resume_scenarios, *shard, str(tmp_path))
    for rank, result in enumerate(per_rank):
        for precision, r in result.items():
            full = r["full"]
            assert r["resumed_from"] == 3 and sorted(r["after_crash"]) == [4, 5, 6, 7, 8]
            for step, loss in r["after_crash"].items():
                assert loss == full[step], f"rank {rank} {precision} step {step}: {loss!r} != {full[step]!r}"
            assert r["extended"] == full, f"rank {rank} {precision}: extended run differs"
            assert len(set(full.values())) == len(full)  # the losses move: equality is not trivial


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, shard):
    """A save that dies half-way leaves `latest` and the previous checkpoint untouched and loadable."""
    trainer = make_trainer(*shard, tmp_path, 4)
    trainer.train_step()
    first = trainer.save()
    trainer.train_step()

    def die():
        raise CrashError("killed while writing")

    with pytest.raises(CrashError):
        snapshot = snapshot_checkpoint(trainer.step, SINGLE, trainer.model, trainer.optimizer,
                                       {"consumed_samples": 32, "skipped_steps": 0, "scaler": None,
                                        "wandb_run_id": None, "config": {}})
        write_checkpoint(tmp_path, snapshot, SINGLE, fail_after_files=die)
    assert latest_checkpoint(tmp_path) == first
    assert (tmp_path / "checkpoints" / ".tmp-step_00000002").exists()  # the debris is never mistaken for a step
    fresh = make_trainer(*shard, tmp_path / "other", 4)
    assert fresh.resume(resolve_checkpoint(tmp_path))["step"] == 1
    assert trainer.save() == tmp_path / "checkpoints" / "step_00000002"  # a later save clears the debris
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000002").exists()


def test_keep_last_and_keep_every(tmp_path, shard):
    """Only the newest keep_last checkpoints survive, plus multiples of keep_every."""
    trainer = make_trainer(*shard, tmp_path, 7, save_interval=1, keep_last=2, keep_every=3)
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000006", "step_00000007"]
    assert latest_checkpoint(tmp_path).name == "step_00000007"


@pytest.mark.parametrize("damage", ["truncate", "delete", "meta"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, shard, damage):
    """A truncated or missing file, or a broken meta.json, raises CheckpointError naming the file."""
    trainer = make_trainer(*shard, tmp_path, 1)
    trainer.fit()
    step = latest_checkpoint(tmp_path)
    model_file = step / "model-pp00-tp00.safetensors"
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:-100])
        match = "model-pp00-tp00.safetensors: .* bytes, but .* were written"
    elif damage == "delete":
        model_file.unlink()
        match = "model-pp00-tp00.safetensors: missing"
    else:
        text = (step / "meta.json").read_text()
        (step / "meta.json").write_text("X" + text[1:])  # the same size: only parsing can tell
        match = "meta.json: not valid JSON"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(step, SINGLE, trainer.model, trainer.optimizer)


def test_loading_never_unpickles(tmp_path, shard, monkeypatch):
    """Tensors come through safetensors and the rest through JSON: pickle and torch.load are never called."""
    trainer = make_trainer(*shard, tmp_path, 2)
    trainer.fit()

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    other = make_trainer(*shard, tmp_path / "again", 2)
    meta = other.resume(latest_checkpoint(tmp_path))
    assert meta["step"] == 2 and json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["format"] == 2
    for a, b in zip(trainer.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_format_1_checkpoints_still_load_and_unknown_formats_are_refused(tmp_path, shard):
    """A checkpoint of the format before pipelines (1: `optimizer_groups` in meta.json) resumes; a newer one is
    refused with the versions this one reads."""
    trainer = make_trainer(*shard, tmp_path, 2)
    trainer.fit()
    step = latest_checkpoint(tmp_path)
    meta_file = step / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["manifest"]  # as written before manifests: meta.json's sizes are checked instead
    (step / "manifest.json").unlink()
    meta_file.write_text(json.dumps({**meta, "format": 1, "optimizer_groups": []}))
    other = make_trainer(*shard, tmp_path / "again", 2)
    other.resume(step)
    for a, b in zip(trainer.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)
    meta_file.write_text(json.dumps({**meta, "format": 4}))
    with pytest.raises(CheckpointError, match="checkpoint format 4, this version reads 1, 2, 3"):
        read_meta(step)


def test_init_from_takes_weights_only(tmp_path, shard):
    """train.init_from loads the weights; step, data position and optimizer state start fresh."""
    source = make_trainer(*shard, tmp_path / "src", 3)
    source.fit()
    target = make_trainer(*shard, tmp_path / "dst", 3)
    target.init_weights_from(checkpoint_weights(tmp_path / "src"))
    for a, b in zip(source.model.parameters(), target.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert target.step == 0 and target.consumed_samples == 0 and not target.optimizer.state
    meta = read_meta(latest_checkpoint(tmp_path / "src"))
    assert meta["step"] == 3 and meta["consumed_samples"] == 3 * 16


def test_model_mismatch_is_refused(tmp_path, shard):
    """Loading into a differently shaped model names the offending parameter."""
    make_trainer(*shard, tmp_path / "src", 1).fit()
    cfg = tiny_config(*shard)
    cfg.model.hidden_size = 64
    other = Trainer(cfg, SINGLE, tmp_path)
    with pytest.raises(CheckpointError, match=r"tok_emb.weight is \(257, 32\) there \(unsplit, unpadded\), but "
                                              r"\(257, 64\) in this model"):
        other.init_weights_from(checkpoint_weights(tmp_path / "src"))


def test_vocabulary_mismatch_is_refused_not_padded(tmp_path, shard):
    """A smaller vocabulary is not zero-padded into a larger model's real rows (padding is for padding rows only)."""
    make_trainer(*shard, tmp_path / "src", 1).fit()
    cfg = tiny_config(*shard)
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = 300, 64
    with pytest.raises(CheckpointError, match="257 vocabulary rows there, the model 300"):
        Trainer(cfg, SINGLE, tmp_path / "dst").init_weights_from(checkpoint_weights(tmp_path / "src"))


def test_resume_with_other_vocabulary_padding_keeps_every_real_row(tmp_path, shard):
    """A checkpoint of the unpadded vocabulary resumes into a padded one (make_vocab_size_divisible_by=64): every real
    row of the weights and AdamW moments is the saved one, the padding rows are zero."""
    saved = make_trainer(*shard, tmp_path / "src", 2)
    saved.fit()
    cfg = tiny_config(*shard)
    cfg.model.make_vocab_size_divisible_by = 64
    padded = Trainer(cfg, SINGLE, tmp_path / "dst")
    padded.resume(latest_checkpoint(tmp_path / "src"))
    assert padded.model[0].tok_emb.weight.shape[0] == 320 and saved.model[0].tok_emb.weight.shape[0] == 257
    saved_params = dict(saved.model.named_parameters())
    for name, p in padded.model.named_parameters():
        q = saved_params[name]
        ours, theirs = padded.optimizer.state[p], saved.optimizer.state[q]
        for a, b in [(p, q), (ours["exp_avg"], theirs["exp_avg"]), (ours["exp_avg_sq"], theirs["exp_avg_sq"])]:
            assert torch.equal(a[: b.shape[0]], b) and not a[b.shape[0]:].any(), name
        assert torch.equal(ours["step"], theirs["step"]), name


def test_resume_takes_hyperparameters_from_the_new_config(tmp_path, shard):
    """The AdamW moments come from the checkpoint, weight decay / betas / eps from the resuming run's config."""
    make_trainer(*shard, tmp_path, 2).fit()
    resumed = make_trainer(*shard, tmp_path, 4)
    resumed.cfg.optim.weight_decay, resumed.cfg.optim.beta2 = 0.0123, 0.9876
    resumed.resume(latest_checkpoint(tmp_path))
    decay, no_decay = resumed.optimizer.param_groups
    assert decay["weight_decay"] == 0.0123 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (resumed.cfg.optim.beta1, 0.9876)
    assert resumed.optimizer.state  # the moments were loaded
