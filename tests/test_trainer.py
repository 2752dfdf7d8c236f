"""The trainer: data parallel == one process, and the run directory, schedule and metrics it produces."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import Config, fill_defaults, validate
from engine.data.indexed_dataset import IndexedDatasetBuilder
from engine.parallel.state import ParallelState, init_parallel
from engine.training.trainer import Trainer
from tests.distributed import run_ranks

STEPS = 10
# fp32 on CPU: DP changes only the order of floating-point sums (gradient all-reduce, loss averaging).
LOSS_RTOL = 1e-5


def write_pattern_shard(prefix: Path, vocab: int = 257, docs: int = 200, seed: int = 0) -> str:
    """Documents that count up from a random start in a random small stride: learnable, so the loss must fall."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(docs):
            n, start, stride = int(rng.integers(5, 200)), int(rng.integers(vocab)), int(rng.integers(1, 4))
            b.add_document((start + stride * np.arange(n)) % vocab)
    return str(prefix)


def tiny_config(shard: str, cache: str, arch: str = "gpt2", global_batch: int = 16, micro: int = 2,
                precision: str = "fp32", dp: int = 1) -> Config:
    """A 2-layer model on the random shard, evaluated on its validation split."""
    cfg = Config()
    cfg.model.arch, cfg.model.name, cfg.model.num_layers = arch, f"{arch}_test", 2
    cfg.model.hidden_size, cfg.model.num_heads, cfg.model.vocab_size, cfg.model.max_seq_len = 32, 4, 257, 64
    if arch == "llama":
        cfg.model.num_kv_heads = 2
    cfg.data.prefix, cfg.data.split, cfg.data.cache_dir, cfg.data.tokenizer = shard, "90,10,0", cache, "byte"
    cfg.train.steps, cfg.train.seq_len, cfg.train.global_batch_size = STEPS, 32, global_batch
    cfg.train.micro_batch_size, cfg.train.precision, cfg.train.eval_iters = micro, precision, 1
    cfg.train.eval_interval, cfg.train.log_interval = 5, 1
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 2
    cfg.logging.console = False
    cfg.parallel.dp = dp
    fill_defaults(cfg, dp)
    validate(cfg, dp)
    return cfg


def start_trainer(cfg: Config, run_dir: Path) -> Trainer:
    """Validate `cfg` for its tp x pp x dp layout and build its Trainer (gloo process groups when world > 1)."""
    p = cfg.parallel
    world = p.tp * p.pp * p.dp
    fill_defaults(cfg, world)
    validate(cfg, world)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = (init_parallel(p.tp, p.pp, p.dp, torch.device("cpu"), timeout_s=120,
                           checkpoint_group=cfg.train.async_save) if world > 1
             else ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu")))
    return Trainer(cfg, state, run_dir)


def train_losses(cfg: Config, run_dir: str, state: ParallelState | None = None) -> tuple[list[float], list[float]]:
    """Per-step training losses and the evaluation losses of one run."""
    state = state or ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    records = Trainer(cfg, state, run_dir).fit()
    return ([r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r])


def dp_rank_losses(rank: int, world_size: int, shard: str, cache: str, run_dir: str, global_batch: int,
                   micro: int, arch: str) -> tuple[list[float], list[float]]:
    cfg = tiny_config(shard, cache, arch, global_batch, micro, dp=world_size)
    state = init_parallel(1, 1, world_size, torch.device("cpu"))
    return train_losses(cfg, run_dir, state)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("dp")
    return write_pattern_shard(root / "shard"), str(root / "cache")


# (world, global batch, micro batch, arch): with and without gradient accumulation on every DP size.
DP_CASES = [(2, 16, 2, "gpt2"), (2, 8, 4, "llama"), pytest.param(4, 16, 2, "llama", marks=pytest.mark.slow),
            (4, 8, 2, "gpt2")]


@pytest.mark.parametrize(("world", "global_batch", "micro", "arch"), DP_CASES)
def test_data_parallel_matches_one_process(tmp_path, shard, world, global_batch, micro, arch):
    """DP=2/4 with the same global batch gives the single-process per-step losses (rtol 1e-5), eval included."""
    prefix, cache = shard
    ref_train, ref_val = train_losses(tiny_config(prefix, cache, arch, global_batch, micro), str(tmp_path / "ref"))
    per_rank = run_ranks(world, dp_rank_losses, prefix, cache, str(tmp_path / "dp"), global_batch, micro, arch)
    accumulation = global_batch // (micro * world)
    assert len(ref_train) == STEPS and ref_train[-1] < ref_train[0]
    for rank, (losses, val) in enumerate(per_rank):
        np.testing.assert_allclose(losses, ref_train, rtol=LOSS_RTOL, err_msg=f"rank {rank}, accum {accumulation}")
        np.testing.assert_allclose(val, ref_val, rtol=LOSS_RTOL)
    metrics = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics if "loss" in m] == per_rank[0][0]  # full precision in the file


def test_metrics_file_contract(tmp_path, shard):
    """metrics.jsonl: every step line carries the contract's fields; eval lines at step 0, every interval, the end."""
    prefix, cache = shard
    cfg = tiny_config(prefix, cache)
    train_losses(cfg, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [0, 5, 10]
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples", "tokens_seen", "mfu"} <= set(r)
        assert r["consumed_samples"] == r["step"] * cfg.train.global_batch_size
        assert r["tokens_seen"] == r["consumed_samples"] * cfg.train.seq_len
        assert r["mfu"] is None  # CPU: no peak known, never a guess
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, shard, precision):
    """bf16 and fp16 autocast runs stay close to fp32 for the first steps and keep fp32 parameters."""
    prefix, cache = shard
    ref, _ = train_losses(tiny_config(prefix, cache), str(tmp_path / "fp32"))
    cfg = tiny_config(prefix, cache, precision=precision)
    state = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    (tmp_path / precision).mkdir()
    trainer = Trainer(cfg, state, tmp_path / precision)
    losses = [r["loss"] for r in trainer.fit() if "loss" in r]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(math.isfinite(x) for x in losses)
    np.testing.assert_allclose(losses[:3], ref[:3], rtol=2e-2)
    assert trainer.skipped_steps == 0


def test_gradient_accumulation_matches_a_big_micro_batch(tmp_path, shard):
    """Accumulating 8 micro-batches of 2 equals one micro-batch of 16 (the global-batch mean is the same)."""
    prefix, cache = shard
    a, _ = train_losses(tiny_config(prefix, cache, global_batch=16, micro=2), str(tmp_path / "a"))
    b, _ = train_losses(tiny_config(prefix, cache, global_batch=16, micro=16), str(tmp_path / "b"))
    np.testing.assert_allclose(a, b, rtol=LOSS_RTOL)


def test_dp_no_allreduce_on_accumulation_steps(monkeypatch, tmp_path, shard):
    """Gradients are all-reduced once per optimizer step, never on gradient-accumulation micro-steps."""
    prefix, cache = shard
    launches = run_ranks(2, count_allreduce_launches, prefix, cache, str(tmp_path))
    for per_step, buckets in launches:
        assert per_step == buckets  # each bucket exactly once per step, though 4 micro-batches ran


def count_allreduce_launches(rank: int, world_size: int, shard: str, cache: str, run_dir: str) -> tuple[int, int]:
    import torch.distributed as dist

    cfg = tiny_config(shard, cache, global_batch=16, micro=2, dp=world_size)
    state = init_parallel(1, 1, world_size, torch.device("cpu"))
    os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(cfg, state, run_dir)
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        trainer.train_step()
    finally:
        dist.all_reduce = original
    gradient_calls = [n for n in calls if n > 2]  # the loss average is a scalar, the non-finite vote two flags
    return len(gradient_calls), len(trainer.grad_syncs[0].buckets)


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path, shard):
    """fp16 loss scaling: a step whose gradients overflow is skipped (parameters untouched) and counted."""
    prefix, cache = shard
    cfg = tiny_config(prefix, cache, precision="fp16")
    state = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    trainer = Trainer(cfg, state, tmp_path)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    hook = trainer.model[0].blocks["0"].mlp.register_full_backward_hook(
        lambda module, grad_in, grad_out: tuple(torch.full_like(g, float("inf")) if g is not None else g
                                                for g in grad_in))
    trainer.train_step()
    hook.remove()
    assert trainer.skipped_steps == 1
    for a, b in zip(before, trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    trainer.train_step()
    assert trainer.skipped_steps == 1  # the scaler backed off and training goes on
    assert trainer.nonfinite_steps == 0  # an overflow is the scaler's, not a numerical fault


def test_profile_steps_write_a_trace(tmp_path, shard):
    """train.profile_steps writes a torch profiler trace for exactly the chosen steps."""
    prefix, cache = shard
    cfg = tiny_config(prefix, cache)
    cfg.train.steps, cfg.train.profile_steps = 3, [2]
    train_losses(cfg, str(tmp_path))
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert traces == ["step2.trace.json"]
    assert '"traceEvents"' in (tmp_path / "profile" / "step2.trace.json").read_text()[:2000]


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path, shard):
    """train.compile=true (torch.compile per block) gives the eager losses (rtol 1e-4; ~1 min to compile on CPU)."""
    prefix, cache = shard
    eager, _ = train_losses(tiny_config(prefix, cache), str(tmp_path / "eager"))
    cfg = tiny_config(prefix, cache)
    cfg.train.compile = True
    compiled, _ = train_losses(cfg, str(tmp_path / "compiled"))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    # Blocks are compiled in place: parameter names - and so checkpoints - are the plain model's.
    state = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    names = [n for n, _ in Trainer(cfg, state, tmp_path / "compiled").model.named_parameters()]
    assert not any("_orig_mod" in n for n in names)
