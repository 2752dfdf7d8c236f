"""Dropout streams under tensor parallelism: per-rank where the data differs, reproducible under recomputation.

(That dropout outside the TP regions matches the single-device run's masks is shown end to end by
test_tensor_parallel_model's dropout case.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.config import Config, fill_defaults
from engine.model.gpt import GPT
from engine.parallel.random import RankLocalDropout
from engine.parallel.state import init_parallel
from tests.distributed import run_checks


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def check_rank_local_masks(rank: int, world_size: int) -> None:
    group = init_parallel(tp=world_size, pp=1, dp=1, device=torch.device("cpu")).tp_group
    drop = RankLocalDropout(0.5, group).train()
    x = torch.ones(64, 64)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    masks = gathered(drop(x))
    assert not torch.equal(masks[0], masks[1])  # each rank its own stream
    kept = (masks[rank] != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and set(masks[rank].unique().tolist()) <= {0.0, 2.0}  # p = 0.5, survivors x 2
    after = gathered(torch.rand(4))
    assert torch.equal(after[0], after[1])  # ... while the shared stream stays in step on every rank
    torch.set_rng_state(state)  # what activation recomputation does before re-running a layer
    assert torch.equal(drop(x), masks[rank])
    assert torch.equal(drop.eval()(x), x)


def check_recompute_with_sequence_parallel_dropout(rank: int, world_size: int) -> None:
    # Full recomputation re-runs each block's dropouts in backward; the masks must be the forward's.
    group = init_parallel(tp=world_size, pp=1, dp=1, device=torch.device("cpu")).tp_group
    grads = {}
    for recompute in ("none", "full"):
        cfg = Config()
        cfg.model.vocab_size, cfg.model.dropout, cfg.model.recompute = 50, 0.2, recompute
        cfg = fill_defaults(cfg, world_size).model
        torch.manual_seed(1)
        model = GPT(cfg, group, sequence_parallel=True).train()
        tokens = torch.randint(0, 50, (2, 8))
        model(tokens, tokens).backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads["full"][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_dropout_streams():
    run_checks(2, [check_rank_local_masks, check_recompute_with_sequence_parallel_dropout])
