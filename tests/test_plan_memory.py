"""The memory model behind tools/plan.py and train.dry_run against measurement: real Trainer steps on 4 gloo ranks
(tools/check_plan_memory.py), ZeRO 0-3, recompute none / selective / full, 1F1B, GPipe and interleaved 1F1B, TP
and SP, fp32 and bf16 autocast. Model states must match exactly (bytes counted from the tensors); the peak within
5% on every pipeline stage (measured on its rank the profiler over-counted least: `per_stage`), except the two
configurations known to sit near the bound, named below with their own; the step-time model's communicated bytes
must be the ones the ranks send."""

from __future__ import annotations

import json

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


# CASES that conf/ composes as they are: model=llama_tiny is the base configuration's shape.
PLAN_OVERRIDES = ["model=llama_tiny", "model.vocab_size=1000", "model.max_seq_len=128", "train.seq_len=128",
                  "train.micro_batch_size=4", "train.global_batch_size=32", "parallel.dp=4"]
PLANNED = {"dp4, ZeRO 0": [], "dp4, ZeRO 1": ["parallel.zero_stage=1"], "dp4, ZeRO 2": ["parallel.zero_stage=2"],
           "dp4, ZeRO 3": ["parallel.zero_stage=3"],
           "dp4, ZeRO 1, bf16 autocast": ["parallel.zero_stage=1", "train.precision=bf16"]}


def test_plan_json_model_state_is_the_trainers(rows, capsys):
    """tools/plan.py --json's memory_per_gpu_bytes.model_state (a contract for scripts) is the quantity the trainer
    measures: its parameters', gradients', master weights' and optimizer states' bytes, for the same words."""
    from tools.plan import main

    for case, extra in PLANNED.items():
        assert main([*PLAN_OVERRIDES, *extra, "--gpus-per-node", "4", "--json"]) == 0
        planned = json.loads(capsys.readouterr().out)["memory_per_gpu_bytes"]
        measured = {r["model_state"]["measured"] for r in rows if r["case"] == case}
        assert measured == {planned["model_state"]}, case
        assert planned["total"] >= planned["model_state"]
