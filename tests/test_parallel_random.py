"""Keyed dropout masks: per TP rank where the data differs, one mask where it does not, reproducible under
recomputation, and a function of (key, site) alone.

(That dropout matches the single-device run's masks is shown end to end by test_tensor_parallel_model's and
test_pipeline_model's dropout cases.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.config import Config, fill_defaults
from engine.model.gpt import GPT
from engine.parallel.random import KeyedDropout, mix_seed
from engine.parallel.state import init_parallel
from tests.distributed import run_checks


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def check_rank_local_masks(rank: int, world_size: int) -> None:
    group = init_parallel(tp=world_size, pp=1, dp=1, device=torch.device("cpu")).tp_group
    drop = KeyedDropout(0.5, site=3, group=group).train()
    x = torch.ones(64, 64)
    masks = gathered(drop(x, key=7))
    assert not torch.equal(masks[0], masks[1])  # each rank its own mask on its own chunk
    kept = (masks[rank] != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and set(masks[rank].unique().tolist()) <= {0.0, 2.0}  # p = 0.5, survivors x 2
    assert torch.equal(drop(x, key=7), masks[rank])  # a function of the key: recomputation redraws it
    assert not torch.equal(drop(x, key=8), masks[rank])
    assert not torch.equal(drop(x, key=7, branch=1), masks[rank])
    shared = gathered(KeyedDropout(0.5, site=3).train()(x, key=7))
    assert torch.equal(shared[0], shared[1])  # replicated activations: one mask on every rank
    torch.manual_seed(0)
    keyless = gathered(drop(x))
    torch.manual_seed(0)
    assert torch.equal(drop(x), keyless[rank])  # no key: drawn from the default stream, so seeded code repeats
    assert torch.equal(drop.eval()(x), x)


def test_mix_seed_spreads_and_repeats():
    seeds = {mix_seed(k, site) for k in range(100) for site in range(10)}
    assert len(seeds) == 1000 and all(0 <= s < 2**62 for s in seeds)
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)


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
