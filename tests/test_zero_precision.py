"""ZeRO's mixed precision and CPU offload through the trainer, on 2 gloo ranks: bf16 parameters and gradients
with fp32 master weights and moments, bf16 gradient reduction, fp16 loss scaling whose overflow on one rank makes
every rank skip the step, and the optimizer offloaded to host memory stepping exactly like the device one (and its
state resuming from a checkpoint)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.training.checkpoint import latest_checkpoint
from tests.distributed import run_ranks
from tests.test_checkpoint import losses_by_step
from tests.test_trainer import write_pattern_shard
from tests.test_zero_trainer import make_trainer

STEPS = 6
BF16_RTOL = 2e-2  # bf16 against fp32 over a few steps: rounding, not a bug, at this size


def losses(trainer) -> list[float]:
    out = losses_by_step(trainer.fit())
    return [out[s] for s in sorted(out)]


def precision_runs(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    base = Path(root)
    run = lambda name, **kw: make_trainer(shard, cache, base / name, dp=2, steps=STEPS, **kw)  # noqa: E731
    out = {"fp32": losses(run("fp32", stage=2))}

    bf16 = run("bf16", stage=2, precision="bf16")
    out["bf16"] = losses(bf16)
    out["bf16 dtypes"] = ({p.dtype for p in bf16.model.parameters()},
                          {view.dtype for _, view, _ in bf16.optimizer.masters},
                          {v.dtype for s in bf16.optimizer.state.values() for v in s.values() if v.ndim})
    out["bf16 reduce"] = losses(run("bf16r", stage=2, precision="bf16", grad_reduce_dtype="bf16"))

    fp16 = run("fp16", stage=1, precision="fp16")
    scale = fp16.scaler.scale_value
    compute = fp16.compute_gradients

    def overflow_on_rank_1() -> float:  # an inf in one rank's gradient shard, at the first step only
        loss = compute()
        if fp16.step == 0 and rank == 1:
            fp16.grads()[0][0].fill_(math.inf)
        return loss

    fp16.compute_gradients = overflow_on_rank_1
    out["fp16"] = losses(fp16)
    out["fp16 skipped"] = (fp16.skipped_steps, fp16.scaler.scale_value / scale)

    out["stage1"] = losses(run("s1", stage=1))
    offload = run("offload", stage=1, optimizer_offload="cpu")
    out["offload"] = losses(offload)
    out["offload optimizer"] = offload.optimizer.name
    out["offload masters"] = {(view.device.type, view.dtype, view.data_ptr() != b.param_shard.data_ptr())
                              for _, view, b in offload.optimizer.masters}
    out["offload resumed"] = []
    for name, offloaded in (("offload again", "cpu"), ("no offload", "none")):  # its checkpoint, either way
        again = run(name, stage=1, optimizer_offload=offloaded)
        again.resume(latest_checkpoint(base / "offload"))
        out["offload resumed"].append(
            all(torch.equal(a[1], b[1]) for a, b in zip(offload.optimizer.masters, again.optimizer.masters,
                                                        strict=True))
            and all(float(x) == float(y) if not torch.as_tensor(x).ndim else torch.equal(x, y)
                    for sa, sb in zip(offload.optimizer.state.values(), again.optimizer.state.values(), strict=True)
                    for x, y in zip(sa.values(), sb.values(), strict=True)))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("zero_precision")
    shard = write_pattern_shard(root / "shard")
    return run_ranks(2, precision_runs, shard, str(root / "cache"), str(root), timeout=600)


def test_bf16_parameters_with_fp32_masters(results):
    for r in results:
        params, masters, moments = r["bf16 dtypes"]
        assert params == {torch.bfloat16} and masters == {torch.float32} and moments == {torch.float32}
        np.testing.assert_allclose(r["bf16"], r["fp32"], rtol=BF16_RTOL)
        np.testing.assert_allclose(r["bf16 reduce"], r["bf16"], rtol=BF16_RTOL)
        assert r["bf16"] != r["fp32"]  # it did compute in bf16


def test_fp16_overflow_on_one_rank_is_skipped_by_all(results):
    for r in results:
        assert r["fp16 skipped"] == (1, 0.5), "every rank skips the step and halves the scale"
        assert all(math.isfinite(x) for x in r["fp16"])
    assert results[0]["fp16"] == results[1]["fp16"]


def test_cpu_offload_steps_like_the_device_optimizer(results):
    for r in results:
        assert r["offload masters"] == {("cpu", torch.float32, True)}  # host copies, not the parameter shards
        assert r["offload resumed"] == [True, True], "resumed (offloaded, and not) masters and moments are the saved"
        if r["offload optimizer"] == "DeepSpeedCPUAdam":  # its SIMD arithmetic rounds differently
            np.testing.assert_allclose(r["offload"], r["stage1"], rtol=1e-5)
        else:
            assert r["offload optimizer"] == "torch AdamW (CPU)"
            assert r["offload"] == r["stage1"]
