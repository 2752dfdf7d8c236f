"""Checkpoints in the tensor-parallel layout: bit-exact resume, and weights that move between layouts.

One launch of 4 gloo ranks (TP2 x DP2, sequence parallel, dropout on) covers: crash and resume == uninterrupted;
its checkpoint merged into one single-device model gives the TP model's loss, and exported to transformers gives
that model's logits; a single-process checkpoint loaded into the TP2 model by `train.init_from` gathers back to
exactly the saved weights; the TP2 x DP2 checkpoint resumes as TP4 (and, in the parent, as one process) with
exactly the saved weights and AdamW moments.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import fill_defaults, validate
from engine.hf import export_checkpoint
from engine.inference import load_for_inference
from engine.parallel.state import ParallelState, init_parallel
from engine.training.checkpoint import checkpoint_weights, latest_checkpoint
from engine.training.trainer import Trainer, get_batch
from tests.distributed import run_ranks
from tests.test_checkpoint import CrashError, crash_at, losses_by_step
from tests.test_tensor_parallel_model import unsplit
from tests.test_trainer import tiny_config, write_pattern_shard

SINGLE = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))


def make_trainer(shard: str, cache: str, run_dir: Path, steps: int, state: ParallelState, **train) -> Trainer:
    """Llama with GQA, dropout 0.1 (so restored random state matters), on `state`'s layout with SP."""
    cfg = tiny_config(shard, cache, "llama", global_batch=8, micro=2)
    cfg.model.dropout, cfg.parallel.sequence_parallel = 0.1, True
    cfg.parallel.tp, cfg.parallel.dp = state.tp, state.dp
    cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.decay_steps = steps, 2, 10
    for k, v in train.items():
        setattr(cfg.train, k, v)
    fill_defaults(cfg, state.world_size)
    validate(cfg, state.world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, state, run_dir)


def first_batch_loss(trainer: Trainer) -> float:
    """The model's eval-mode loss on the first two training samples (the same on every rank)."""
    inputs, targets = get_batch(trainer.train_data, np.arange(2), trainer.device, trainer.cfg.model.vocab_size)
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(inputs, targets).item()


def whole_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW moment, unsplit and unpadded (the same on every rank); asserts the vocabulary
    padding rows of each are zero."""
    vocab, group = trainer.cfg.model.vocab_size, trainer.state.tp_group
    out = {}
    for name, p in trainer.model.named_parameters():
        state = trainer.optimizer.state[p]
        for key, t in [(name, p), (f"{name}.exp_avg", state["exp_avg"]), (f"{name}.exp_avg_sq", state["exp_avg_sq"])]:
            whole = unsplit(t, p, group, vocab=2**31)  # padding rows kept
            if getattr(p, "tp_vocab", False):
                assert not whole[vocab:].any(), f"{key}: padding rows not zero"
                whole = whole[:vocab]
            out[key] = whole
        out[f"{name}.step"] = state["step"].clone()
    return out


def tp_scenarios(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    state = init_parallel(2, 1, 2, torch.device("cpu"))
    base = Path(root)
    full = make_trainer(shard, cache, base / "full", 6, state)
    full_losses = losses_by_step(full.fit())
    crashed = make_trainer(shard, cache, base / "crash", 6, state, save_interval=2)
    crash_at(crashed, 4)
    with pytest.raises(CrashError):
        crashed.fit()
    resumed = make_trainer(shard, cache, base / "crash", 6, state, save_interval=2)
    resumed.resume(latest_checkpoint(base / "crash"))
    after_crash = losses_by_step(resumed.fit())
    # A single-process checkpoint (written by the parent) into this TP2 layout, weights only.
    init = make_trainer(shard, cache, base / "init", 1, state)
    init.init_weights_from(checkpoint_weights(base / "single"))
    vocab = init.cfg.model.vocab_size
    init_weights = {n: unsplit(p.detach(), p, state.tp_group, vocab) for n, p in init.model.named_parameters()}
    # The TP2 x DP2 checkpoint resumed as TP4 x DP1: Llama's 2 KV heads go from split to replicated, the
    # vocabulary padding from 258 to 260 rows.
    tp4 = make_trainer(shard, cache, base / "tp4", 6, init_parallel(4, 1, 1, torch.device("cpu")))
    tp4.resume(latest_checkpoint(base / "full"))
    return {"full": full_losses, "after_crash": after_crash, "tp_loss": first_batch_loss(full),
            "init_weights": init_weights, "full_state": whole_state(full), "tp4_state": whole_state(tp4),
            "tp4_loss": first_batch_loss(tp4)}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tpckpt")
    return write_pattern_shard(root / "shard"), str(root / "cache")


def test_tensor_parallel_checkpoints(tmp_path, shard):
    """Resume == uninterrupted (==) under TP2 x DP2 + SP + dropout; TP checkpoints merge into one model and
    single-device ones split into TP; a TP2 x DP2 checkpoint resumes as TP4 and as one process with every weight
    and AdamW moment exactly as saved."""
    single = make_trainer(*shard, tmp_path / "single", 2, SINGLE)
    single.fit()
    per_rank = run_ranks(4, tp_scenarios, *shard, str(tmp_path), timeout=600)
    # The TP run's checkpoint as one single-device model (as generate and export load it).
    merged, _, meta = load_for_inference(tmp_path / "full")
    assert meta["tp"] == 2 and merged.tok_emb.weight.shape[0] == merged.cfg.vocab_size  # padding dropped
    export_checkpoint(tmp_path / "full", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, merged.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, merged(tokens), rtol=1e-5, atol=1e-5)
    merged_trainer = make_trainer(*shard, tmp_path / "merged", 1, SINGLE)
    merged_trainer.model[0].load_state_dict(merged.state_dict())
    for rank, r in enumerate(per_rank):
        assert sorted(r["after_crash"]) == [3, 4, 5, 6]
        for step, loss in r["after_crash"].items():
            assert loss == r["full"][step], f"rank {rank} step {step}: {loss!r} != {r['full'][step]!r}"
        assert len(set(r["full"].values())) == len(r["full"])  # the losses move: equality is not trivial
        assert r["tp_loss"] == pytest.approx(first_batch_loss(merged_trainer), rel=1e-5)
        for name, p in single.model.named_parameters():
            torch.testing.assert_close(r["init_weights"][name], p.detach(), rtol=0, atol=0)
    # The saved TP2 x DP2 state, resumed by one process and by TP4: bit for bit the same.
    single_resumed = make_trainer(*shard, tmp_path / "single_resumed", 6, SINGLE)
    single_resumed.resume(latest_checkpoint(tmp_path / "full"))
    saved = per_rank[0]["full_state"]
    assert saved.keys() == per_rank[0]["tp4_state"].keys()
    for name, tensor in whole_state(single_resumed).items():
        assert torch.equal(tensor, saved[name]), f"TP2 x DP2 -> 1: {name}"
        for rank, r in enumerate(per_rank):
            assert torch.equal(r["tp4_state"][name], saved[name]), f"TP2 x DP2 -> TP4, rank {rank}: {name}"
    for r in per_rank:
        assert r["tp4_loss"] == pytest.approx(r["tp_loss"], rel=1e-5)
