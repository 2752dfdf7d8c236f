"""Pipeline schedules checked without running a model: every rank's action list and communication plan, simulated
together under NCCL's rendezvous semantics (a batch of sends and receives completes only when every op in it
meets its counterpart in the peer's batch), must finish without deadlock, pass every message in the order it is
received on each channel, and hold at most the activations each schedule promises."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.parallel.pipeline import Message, rank_stages, stage_layers
from engine.training.schedule import Action, communication_plan, forward_only, schedule_actions, schedule_steps


def simulate(schedule: str, m: int, pp: int, v: int = 1, forward: bool = False) -> dict:
    """Run every rank's plan to the end; returns per-rank max activations held. Fails on deadlock or misordering."""
    stages = pp * v
    plans = []
    for r in range(pp):
        steps = schedule_steps(schedule, m, pp, r, v)
        if forward:
            steps = forward_only(steps)
        actions = [a for step in steps for a in step]
        plans.append(communication_plan(steps, rank_stages(r, pp, v), stages))
        expected = {(k, i, c) for k in ("FB"[:1] if forward else "FB") for i in range(m) for c in range(v)}
        assert Counter((a.kind, a.micro, a.chunk) for a in actions) == Counter(expected)
        done_forward = set()
        for a in actions:  # a backward needs its own forward first
            if a.kind == "F":
                done_forward.add((a.micro, a.chunk))
            else:
                assert (a.micro, a.chunk) in done_forward, (schedule, r, a)

    def rank_of(stage: int) -> int:
        return stage % pp

    # Messages are matched by order on each (sender, receiver) pair, activations and gradients alike, so each
    # pair's send order must equal its receive order.
    sent, got = {}, {}
    for r, plan in enumerate(plans):
        for sends, recvs, _ in plan:
            for msg in sends:
                sent.setdefault((r, rank_of(msg.destination())), []).append(msg)
            for msg in recvs:
                got.setdefault((rank_of(msg.stage), r), []).append(msg)
    assert sent == got, f"{schedule} m={m} pp={pp} v={v}: channel order differs"

    index = [0] * pp
    pending = [None] * pp
    held = [0] * pp
    most = [0] * pp

    def load(r: int) -> None:
        sends, recvs, _ = plans[r][index[r]]
        pending[r] = {("send", msg) for msg in sends} | {("recv", msg) for msg in recvs}

    for r in range(pp):
        load(r)
    while True:
        progress = False
        for r in range(pp):
            if index[r] == len(plans[r]):
                continue
            for op, msg in list(pending[r]):
                peer = rank_of(msg.destination()) if op == "send" else rank_of(msg.stage)
                other = ("recv" if op == "send" else "send", msg)
                if index[peer] < len(plans[peer]) and other in pending[peer]:
                    pending[r].discard((op, msg))
                    pending[peer].discard(other)
                    progress = True
            if not pending[r]:
                for action in plans[r][index[r]][2]:
                    if not forward:
                        held[r] += 1 if action.kind == "F" else -1
                        most[r] = max(most[r], held[r])
                index[r] += 1
                progress = True
                if index[r] < len(plans[r]):
                    load(r)
        if all(index[r] == len(plans[r]) for r in range(pp)):
            return {"max_in_flight": most}
        assert progress, f"{schedule} m={m} pp={pp} v={v}: deadlock at steps {index}"


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16])
def test_gpipe_and_1f1b_finish_and_bound_activations(pp, m):
    gpipe = simulate("gpipe", m, pp)
    assert gpipe["max_in_flight"] == [m] * pp  # GPipe holds every micro-batch on every stage
    one = simulate("1f1b", m, pp)
    assert one["max_in_flight"][0] == min(pp, m)  # at most pp on stage 0
    assert all(one["max_in_flight"][r] == min(pp - r, m) for r in range(pp))
    simulate("1f1b", m, pp, forward=True)


@pytest.mark.parametrize(("pp", "v"), [(2, 2), (2, 3), (4, 2), (3, 2)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_interleaved_finishes_in_order(pp, v, groups):
    m = groups * pp
    out = simulate("interleaved_1f1b", m, pp, v)
    total = m * v
    warmup0 = total if m == pp else min((pp - 1) * 2 + (v - 1) * pp, total)
    assert out["max_in_flight"][0] == min(warmup0 + 1, total)
    simulate("interleaved_1f1b", m, pp, v, forward=True)


def test_interleaved_refuses_ragged_micro_batches():
    with pytest.raises(ValueError, match="multiple"):
        schedule_actions("interleaved_1f1b", 6, 4, 0, 2)


def test_no_pipelining_is_the_accumulation_loop():
    assert list(schedule_actions("1f1b", 3, 1, 0)) == [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1),
                                                 Action("F", 2), Action("B", 2)]
    plan = communication_plan(schedule_steps("none", 3, 1, 0), [0], 1)
    assert all(not sends and not recvs for sends, recvs, _ in plan)


def test_stage_split_and_chunk_placement():
    assert stage_layers(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert stage_layers(5, 3, [1, 3, 1]) == [range(0, 1), range(1, 4), range(4, 5)]
    with pytest.raises(ValueError):
        stage_layers(5, 2)
    with pytest.raises(ValueError):
        stage_layers(5, 2, [3, 3])
    assert rank_stages(1, 4, 2) == [1, 5]
    assert Message("act", 0, 3).destination() == 4 and Message("grad", 0, 3).destination() == 2


@pytest.mark.slow
def test_bench_pipeline_runs_and_writes_a_chrome_trace(tmp_path):
    """tools/bench_pipeline.py --cpu-quick: all three parts run, the trace has every stage's forwards and backwards,
    and our executor computes what torch's Schedule1F1B computes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    trace = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, str(repo / "tools" / "bench_pipeline.py"), "--cpu-quick", "--trace",
                        str(trace)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ratio ours / theirs" in r.stdout and "gradients' max relative difference 0.0e+00" in r.stdout
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    by_stage = Counter(e["tid"] for e in events)
    assert len(by_stage) == 2 and len(set(by_stage.values())) == 1  # each stage: every F and B once
    assert {e["name"][0] for e in events} == {"F", "B"}
