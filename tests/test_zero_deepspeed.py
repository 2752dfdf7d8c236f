"""DeepSpeed as the oracle for our ZeRO: its stages 1, 2 and 3 train the same tiny model (same initialisation,
data, gradient accumulation, clipping and torch AdamW with our weight-decay groups) on the same gloo ranks, and
its per-step losses and final parameters match ours within 1e-5.

Slow tier (`make test-slow` installs DeepSpeed with DS_BUILD_OPS=0; its first start JIT-builds a small op).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engine.model import GPT
from engine.training.optimizer import param_groups
from tests.distributed import run_ranks
from tests.test_zero import BATCH, MICRO, OPTIM, STEPS, TOL, batches, model_config, zero_run

pytestmark = pytest.mark.slow


def deepspeed_run(rank: int, world: int, stage: int, tie: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    """DeepSpeed ZeRO `stage` on this rank: per-step losses and the parameters gathered whole at the end."""
    import deepspeed

    model = GPT(model_config(tie), seed=0)
    optimizer = torch.optim.AdamW(param_groups(model, OPTIM), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2),
                                  eps=OPTIM.eps, foreach=True)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": MICRO,
              "gradient_clipping": OPTIM.clip_grad, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for t in batches(step, world)[rank]:
            loss = engine(t[:, :-1], t[:, 1:])
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps and averages over DP
            engine.step()
            total += loss.detach() / (MICRO * world)
        dist.all_reduce(total)
        losses.append(total.item())
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, params


def both(rank: int, world: int, cases: list[tuple[int, bool]]) -> list:
    return [(deepspeed_run(rank, world, stage, tie), zero_run(rank, world, stage, tie, True)[:2])
            for stage, tie in cases]


CASES = [(1, True), (2, True), (3, True), (3, False)]


def test_deepspeed_and_weft_zero_train_alike():
    pytest.importorskip("deepspeed", reason="DeepSpeed is the oracle: make test-slow installs it")
    for rank, results in enumerate(run_ranks(2, both, CASES, timeout=900)):
        for (stage, tie), ((ds_losses, ds_params), (our_losses, our_params)) in zip(CASES, results, strict=True):
            where = f"stage {stage}, {'tied' if tie else 'untied'}, rank {rank}"
            print(f"{where}: DeepSpeed {ds_losses}, Weft {our_losses}")
            torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(ds_losses), rtol=TOL, atol=0,
                                       msg=where)
            assert our_params.keys() == ds_params.keys()
            for name, value in ds_params.items():
                torch.testing.assert_close(our_params[name], value, rtol=0, atol=TOL, msg=f"{where}: {name}")
