"""Pipeline parallelism trained by the real Trainer equals the single-process run: the initial weights exactly,
per-step losses, gradient norms, evaluation, and every parameter's gradient after step 1 (each stage's, gathered
over its TP group), for every schedule, uneven and interleaved splits, tied embeddings, dropout and 3D layouts.

Cases are grouped so that one launch of gloo ranks runs several (starting ranks dominates the cost). `make test`
runs a representative subset; `make test-slow` the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.config import fill_defaults, validate
from engine.parallel.state import ParallelState, init_parallel
from engine.training.memory import estimate_memory
from engine.training.reshard import checkpoint_name
from engine.training.trainer import Trainer
from tests.distributed import run_ranks
from tests.test_tensor_parallel_model import assert_same_run, unsplit
from tests.test_trainer import STEPS, tiny_config, write_pattern_shard


@dataclass(frozen=True)
class Case:
    """One pipeline layout and model to compare against the single-process run."""

    arch: str
    pp: int
    schedule: str = "1f1b"
    tp: int = 1
    dp: int = 1
    sp: bool = False
    virtual: int = 1
    layers: int = 4
    split: tuple[int, ...] | None = None  # parallel.pipeline_layers
    micro_batches: int = 4  # per DP rank per step
    dropout: float = 0.0
    recompute: str = "none"

    @property
    def world(self) -> int:
        """Ranks the case needs."""
        return self.tp * self.pp * self.dp


def case_config(case: Case, shard: str, cache: str, layout: bool):
    """tiny_config for the case's model: on its layout, or (layout=False) in one process."""
    micro = 2
    cfg = tiny_config(shard, cache, case.arch, global_batch=micro * case.micro_batches * case.dp, micro=micro)
    cfg.model.num_layers, cfg.model.dropout, cfg.model.recompute = case.layers, case.dropout, case.recompute
    # tiny_config's lr 1e-2 makes these deeper models' steps chaotic, and chaos amplifies fp32 summation-order
    # rounding (TP partial sums, stage-wise norms) past 1e-5 by step 10 (2e-5 seen); this still learns in 10 steps.
    cfg.optim.lr = 1e-3
    p = cfg.parallel
    if layout:
        p.tp, p.pp, p.dp, p.sequence_parallel = case.tp, case.pp, case.dp, case.sp
        p.pipeline_schedule, p.virtual_stages = case.schedule, case.virtual
        p.pipeline_layers = list(case.split) if case.split else None
    else:
        p.dp = 1
    world = case.world if layout else 1
    fill_defaults(cfg, world)
    validate(cfg, world)
    return cfg


def run_case(case: Case, shard: str, cache: str, run_dir: str, state: ParallelState, layout: bool) -> dict:
    """Train STEPS steps; step-1 gradients and initial weights (by saved name), every step's loss and norm, eval."""
    cfg = case_config(case, shard, cache, layout)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, state, run_dir)
    vocab = cfg.model.vocab_size
    named = [(checkpoint_name(n, p), p) for n, p in trainer.model.named_parameters()]
    initial = {n: unsplit(p, p, state.tp_group, vocab) for n, p in named}
    first_loss = trainer.compute_gradients()
    in_flight = trainer.last_step_stats.max_in_flight
    grads = {n: unsplit(p.grad, p, state.tp_group, vocab) for n, p in named}
    _, first_norm = trainer.apply_gradients(first_loss)
    losses, norms = [first_loss], [first_norm]
    for _ in range(STEPS - 1):
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    tied = {n: unsplit(p, p, state.tp_group, vocab) for n, p in named if n == "tok_emb.weight"}
    plan = estimate_memory(cfg)[state.pp_rank]  # what the dry run predicts for this rank
    held = sum(p.numel() for p in trainer.model.parameters())
    return {"losses": losses, "norms": norms, "val": trainer.evaluate()["val_loss"], "grads": grads,
            "initial": initial, "tied": tied, "in_flight": in_flight, "pp_rank": state.pp_rank,
            "params": (held, plan["parameters"]), "in_flight_planned": plan["activations_in_flight"]}


def rank_cases(rank: int, world_size: int, cases: list[Case], shard: str, cache: str, run_dir: str) -> list[dict]:
    """Every case in this launch (each on its own mesh of the same world)."""
    out = []
    for i, case in enumerate(cases):
        state = init_parallel(case.tp, case.pp, case.dp, torch.device("cpu"), timeout_s=120)
        out.append(run_case(case, shard, cache, f"{run_dir}/{i}", state, layout=True))
    return out


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("pp")
    return write_pattern_shard(root / "shard"), str(root / "cache")


def compare(cases: list[Case], world: int, shard, tmp_path) -> None:
    """Run `cases` on `world` ranks and each against its single-process reference."""
    prefix, cache = shard
    per_rank = run_ranks(world, rank_cases, cases, prefix, cache, str(tmp_path / "pp"), timeout=900)
    for i, case in enumerate(cases):
        one = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
        ref = run_case(case, prefix, cache, str(tmp_path / f"ref{i}"), one, layout=False)
        assert ref["losses"][-1] < ref["losses"][0]  # it learns, so the comparison is not between constants
        seen: set[str] = set()
        tied = [r[i]["tied"]["tok_emb.weight"] for r in per_rank if r[i]["tied"]]
        assert all(torch.equal(t, tied[0]) for t in tied), f"{case}: a tied embedding's copies drifted apart"
        for rank, results in enumerate(per_rank):
            got = results[i]
            msg = f"{case}, rank {rank}"
            assert_same_run(got, ref, msg)  # each stage's parameters: its initial weights and gradients
            seen |= set(got["grads"])
            assert got["params"][0] == got["params"][1], f"{msg}: parameters held vs counted by the dry run"
            assert got["in_flight"] == got["in_flight_planned"], f"{msg}: the dry run's activations in flight"
            if got["pp_rank"] == 0 and case.pp > 1:  # activations held at once on the first stage
                m = case.micro_batches
                limit = {"gpipe": m, "1f1b": min(case.pp, m)}.get(case.schedule)
                if limit is not None:
                    assert got["in_flight"] == limit, msg
        assert seen == set(ref["grads"]), f"{case}: the stages together hold every parameter"


# make test: every schedule, tied embeddings with dropout, 1F1B with m not a multiple of pp, an uneven split,
# interleaved chunks, GQA, and the 8-rank 3D layout with SP.
FAST_TWO = [Case("gpt2", 2, "1f1b", micro_batches=3, dropout=0.1),
            Case("llama", 2, "interleaved_1f1b", virtual=2, micro_batches=4)]
FAST_THREE = [Case("llama", 3, "gpipe", layers=4, split=(1, 2, 1), micro_batches=3, recompute="full")]
FAST_EIGHT = [Case("gpt2", 2, "1f1b", tp=2, dp=2, sp=True, micro_batches=3)]


def test_pipeline_two_ranks(shard, tmp_path):
    """pp 2: GPT-2 (tied, dropout 0.1) 1F1B over 3 micro-batches; Llama GQA interleaved over 2 chunks per rank."""
    compare(FAST_TWO, 2, shard, tmp_path)


def test_pipeline_uneven_three_stages(shard, tmp_path):
    """pp 3 split [1, 2, 1], GPipe, full recomputation."""
    compare(FAST_THREE, 3, shard, tmp_path)


@pytest.mark.slow  # 8 ranks; the fast tier trains this layout in tests/test_fault_tolerance.py
def test_pipeline_3d_eight_ranks(shard, tmp_path):
    """tp 2 x pp 2 x dp 2 with sequence parallelism on 8 ranks."""
    compare(FAST_EIGHT, 8, shard, tmp_path)


SLOW_TWO = [Case(arch, 2, schedule, micro_batches=m, dropout=0.1 if arch == "gpt2" else 0.0)
            for arch in ("gpt2", "llama") for schedule in ("gpipe", "1f1b") for m in (2, 3, 4)] + \
           [Case(arch, 2, "interleaved_1f1b", virtual=2, micro_batches=m, dropout=0.1)
            for arch in ("gpt2", "llama") for m in (2, 4)]
SLOW_FOUR = [Case(arch, 4, schedule, micro_batches=m) for arch in ("gpt2", "llama") for schedule in ("gpipe", "1f1b")
             for m in (3, 4, 8)] + \
            [Case("gpt2", 4, "interleaved_1f1b", virtual=2, layers=8, micro_batches=4, dropout=0.1),
             Case("llama", 2, "1f1b", tp=2, sp=True, micro_batches=3),
             Case("gpt2", 2, "1f1b", dp=2, micro_batches=2, dropout=0.1),
             Case("llama", 4, "1f1b", layers=6, split=(2, 1, 1, 2), micro_batches=5, recompute="selective")]
SLOW_EIGHT = [Case(arch, 2, schedule, tp=2, dp=2, sp=sp, micro_batches=3)
              for arch in ("gpt2", "llama") for schedule in ("gpipe", "1f1b") for sp in (False, True)] + \
             [Case("llama", 2, "interleaved_1f1b", tp=2, dp=2, sp=True, virtual=2, micro_batches=2)]


@pytest.mark.slow
def test_pipeline_matrix_two_ranks(shard, tmp_path):
    """pp 2: both architectures, GPipe and 1F1B over 2-4 micro-batches, interleaved."""
    compare(SLOW_TWO, 2, shard, tmp_path)


@pytest.mark.slow
def test_pipeline_matrix_four_ranks(shard, tmp_path):
    """pp 4 (GPipe, 1F1B, interleaved), pp2 x tp2 with SP, pp2 x dp2, an uneven four-stage split."""
    compare(SLOW_FOUR, 4, shard, tmp_path)


@pytest.mark.slow
def test_pipeline_matrix_eight_ranks(shard, tmp_path):
    """tp 2 x pp 2 x dp 2: both architectures, both schedules, SP off and on, interleaved."""
    compare(SLOW_EIGHT, 8, shard, tmp_path)


def fp16_overflow_on_one_stage(rank: int, world_size: int, shard: str, cache: str, run_dir: str) -> dict:
    """pp 2 in fp16: the first stage's gradients overflow in step 2 (nothing carries that to the last stage, whose
    own gradients stay finite); returns what each rank then did."""
    cfg = case_config(Case("llama", 2, "1f1b"), shard, cache, layout=True)
    cfg.train.precision = "fp16"
    state = init_parallel(1, 2, 1, torch.device("cpu"), timeout_s=120)
    trainer = Trainer(cfg, state, run_dir)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    scale = trainer.scaler.scale_value
    hooks = []
    if state.pp_rank == 0:  # only this stage sees the overflow
        block = next(iter(trainer.model[0].blocks.values()))
        hooks.append(block.mlp.register_full_backward_hook(
            lambda module, grad_in, grad_out: tuple(torch.full_like(g, float("inf")) if g is not None else g
                                                    for g in grad_in)))
    trainer.train_step()
    for h in hooks:
        h.remove()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    return {"skipped": trainer.skipped_steps, "unchanged": unchanged, "scale": (scale, trainer.scaler.scale_value)}


def test_fp16_overflow_on_one_stage_skips_the_step_everywhere(shard, tmp_path):
    """The overflow decision is world-wide: a stage whose own gradients are finite still skips the step and backs
    off its scale with the others."""
    per_rank = run_ranks(2, fp16_overflow_on_one_stage, *shard, str(tmp_path), timeout=300)
    for rank, r in enumerate(per_rank):
        assert r["skipped"] == 1 and r["unchanged"], f"rank {rank}: {r}"
        assert r["scale"][1] == r["scale"][0] / 2, f"rank {rank}: {r}"
