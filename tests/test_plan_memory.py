"""The memory model behind tools/plan.py and train.dry_run against measurement: real Trainer steps on 4 gloo ranks
(tools/check_plan_memory.py), ZeRO 0-3, recompute none / selective / full, 1F1B, GPipe and interleaved 1F1B, TP
and SP, fp32 and bf16 autocast. Model states must match exactly (bytes counted from the tensors); the peak within
5% on every pipeline stage (measured on its rank the profiler over-counted least: `per_stage`), except the two
configurations known to sit near the bound, named below with their own; the step-time model's communicated bytes
must be the ones the ranks send."""

from __future__ import annotations

import pytest

from tools.check_plan_memory import CASES, compare, per_stage

# Full recomputation with SP is predicted 4-6% high (docs/planning.md: the loss's working memory, counted at its
# worst case, is not all live at once when only layer inputs are kept). SP with pipelining: the same rank's
# measured peak moves by up to 8% from run to run (12.68 to 13.73 MB on stage 1), as gloo's sequence-parallel
# collectives free buffers on threads the profiler does not see; the prediction sits inside that range. The other
# 11 are held to 5%.
BOUNDS = {"tp2 + SP x dp2, full recompute": 0.07, "tp2 + SP x pp2, 1F1B, GPT-2": 0.07}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return compare()


def test_every_configuration_and_rank_was_measured(rows):
    assert len(CASES) >= 8
    assert {(r["case"], r["rank"]) for r in rows} == {(name, rank) for name, _ in CASES for rank in range(4)}


def test_model_states_match_the_tensors(rows):
    for r in rows:
        assert r["model_state"]["predicted"] == r["model_state"]["measured"], r


def test_peak_memory_within_5_percent(rows):
    for r in per_stage(rows):
        assert abs(r["peak"]["error"]) <= BOUNDS.get(r["case"], 0.05), (f"{r['case']}, rank {r['rank']}: predicted "
                                                  f"{r['peak']['predicted']:,} bytes, measured "
                                                  f"{r['peak']['measured']:,} ({100 * r['peak']['error']:+.1f}%)")


def test_communication_bytes_match_the_collectives(rows):
    """The step-time model's bytes per step by mesh group and operation (engine.training.step_time.transfers)
    against the payloads each rank handed torch.distributed during a step. Only the scalars the model leaves out
    (the loss, the gradient norm, the non-finite vote: at most 64 bytes per group and operation) may differ."""
    for r in rows:
        predicted, measured = r["traffic"]["predicted"], r["traffic"]["measured"]
        for group in set(predicted) | set(measured):
            for op in set(predicted.get(group, {})) | set(measured.get(group, {})):
                want, got = predicted.get(group, {}).get(op, 0), measured.get(group, {}).get(op, 0)
                assert abs(want - got) <= 64, f"{r['case']}, rank {r['rank']}: {group} {op} predicted {want:,.0f} " \
                                              f"bytes, measured {got:,.0f}"
