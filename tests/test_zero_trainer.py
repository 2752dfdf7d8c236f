"""ZeRO through the trainer, on gloo ranks against one process (fp32, 10 steps, gradient accumulation): per-step
losses within 1e-5 relative and the final weights (read whole from each run's last checkpoint) within 1e-5, with
TP + SP, with PP (1F1B, tied embedding), at DP 2 and 4; the measured model-state bytes against the dry run's
prediction. Checkpoints: each DP rank writes its shard, a resume in the same layout is bit for bit, and another DP
size, ZeRO stage, TP or PP (or no ZeRO, or one process) resumes through the resharding reader; generation and
init_from read them. Stage 3 with full recomputation. (Mixed precision and offload: tests/test_zero_precision.py;
DeepSpeed as the oracle: tests/test_zero_deepspeed.py.)

The fast tier runs the hardest cases of each kind; `make test-slow` runs the full matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.inference import load_for_inference
from engine.training.checkpoint import (
    checkpoint_weights,
    checkpoints_dir,
    load_full_weights,
    read_meta,
    step_dir_name,
)
from engine.training.memory import estimate_memory
from engine.training.trainer import Trainer, get_batch
from tests.distributed import run_ranks
from tests.test_checkpoint import losses_by_step
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard

STEPS = 10
RTOL = 1e-5  # losses, relative: fp32 sums in another order
ATOL = 1e-5  # final weights


def make_trainer(shard: str, cache: str, run_dir: Path, tp: int = 1, pp: int = 1, dp: int = 1, stage: int = 0,
                 arch: str = "llama", steps: int = STEPS, save: int = 0, precision: str = "fp32",
                 recompute: str = "none", **parallel) -> Trainer:
    """A 2-layer model (llama untied, gpt2 tied), global batch 8 in micro-batches of 2: 2 accumulation steps at
    dp 2, SP with tp, 1F1B with pp; `parallel` sets other parallel.* keys."""
    cfg = tiny_config(shard, cache, arch, global_batch=8, micro=2, precision=precision)
    cfg.model.recompute = recompute
    p = cfg.parallel
    p.tp, p.pp, p.dp, p.zero_stage, p.sequence_parallel = tp, pp, dp, stage, tp > 1
    for key, value in parallel.items():
        setattr(p, key, value)
    cfg.train.steps, cfg.train.eval_interval, cfg.train.save_interval = steps, 0, save
    cfg.optim.lr, cfg.optim.clip_grad = 1e-3, 0.5  # clipping active: the norm must come from every shard
    return start_trainer(cfg, run_dir)


def case_name(tp: int, pp: int, dp: int, stage: int, arch: str) -> str:
    return f"{arch} tp{tp} pp{pp} dp{dp} stage{stage}"


def train_cases(rank: int, world_size: int, shard: str, cache: str, root: str, cases: list[tuple]) -> dict:
    """Each case's losses, and the last record's measured and predicted model-state bytes on this rank."""
    out = {}
    for case in cases:
        tp, pp, dp, stage, arch = case
        trainer = make_trainer(shard, cache, Path(root) / case_name(*case), tp, pp, dp, stage, arch)
        records = trainer.fit()
        predicted = estimate_memory(trainer.cfg)[trainer.state.pp_rank]["model_state_bytes"][stage]
        measured = [r["model_state_bytes"] for r in records if "model_state_bytes" in r][-1]  # last training row
        out[case_name(*case)] = (losses_by_step(records), measured, predicted)
    return out


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("zero")
    return write_pattern_shard(root / "shard"), str(root / "cache")


@pytest.fixture(scope="module")
def references(shard, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """One process, no ZeRO: each architecture's losses and final weights."""
    root = tmp_path_factory.mktemp("zero_ref")
    out = {}
    for arch in ("llama", "gpt2"):
        losses = losses_by_step(make_trainer(*shard, root / arch, arch=arch).fit())
        out[arch] = (losses, load_full_weights(root / arch))
    return out


def check_cases(root: Path, results: list[dict], cases: list[tuple], references: dict) -> None:
    for case in cases:
        name = case_name(*case)
        ref_losses, ref_weights = references[case[-1]]
        for rank, r in enumerate(results):
            losses, measured, predicted = r[name]
            assert sorted(losses) == list(range(1, STEPS + 1)), name
            np.testing.assert_allclose([losses[s] for s in ref_losses], list(ref_losses.values()), rtol=RTOL,
                                       err_msg=f"{name}, rank {rank}")
            # The prediction rounds shards up per rank, not per bucket: a few padding elements apart.
            assert abs(measured - predicted) <= 0.01 * predicted, f"{name}, rank {rank}: {measured} vs {predicted}"
        weights = load_full_weights(root / name)
        assert weights.keys() == ref_weights.keys()
        for key, value in ref_weights.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=ATOL, msg=f"{name}: {key}")


FAST = [(2, 1, 2, 3, "llama"), (1, 2, 2, 2, "gpt2"), (1, 2, 2, 3, "gpt2"), (1, 1, 4, 1, "llama")]
FULL = ([(1, 1, dp, stage, "llama") for dp in (2, 4) for stage in (0, 1, 2, 3)]
        + [(2, 1, 2, stage, "llama") for stage in (1, 2)] + [(1, 2, 2, 1, "gpt2"), (2, 2, 1, 3, "gpt2")])


def test_zero_trains_like_one_process(tmp_path, shard, references):
    """Stage 3 with TP 2 + SP, stages 2 and 3 with PP 2 (tied embedding), stage 1 at DP 4."""
    results = run_ranks(4, train_cases, *shard, str(tmp_path), FAST, timeout=600)
    check_cases(tmp_path, results, FAST, references)


@pytest.mark.slow
def test_zero_trains_like_one_process_full_matrix(tmp_path, shard, references):
    """Stages 0-3 at DP 2 and 4; stages 1 and 2 with TP 2; stage 1 with PP 2; stage 3 with TP 2 x PP 2."""
    by_world: dict[int, list[tuple]] = {}
    for case in FULL:
        by_world.setdefault(case[0] * case[1] * case[2], []).append(case)
    for world, cases in by_world.items():
        check_cases(tmp_path, run_ranks(world, train_cases, *shard, str(tmp_path), cases, timeout=900), cases,
                    references)


def recomputed(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict[int, float]:
    trainer = make_trainer(shard, cache, Path(root) / "recompute", dp=2, stage=3, recompute="full")
    return losses_by_step(trainer.fit())


def test_zero_stage3_with_full_recomputation(tmp_path, shard, references):
    """Stage 3 with full recomputation: the recomputed forward runs on the parameters gathered for backward."""
    ref_losses, ref_weights = references["llama"]
    for losses in run_ranks(2, recomputed, *shard, str(tmp_path), timeout=600):
        np.testing.assert_allclose([losses[s] for s in ref_losses], list(ref_losses.values()), rtol=RTOL)
    weights = load_full_weights(tmp_path / "recompute")
    for key, value in ref_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=ATOL, msg=key)


# ----------------------------------------------------------------------------------------------- checkpoints
CKPT_STEPS, SAVED = 6, 3
SAVING = dict(tp=2, dp=2, stage=3)  # the layout that writes the ZeRO checkpoint


def resumed(trainer: Trainer, step_dir: Path) -> dict[int, float]:
    trainer.resume(step_dir)
    return losses_by_step(trainer.fit())


def saving_layout(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    """tp2 x dp2 at stage 3: the run saving at step 3, then the same layout resumed from it."""
    base = Path(root)
    full = losses_by_step(make_trainer(shard, cache, base / "full", steps=CKPT_STEPS, save=SAVED, **SAVING).fit())
    step = checkpoints_dir(base / "full") / step_dir_name(SAVED)
    again = resumed(make_trainer(shard, cache, base / "again", steps=CKPT_STEPS, **SAVING), step)
    return {"full": full, "again": again}


def other_layouts(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    """The ZeRO checkpoint resumed at DP 4 stage 1 and as PP 2 x DP 2 stage 2; the one-process replicated
    checkpoint resumed at DP 4 stage 3."""
    base = Path(root)
    zero_step = checkpoints_dir(base / "full") / step_dir_name(SAVED)
    plain_step = checkpoints_dir(base / "plain") / step_dir_name(SAVED)
    return {
        "dp4 stage1": resumed(make_trainer(shard, cache, base / "dp4", dp=4, stage=1, steps=CKPT_STEPS), zero_step),
        "pp2 dp2 stage2": resumed(make_trainer(shard, cache, base / "pp2", pp=2, dp=2, stage=2, steps=CKPT_STEPS),
                                  zero_step),
        "from replicated, dp4 stage3": resumed(make_trainer(shard, cache, base / "dp4s3", dp=4, stage=3,
                                                            steps=CKPT_STEPS), plain_step),
    }


@pytest.mark.slow  # ZeRO checkpoints also resume in the fast tier (test_zero_precision, test_checkpoint_integrity)
def test_zero_checkpoints_resume_bitwise_and_reshard(tmp_path, shard):
    """Per-DP-rank shard files; same layout bit for bit; other DP sizes, stages, PP and no ZeRO within 1e-5;
    read whole for generation, and as init_from."""
    first = run_ranks(4, saving_layout, *shard, str(tmp_path), timeout=600)
    full = first[0]["full"]
    assert sorted(full) == list(range(1, CKPT_STEPS + 1)) and len(set(full.values())) == CKPT_STEPS
    expected = {s: full[s] for s in range(SAVED + 1, CKPT_STEPS + 1)}
    for rank, r in enumerate(first):
        assert r["again"] == expected, f"same layout, rank {rank}"
    step = checkpoints_dir(tmp_path / "full") / step_dir_name(SAVED)
    meta = read_meta(step)
    assert (meta["tp"], meta["dp"], meta["zero_stage"], meta["format"]) == (2, 2, 3, 3)
    assert sorted(f for f in meta["files"] if f.startswith("optimizer-")) == [
        f"optimizer-pp00-tp{t:02d}-dp{d:02d}.safetensors" for t in range(2) for d in range(2)]

    # One process without ZeRO reads the shards; a replicated run saves the checkpoint the next launch reshards.
    one = resumed(make_trainer(*shard, tmp_path / "one", steps=CKPT_STEPS), step)
    np.testing.assert_allclose(list(one.values()), list(expected.values()), rtol=RTOL, err_msg="as one process")
    plain = losses_by_step(make_trainer(*shard, tmp_path / "plain", steps=CKPT_STEPS, save=SAVED).fit())
    np.testing.assert_allclose([plain[s] for s in full], list(full.values()), rtol=RTOL, err_msg="no ZeRO")
    for rank, r in enumerate(run_ranks(4, other_layouts, *shard, str(tmp_path), timeout=600)):
        for layout, losses in r.items():
            want = expected if layout != "from replicated, dp4 stage3" else {s: plain[s] for s in expected}
            assert sorted(losses) == sorted(want), f"{layout}, rank {rank}"
            np.testing.assert_allclose(list(losses.values()), list(want.values()), rtol=RTOL,
                                       err_msg=f"{layout}, rank {rank}")

    # Whole, as tools/generate.py and tools/export_hf.py load it: the same model as a resume reads.
    model, _, _ = load_for_inference(step)
    reference = make_trainer(*shard, tmp_path / "ref")
    reference.resume(step)
    inputs, targets = get_batch(reference.train_data, np.arange(2), torch.device("cpu"), model.cfg.vocab_size)
    with torch.no_grad():
        assert model.eval()(inputs, targets).item() == reference.model.eval()(inputs, targets).item()
    # init_from into a ZeRO run (one rank, stage 1): the weights land in the masters and the parameters.
    target = make_trainer(*shard, tmp_path / "init", stage=1)
    target.init_weights_from(checkpoint_weights(step))
    whole = load_full_weights(step)
    for name, p in target.model.named_parameters():
        assert torch.equal(p, whole[name]), name


@pytest.mark.slow
def test_bench_zero_runs():
    """tools/bench_zero.py --cpu-quick prints every stage's row, the hidden share and the offload line."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(repo / "tools" / "bench_zero.py"), "--cpu-quick", "--no-deepspeed"],
                       capture_output=True, text=True, timeout=600, cwd=repo)
    assert r.returncode == 0, r.stderr
    for line in [f"weft stage {s} " for s in range(4)] + ["stage 2: off", "offload (stage 2)", "stepped by"]:
        assert line in r.stdout, line
