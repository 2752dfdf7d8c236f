"""Checkpoints in pipeline layouts: each (pp, tp) rank writes its own shards, and a pp2 x tp2 checkpoint resumes
bit for bit in its own layout and, within 1e-5 of the uninterrupted run's losses, as one process and (slow tier)
as pp4 x dp2 and as tp4 x pp2; it also reads as one whole model (generate, export) with the tied embedding once.

GPT-2 with tied embeddings and dropout 0.1: the embedding's copy on the last stage, and masks that follow samples
rather than ranks, are what a layout change could break.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.hf import export_checkpoint
from engine.inference import load_for_inference
from engine.model.gpt import parameter_names
from engine.training.checkpoint import checkpoints_dir, read_meta, step_dir_name
from engine.training.trainer import Trainer, get_batch
from tests.distributed import run_ranks
from tests.test_checkpoint import losses_by_step
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard

STEPS, SAVED = 6, 3
RTOL = 1e-5  # fp32: another layout sums in another order


def make_trainer(shard: str, cache: str, run_dir: Path, tp: int, pp: int, dp: int) -> Trainer:
    """GPT-2, 4 layers, tied, dropout 0.1, global batch 8 in micro-batches of 2, on a (tp, pp, dp) layout."""
    cfg = tiny_config(shard, cache, "gpt2", global_batch=8, micro=2)
    cfg.model.num_layers, cfg.model.dropout = 4, 0.1
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp = tp, pp, dp
    cfg.train.steps, cfg.train.save_interval, cfg.train.eval_interval = STEPS, SAVED, 0
    cfg.optim.warmup_steps, cfg.optim.decay_steps = 2, 10
    return start_trainer(cfg, run_dir)


def resumed_losses(trainer: Trainer, saved_run: Path) -> dict[int, float]:
    """Resume `trainer` from `saved_run`'s step-3 checkpoint and train to the end."""
    trainer.resume(checkpoints_dir(saved_run) / step_dir_name(SAVED))
    return losses_by_step(trainer.fit())


def saving_layout(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    """pp2 x tp2: the uninterrupted run (saving at step 3), then the same layout resumed from step 3."""
    base = Path(root)
    full = losses_by_step(make_trainer(shard, cache, base / "full", 2, 2, 1).fit())
    again = resumed_losses(make_trainer(shard, cache, base / "again", 2, 2, 1), base / "full")
    return {"full": full, "again": again}


def other_layouts(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    """The pp2 x tp2 checkpoint resumed as pp4 x dp2 and as tp4 x pp2."""
    base = Path(root)
    return {"pp4_dp2": resumed_losses(make_trainer(shard, cache, base / "pp4", 1, 4, 2), base / "full"),
            "tp4_pp2": resumed_losses(make_trainer(shard, cache, base / "tp4", 4, 2, 1), base / "full")}


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ppckpt")
    return write_pattern_shard(root / "shard"), str(root / "cache")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shard) -> tuple[Path, list[dict]]:
    """The pp2 x tp2 run that saved at step 3, and each rank's losses (uninterrupted, resumed in its layout)."""
    root = tmp_path_factory.mktemp("saved")
    return root, run_ranks(4, saving_layout, *shard, str(root), timeout=600)


def test_pipeline_checkpoints_resume_in_any_layout(tmp_path, shard, saved):
    """pp2 x tp2 -> itself (bit for bit) and one process (within 1e-5); read whole."""
    root, first = saved
    full = first[0]["full"]
    assert sorted(full) == list(range(1, STEPS + 1)) and len(set(full.values())) == STEPS
    for rank, r in enumerate(first):
        assert r["again"] == {s: full[s] for s in range(SAVED + 1, STEPS + 1)}, f"same layout, rank {rank}"
    step = checkpoints_dir(root / "full") / step_dir_name(SAVED)
    meta = read_meta(step)
    assert (meta["tp"], meta["pp"], meta["dp"]) == (2, 2, 1)
    assert sorted(f for f in meta["files"] if f.startswith("model-")) == [
        f"model-pp{p:02d}-tp{t:02d}.safetensors" for p in range(2) for t in range(2)]

    expected = {s: full[s] for s in range(SAVED + 1, STEPS + 1)}
    one = resumed_losses(make_trainer(*shard, tmp_path / "one", 1, 1, 1), root / "full")
    np.testing.assert_allclose(list(one.values()), list(expected.values()), rtol=RTOL, err_msg="as one process")
    assert sorted(one) == sorted(expected)

    # As one whole model (what tools/generate.py and tools/export_hf.py load): every name once, the tied head
    # the embedding, and the same loss as the one-process resume's model at the checkpoint.
    model, _, _ = load_for_inference(step)
    assert {n for n, _ in model.named_parameters()} == parameter_names(model.cfg)
    assert model.head.weight is model.tok_emb.weight
    reference = make_trainer(*shard, tmp_path / "ref", 1, 1, 1)
    reference.resume(step)
    inputs, targets = get_batch(reference.train_data, np.arange(2), torch.device("cpu"), model.cfg.vocab_size)
    with torch.no_grad():
        assert model.eval()(inputs, targets).item() == reference.model.eval()(inputs, targets).item()
    export_checkpoint(step, tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(inputs).logits, model(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pipeline_checkpoints_resume_as_other_pipeline_layouts(shard, saved):
    """The pp2 x tp2 checkpoint resumed as pp4 x dp2 and as tp4 x pp2 (8 ranks), within 1e-5."""
    root, first = saved
    full = first[0]["full"]
    expected = {s: full[s] for s in range(SAVED + 1, STEPS + 1)}
    for rank, r in enumerate(run_ranks(8, other_layouts, *shard, str(root), timeout=600)):
        for layout, losses in r.items():
            assert sorted(losses) == sorted(expected), f"{layout}, rank {rank}"
            np.testing.assert_allclose(list(losses.values()), list(expected.values()), rtol=RTOL,
                                       err_msg=f"{layout}, rank {rank}")
