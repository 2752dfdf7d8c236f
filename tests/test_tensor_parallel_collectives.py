"""Collectives per layer under tensor parallelism: Megatron's numbers, counted on real gloo ranks.

Without sequence parallelism an attention block and an MLP each do one all-reduce in forward (after the row-parallel
projection) and one in backward (the copy into the column-parallel projections, shared by q/k/v or gate/up).
With it, each does one all-gather and one reduce-scatter in forward, and the mirror (reduce-scatter, all-gather)
in backward. The gathered input is kept for backward, so no second all-gather there: more activation memory than
Megatron's re-gather, one collective fewer.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from engine.config import Config, fill_defaults
from engine.model.attention import Attention
from engine.model.gpt import GPT, make_norm
from engine.model.mlp import MLP
from engine.parallel import mappings
from engine.parallel.state import init_parallel
from tests.distributed import run_checks


@contextmanager
def counting_collectives():
    """Count the TP mappings' collectives (the functions every region Function calls) while inside."""
    counts: Counter = Counter()

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    with mock.patch.object(mappings, "_all_reduce", wrap("all_reduce", mappings._all_reduce)), \
            mock.patch.object(mappings, "_all_gather", wrap("all_gather", mappings._all_gather)), \
            mock.patch.object(mappings, "_reduce_scatter", wrap("reduce_scatter", mappings._reduce_scatter)):
        yield counts


def model_config(arch: str):
    cfg = Config()
    cfg.model.arch, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.vocab_size = arch, 32, 4, 50
    cfg.model.num_kv_heads = 2 if arch == "llama" else None
    return fill_defaults(cfg, 2).model


def forward_backward_counts(module: torch.nn.Module, x: torch.Tensor, *args) -> tuple[Counter, Counter]:
    """(forward counts, backward counts) of one call."""
    x = x.clone().requires_grad_()
    with counting_collectives() as fwd:
        y = module(x, *args)
    with counting_collectives() as bwd:
        y.sum().backward()
    return fwd, bwd


def check_collectives_per_layer(rank: int, world_size: int) -> None:
    tp_group = init_parallel(tp=world_size, pp=1, dp=1, device=torch.device("cpu")).tp_group
    for arch in ("gpt2", "llama"):
        cfg = model_config(arch)
        rope = None
        if arch == "llama":
            import kernels

            rope = kernels.rope_cache(8, cfg.hidden_size // cfg.num_heads, cfg.rope_theta, torch.device("cpu"))
        init = torch.nn.init.normal_
        for sp in (False, True):
            seq = 8 // world_size if sp else 8  # under SP a layer sees this rank's sequence chunk
            x = torch.randn(2, seq, cfg.hidden_size)
            expected = ({"all_gather": 1, "reduce_scatter": 1}, {"reduce_scatter": 1, "all_gather": 1}) if sp \
                else ({"all_reduce": 1}, {"all_reduce": 1})
            layers = ((Attention(cfg, init, init, tp_group, sp), (rope,)), (MLP(cfg, init, init, tp_group, sp), ()))
            for layer, args in layers:
                fwd, bwd = forward_backward_counts(layer, x, *args)
                assert (dict(fwd), dict(bwd)) == expected, (arch, sp, type(layer).__name__, fwd, bwd)
            # A norm is local: no collective, and (under SP) its weight's gradient is left for the trainer to sum.
            fwd, bwd = forward_backward_counts(make_norm(cfg, sp), x)
            assert not fwd and not bwd


def check_collectives_per_model(rank: int, world_size: int) -> None:
    # The whole model's count: L layers x the above, plus the embedding, the output layer and the loss's three
    # all-reduces (max, sum-exp, target logit; outside the mappings, so not counted here).
    tp_group = init_parallel(tp=world_size, pp=1, dp=1, device=torch.device("cpu")).tp_group
    cfg = model_config("gpt2")
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    for sp in (False, True):
        model = GPT(cfg, tp_group, sp)
        with counting_collectives() as fwd:
            loss = model(tokens, tokens)
        with counting_collectives() as bwd:
            loss.backward()
        layers = cfg.num_layers * 2  # attention + MLP per block
        if sp:  # embedding reduce-scatter; head all-gather (backward: reduce-scatter)
            assert dict(fwd) == {"all_gather": layers + 1, "reduce_scatter": layers + 1}, fwd
            assert dict(bwd) == {"reduce_scatter": layers + 1, "all_gather": layers + 1}, bwd
        else:  # embedding all-reduce; head copy (backward: all-reduce)
            assert dict(fwd) == {"all_reduce": layers + 1}, fwd
            assert dict(bwd) == {"all_reduce": layers + 1}, bwd


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_collective_counts(world):
    """Megatron's collective counts per attention block, MLP and whole model, TP 2 and 4, SP off and on."""
    run_checks(world, [check_collectives_per_layer, check_collectives_per_model])
