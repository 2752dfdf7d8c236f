"""The memory model behind tools/plan.py and train.dry_run against measurement: real Trainer steps on 4 gloo ranks
(tools/check_plan_memory.py), ZeRO 0-3, recompute none / selective / full, 1F1B, GPipe and interleaved 1F1B, TP
and SP, fp32 and bf16 autocast. Model states must match exactly (bytes counted from the tensors); the peak within
5% on every pipeline stage (measured on its rank the profiler over-counted least: `per_stage`), except the one
configuration known to sit near the bound, named below with its own."""

from __future__ import annotations

import pytest

from tools.check_plan_memory import CASES, compare, per_stage

# Full recomputation with SP is predicted 4-6% high (docs/planning.md: the loss's working memory, counted at its
# worst case, is not all live at once when only layer inputs are kept); the other 12 are held to 5%.
BOUNDS = {"tp2 + SP x dp2, full recompute": 0.07}


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
