"""tools/plan.py and the step-time model behind it: the pipeline simulation against the schedules' closed-form
bubbles, the model's response to the cluster, --search's ranking and its fixed keys, --budget against
Chinchilla's own compute-optimal point, and clear exit-2 errors for bad overrides, layouts and clusters. (The
memory and communicated bytes against real runs, and --json's model_state against the trainer's:
tests/test_plan_memory.py; the step time against measured CPU steps: tools/check_plan_time.py.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from engine.config import Config, fill_defaults, validate
from engine.training.step_time import Cluster, estimate_step_time, simulate
from tools.plan import compute_optimal, main

LLAMA_1B = ["model=llama_1b", "train=pretrain_1b", "model.vocab_size=32000"]
PARTS = ("compute_s", "tp_comm_s", "pp_message_s", "pipeline_bubble_s", "dp_exposed_s", "optimizer_s")
H100 = Cluster(name="h100", nodes=4, gpus_per_node=8, gpu_memory_gib=79.6, peak_tflops=989.4,
               intra_node_gbps=450.0, inter_node_gbps=50.0, hbm_gbps=3350.0)


def pipeline_config(schedule: str, micro: int, pp: int, virtual: int = 1) -> Config:
    """A Llama whose layers split evenly over pp x virtual stages, `micro` micro-batches per step."""
    cfg = Config()
    m, p, t = cfg.model, cfg.parallel, cfg.train
    m.arch, m.num_layers, m.hidden_size, m.num_heads, m.vocab_size = "llama", 2 * pp * virtual, 64, 4, 256
    p.pp, p.dp, p.pipeline_schedule, p.virtual_stages = pp, 1, schedule, virtual
    t.micro_batch_size, t.global_batch_size = 1, micro
    fill_defaults(cfg, pp)
    validate(cfg, pp)
    return cfg


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("pp,micro", [(2, 2), (4, 4), (4, 16), (8, 8)])
def test_simulated_bubble_is_the_closed_form(schedule, pp, micro):
    """Equal stages and free messages: every schedule of m micro-batches over p stages takes (m + p - 1) (f + b)."""
    f, b = 1.0, 2.0
    sim = simulate(pipeline_config(schedule, micro, pp), [f] * pp, [b] * pp, 0.0)
    assert max(sim["finish_s"]) == pytest.approx((micro + pp - 1) * (f + b))
    assert sim["busy_s"] == pytest.approx([micro * (f + b)] * pp)


@pytest.mark.parametrize("pp,virtual,micro", [(2, 2, 4), (4, 2, 8), (4, 4, 8)])
def test_interleaving_divides_the_bubble(pp, virtual, micro):
    """Megatron's interleaved schedule over v chunks of 1/v of a stage each: bubble (p - 1) (f + b) / v."""
    f, b = 1.0 / virtual, 2.0 / virtual
    stages = pp * virtual
    sim = simulate(pipeline_config("interleaved_1f1b", micro, pp, virtual), [f] * stages, [b] * stages, 0.0)
    ideal = micro * 3.0
    assert max(sim["finish_s"]) == pytest.approx(ideal + (pp - 1) * 3.0 / virtual)


def test_a_slow_stage_sets_the_pace():
    """One stage twice as slow: in the steady state a step grows by that stage's forward and backward per extra
    micro-batch, and no step is shorter than its busy time plus the first forward before it and the last
    backward after it."""
    f, b = [1.0, 2.0, 1.0, 1.0], [2.0, 4.0, 2.0, 2.0]
    span = {m: max(simulate(pipeline_config("1f1b", m, 4), f, b, 0.0)["finish_s"]) for m in (16, 32)}
    assert span[32] - span[16] == pytest.approx(16 * (f[1] + b[1]))
    assert span[16] >= f[0] + 16 * (f[1] + b[1]) + b[0]


def plan_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_faster_links_and_chips_never_slow_a_plan(capsys):
    """Raising any bandwidth or the peak can only shorten the estimated step; the compute term scales with 1/peak."""
    from tools.plan import compose

    cfg = compose([*LLAMA_1B, "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=2",
                   "parallel.sequence_parallel=true"])
    fill_defaults(cfg, H100.world)
    validate(cfg, H100.world)
    base = estimate_step_time(cfg, H100)
    for field in ("intra_node_gbps", "inter_node_gbps", "hbm_gbps", "peak_tflops"):
        faster = estimate_step_time(cfg, replace(H100, **{field: 2 * getattr(H100, field)}))
        assert faster["step_s"] <= base["step_s"], field
    doubled = estimate_step_time(cfg, replace(H100, peak_tflops=2 * H100.peak_tflops))
    assert doubled["compute_s"] == pytest.approx(base["compute_s"] / 2)
    assert 0 < base["mfu"] < 1 and base["tokens_per_s"] > 0


def test_plan_reports_fit_time_and_the_trainers_words(capsys):
    out = plan_json(capsys, *LLAMA_1B, "parallel.tp=8", "--nodes", "4")
    assert out["fits"] and out["reason"] is None
    assert out["memory_per_gpu_bytes"]["total"] <= out["usable_memory_bytes"]
    assert "parallel.tp=8 parallel.pp=1 parallel.dp=4" in out["overrides"]
    assert out["model"]["parameters"] == 1_100_048_384
    assert out["step_s"] == pytest.approx(sum(out[k] for k in PARTS))  # where the time goes adds up
    assert main([*LLAMA_1B, "parallel.tp=8", "--nodes", "4"]) == 0  # the text report
    text = capsys.readouterr().out
    assert "every rank (layers 0-21)" in text and "fits: yes" in text and "MFU" in text


@pytest.mark.parametrize("layout", [
    ["parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=3", "parallel.pipeline_schedule=interleaved_1f1b",
     "parallel.virtual_stages=11"],
    ["parallel.pp=2", "parallel.zero_stage=1"], ["parallel.pp=2", "parallel.tp=8", "parallel.zero_stage=2",
                                                "model.recompute=full", "parallel.pipeline_layers=[8,14]"]])
def test_the_parts_of_a_pipelined_step_add_up(capsys, layout):
    """With several pipeline ranks the parts are one rank's, and sum to the step; ZeRO hides no more than there is
    traffic."""
    out = plan_json(capsys, *LLAMA_1B, *layout, "--nodes", "4")
    assert out["step_s"] == pytest.approx(sum(out[k] for k in PARTS))
    assert all(out[k] >= 0 for k in PARTS) and out["dp_exposed_s"] <= out["dp_traffic_s"] + 1e-9


def test_zero3_hides_its_gathers_only_behind_compute(capsys):
    """One micro-batch (no accumulation): stage 3's forward gathers hide behind the forward, the backward's
    gathers and reduce-scatters behind the backward alone; exposed is at least what exceeds each."""
    from tools.plan import compose

    cfg = compose(["model=llama_7b", "model.vocab_size=32000", "train.precision=bf16", "train.seq_len=8192",
                   "model.max_seq_len=8192", "train.global_batch_size=128", "train.micro_batch_size=1",
                   "parallel.zero_stage=3", "model.recompute=selective"])
    cluster = replace(H100, nodes=16)
    fill_defaults(cfg, cluster.world)
    validate(cfg, cluster.world)
    alone = estimate_step_time(cfg, replace(cluster, overlap=False))
    hidden = estimate_step_time(cfg, cluster)
    compute = hidden["compute_s"]
    assert hidden["dp_exposed_s"] >= alone["dp_exposed_s"] - compute - 1e-9  # at most all compute hides traffic
    assert hidden["step_s"] < alone["step_s"]


def test_offloaded_optimizer_states_are_not_gpu_memory(capsys):
    args = [*LLAMA_1B, "parallel.zero_stage=1", "train.micro_batch_size=1"]
    on_gpu = plan_json(capsys, *args)["memory_per_gpu_bytes"]
    offloaded = plan_json(capsys, *args, "parallel.optimizer_offload=cpu")["memory_per_gpu_bytes"]
    assert offloaded["model_state"] == on_gpu["model_state"]  # the trainer's model_state_bytes counts them
    assert offloaded["host"] == on_gpu["optimizer"] > 0 and on_gpu["host"] == 0
    assert offloaded["total"] == pytest.approx(on_gpu["total"] - on_gpu["optimizer"])


def test_a_layout_too_big_says_so(capsys):
    out = plan_json(capsys, *LLAMA_1B, "train.micro_batch_size=16", "--gpus-per-node", "1", "--cluster", "a100")
    assert not out["fits"] and "more than the" in out["reason"]


def test_search_ranks_layouts_and_keeps_fixed_keys(capsys):
    out = plan_json(capsys, *LLAMA_1B, "parallel.tp=2", "--nodes", "2", "--search")
    fits = out["fits"]
    assert fits and all(r["fits"] for r in fits) and all(not r["fits"] for r in out["does_not_fit"])
    assert [r["tokens_per_s"] for r in fits] == sorted((r["tokens_per_s"] for r in fits), reverse=True)
    assert all("parallel.tp=2 " in r["overrides"] for r in fits + out["does_not_fit"])
    assert {r["overrides"].split("parallel.zero_stage=")[1][0] for r in fits} == {"0", "1", "2", "3"}
    assert main([*LLAMA_1B, "parallel.tp=2", "--nodes", "2", "--search", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "fastest that fit" in text and text.count("parallel.tp=2 parallel.pp=") >= 3


def test_search_holds_a_given_dp_and_says_when_nothing_is_valid(capsys):
    out = plan_json(capsys, *LLAMA_1B, "parallel.dp=4", "--nodes", "4", "--search")
    assert out["fits"] and all(" parallel.dp=4 " in r["overrides"] for r in out["fits"] + out["does_not_fit"])
    assert main([*LLAMA_1B, "--nodes", "1000", "--search"]) == 2  # 8000 GPUs, a global batch of 512
    assert "no valid layout to rank" in capsys.readouterr().err


def test_budget_reproduces_chinchilla():
    """At Chinchilla's own compute (5.76e23 FLOPs) the law gives about its 70B parameters and 1.4T tokens."""
    cluster = replace(H100, peak_tflops=1.0)
    opt = compute_optimal(5.76e23 / 3600 / 1e12, cluster, mfu=1.0)
    assert opt["parameters"] == pytest.approx(70e9, rel=0.1)
    assert opt["tokens"] == pytest.approx(1.4e12, rel=0.1)
    assert 6 * opt["parameters"] * opt["tokens"] == pytest.approx(5.76e23)


def test_budget_suggests_a_shape_and_steps(capsys):
    out = plan_json(capsys, *LLAMA_1B, "--budget", "50000")
    shape = out["shape"]
    assert shape["parameters"] == pytest.approx(out["parameters"], rel=0.1)
    assert shape["hidden_size"] % (128 * 8) == 0 and shape["num_heads"] % 8 == 0
    assert out["steps"] * 512 * 2048 >= out["tokens"]
    assert f"model.num_layers={shape['num_layers']}" in out["overrides"]


@pytest.mark.parametrize("args,message", [
    (["model=llama_1b", "parallel.tpp=2"], "did you mean parallel.tp"),
    (["model=llama_2b"], "llama_2b"),
    (["model=llama_1b", "model.vocab_size=32000", "parallel.tp=3"], "model.num_heads=32 is not divisible by"),
    (["model=llama_1b", "model.vocab_size=32000", "parallel.dp=3"], "world size is 8"),
    (["model=llama_1b", "model.vocab_size=32000", "--nodes", "0"], "--nodes=0 must be positive"),
    (["model=llama_1b", "model.vocab_size=32000", "--efficiency", "1.5"], "--efficiency=1.5 must be at most 1"),
    (["model=llama_1b", "model.vocab_size=32000", "--gpu-memory-gib", "0"], "--gpu-memory-gib=0.0 must be positive"),
    (["model=llama_1b", "model.vocab_size=32000", "train.precision=int8"], "no peak is known for it"),
    (["model=llama_1b", "model.vocab_size=32000", "--search", "--top", "0"], "--top=0 must be at least 1"),
])
def test_bad_input_exits_2_with_the_reason(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def documented_plan_commands() -> list[tuple[str, str]]:
    """(where, arguments) of every `tools/plan.py` command in README.md and docs/, and in its own docstring."""
    import ast
    import re

    from tests.test_documented_commands import REPO, comment_commands, markdown_commands

    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "tools" / "plan.py"]:
        text = doc.read_text()
        pairs = (markdown_commands(text) if doc.suffix == ".md"
                 else comment_commands(ast.get_docstring(ast.parse(text))))
        for n, command in pairs:
            m = re.search(r"tools/plan\.py(.*)", command.split("#")[0])
            if m and m.group(1).strip() and "..." not in command and "<" not in command:
                found.append((f"{doc.relative_to(REPO)}:{n}", m.group(1)))
    return found


PLAN_COMMANDS = documented_plan_commands()


def test_commands_are_documented():
    assert len(PLAN_COMMANDS) >= 8


@pytest.mark.parametrize("where,arguments", PLAN_COMMANDS, ids=[w for w, _ in PLAN_COMMANDS])
def test_documented_plan_commands_are_valid(where, arguments):
    """Each documented command's overrides compose, its cluster builds, and (a single plan) its layout validates:
    what tools/plan.py does before it estimates anything (the estimates are the other tests')."""
    import shlex

    from tools.plan import build_cluster, compose, parse_args

    args = parse_args(shlex.split(arguments))
    cfg = compose(args.overrides)
    cluster, _ = build_cluster(args, cfg.train.precision)
    fill_defaults(cfg, cluster.world, cfg.model.vocab_size)
    if not args.search and args.budget is None:
        validate(cfg, cluster.world)
