"""Configuration: Hydra composition, every validation rule, and the arithmetic of schedules, MFU and groups."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from engine.config import (
    Config,
    ConfigError,
    all_keys,
    fill_defaults,
    key_help,
    override_problems,
    register_configs,
    sweep_job_name,
    unknown_keys,
    validate,
)
from engine.model import GPT
from engine.model.flops import count_parameters, flops_per_token, parameters_per_rank
from engine.training.memory import estimate_memory
from engine.training.metrics import mfu, peak_tflops
from engine.training.optimizer import lr_at, param_groups

REPO = Path(__file__).resolve().parent.parent


def composed(*overrides: str) -> Config:
    """The config `python -m engine.train <overrides>` would run with."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("model", ["gpt2_tiny", "gpt2_124m", "gpt2_350m", "llama_tiny", "llama_1b", "llama_7b"])
def test_presets_compose_and_validate(model):
    """Every model preset composes onto the schema and validates (vocab given, one process)."""
    cfg = composed(f"model={model}", "model.vocab_size=50304")
    assert cfg.model.name == model
    validate(fill_defaults(cfg, 1), 1)


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_tiny_presets_divide_for_tp_up_to_4(kv):
    """The tiny presets keep heads, KV heads and FFN divisible for TP 2 and 4 (the TP issue relies on it)."""
    for name in ("gpt2_tiny", "llama_tiny"):
        cfg = fill_defaults(composed(f"model={name}", "model.vocab_size=512", f"model.num_kv_heads={kv}"), 4)
        for tp in (2, 4):
            assert cfg.model.num_heads % tp == 0 and cfg.model.ffn_hidden_size % tp == 0
            assert cfg.model.num_kv_heads % tp == 0 or tp % cfg.model.num_kv_heads == 0


def test_cli_overrides_reach_the_dataclasses():
    """Overrides land typed in the dataclasses ('/' separates split weights on a command line: Hydra reads ',' as a
    sweep)."""
    cfg = composed("model=llama_tiny", "optim.lr=3e-4", "train.steps=200", "data.split=90/5/5")
    assert cfg.model.arch == "llama" and cfg.optim.lr == 3e-4 and cfg.train.steps == 200
    assert cfg.data.split == "90/5/5"


def test_plus_keys_are_caught():
    """`+key=value` slips past Hydra's schema; unknown_keys finds it so the run can refuse it."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+train.stepz=3", "+model.extra.deep=1"])
    assert sorted(unknown_keys(OmegaConf.to_container(cfg, resolve=True))) == ["model.extra", "train.stepz"]


def valid(**changes) -> Config:
    """A valid one-process config with `section__key=value` changes applied."""
    cfg = Config()
    cfg.model.vocab_size = 512
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


RULES = [
    ({"model__hidden_size": 100, "model__num_heads": 3}, 1, "hidden_size=100 is not divisible by model.num_heads=3"),
    ({"model__num_kv_heads": 3}, 1, "not a multiple of model.num_kv_heads=3"),
    ({"parallel__tp": 3}, 3, "model.num_heads=4 is not divisible by parallel.tp=3"),
    ({"model__num_layers": 3, "parallel__pp": 2}, 2,
     "model.num_layers=3 does not split evenly into parallel.pp x parallel.virtual_stages = 2 stages"),
    ({"model__num_layers": 3, "parallel__pp": 2, "parallel__pipeline_layers": [1, 1]}, 2,
     "parallel.pipeline_layers=[1, 1] sums to 2; it must sum to model.num_layers=3"),
    ({"model__num_layers": 4, "parallel__pp": 2, "parallel__pipeline_layers": [0, 4]}, 2,
     "parallel.pipeline_layers=[0, 4]: stage 0 would hold no layer"),
    ({"model__num_layers": 4, "parallel__pp": 8}, 8, "8 stages but only model.num_layers=4 layers"),
    ({"model__num_layers": 4, "parallel__pp": 2, "parallel__pipeline_layers": [4]}, 2,
     "parallel.pipeline_layers=[4] has 1 entries; it needs one per stage"),
    ({"model__num_layers": 4, "parallel__pp": 2, "parallel__virtual_stages": 2}, 2,
     "parallel.virtual_stages=2 is for parallel.pipeline_schedule=interleaved_1f1b"),
    ({"model__num_layers": 4, "parallel__pp": 2, "parallel__pipeline_schedule": "interleaved_1f1b"}, 2,
     "interleaved_1f1b needs parallel.virtual_stages >= 2"),
    ({"model__num_layers": 4, "parallel__pp": 2, "parallel__pipeline_schedule": "interleaved_1f1b",
      "parallel__virtual_stages": 2, "train__global_batch_size": 12, "train__micro_batch_size": 4}, 2,
     "needs the micro-batches per step (train.global_batch_size / (train.micro_batch_size x parallel.dp) = 3) to be "
     "a multiple of parallel.pp=2"),
    ({"parallel__pipeline_schedule": "zb"}, 1, "parallel.pipeline_schedule='zb' is not one of gpipe, 1f1b"),
    ({"parallel__timeout_s": 0}, 1, "parallel.timeout_s=0 must be positive"),
    ({"parallel__dp": 2}, 4, "= 2 but the world size is 4"),
    ({"train__global_batch_size": 10, "train__micro_batch_size": 4}, 1, "train.global_batch_size=10 is not a multiple"),
    ({"train__global_batch_size": 12, "train__micro_batch_size": 4}, 2, "micro_batch_size=4 x parallel.dp=2"),
    ({}, 3, None),  # dp fills the world: 3 ranks x micro 4 does not divide 8
    ({"train__seq_len": 2048}, 1, "train.seq_len=2048 exceeds model.max_seq_len=1024"),
    ({"train__precision": "fp8"}, 1, "train.precision='fp8' is not one of fp32, bf16, fp16"),
    ({"model__recompute": "some"}, 1, "model.recompute='some'"),
    ({"optim__min_lr": 1.0}, 1, "need 0 <= min_lr <= lr"),
    ({"model__vocab_size": None}, 1, "model.vocab_size=None: set it"),
    ({"model__arch": "llama", "model__hidden_size": 12, "model__num_heads": 4}, 1, "must be even for RoPE"),
    ({"model__dropout": 1.0}, 1, "model.dropout=1.0 must be in [0, 1)"),
    ({"train__steps": 0}, 1, "train.steps=0 must be at least 1"),
    ({"parallel__tp": 2, "parallel__sequence_parallel": True, "train__seq_len": 33}, 2,
     "train.seq_len=33 is not divisible by parallel.tp=2"),
    ({"model__make_vocab_size_divisible_by": 0}, 1, "model.make_vocab_size_divisible_by=0 must be at least 1"),
    ({"parallel__tp": 0}, 1, "parallel.tp=0 must be at least 1"),
    ({"model__num_kv_heads": 0}, 1, "model.num_kv_heads=0 must be at least 1"),
    ({"parallel__zero_stage": 4}, 1, "parallel.zero_stage=4 is not one of 0, 1, 2, 3"),
    ({"parallel__optimizer_offload": "cpu"}, 1, "parallel.optimizer_offload=cpu needs ZeRO"),
    ({"parallel__grad_reduce_dtype": "bf16"}, 1, "parallel.grad_reduce_dtype=bf16 needs ZeRO"),
    ({"parallel__overlap_comm": False}, 1, "parallel.overlap_comm=false needs ZeRO"),
    ({"parallel__grad_reduce_dtype": "fp8", "parallel__zero_stage": 1}, 1,
     "parallel.grad_reduce_dtype='fp8' is not one of fp32, bf16"),
    ({"parallel__zero_stage": 3, "train__compile": True}, 1, "parallel.zero_stage=3 with train.compile=true"),
    ({"parallel__zero_stage": 2, "parallel__grad_reduce_dtype": "bf16", "train__precision": "fp16"}, 1,
     "reduce fp16 loss-scaled gradients in fp32"),
    ({"parallel__bucket_size_mb": 0}, 1, "parallel.bucket_size_mb=0 must be positive"),
    ({"optim__lr": float("inf")}, 1, "optim.lr=inf is not a finite number"),
    ({"optim__lr": float("nan")}, 1, "optim.lr=nan is not a finite number"),
    ({"parallel__timeout_s": float("inf")}, 1, "parallel.timeout_s=inf is not a finite number"),
    ({"model__rope_theta": float("-inf")}, 1, "model.rope_theta=-inf is not a finite number"),
]


@pytest.mark.parametrize(("changes", "world", "message"), RULES)
def test_each_rule_fires_with_its_message(changes, world, message):
    """Each inconsistency is rejected before anything starts, with a message naming the keys."""
    cfg = fill_defaults(valid(**changes), world)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    if message is None:
        message = "train.global_batch_size=8 is not a multiple of train.micro_batch_size=4 x parallel.dp=3"
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    """Independent problems come back in one error, one line each."""
    cfg = fill_defaults(valid(model__hidden_size=100, model__num_heads=3, train__seq_len=4096), 1)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert str(err.value).count("\n  - ") == 2
    assert "model.num_heads=3" in str(err.value) and "train.seq_len=4096" in str(err.value)


def test_defaults_are_derived():
    """dp fills the world, KV heads default to query heads, FFN and tying follow the architecture."""
    gpt = fill_defaults(valid(), 4)
    assert gpt.parallel.dp == 4 and gpt.model.num_kv_heads == 4 and gpt.model.ffn_hidden_size == 4 * 64
    assert gpt.model.tie_embeddings is True
    llama = fill_defaults(valid(model__arch="llama", model__hidden_size=256), 1)
    assert llama.model.ffn_hidden_size == 704 and llama.model.tie_embeddings is False  # 8/3*256 rounded up to 64
    assert llama.optim.warmup_steps == 1 and llama.optim.decay_steps == 99


# ------------------------------------------------------------------------------------------------ schedules
def schedule(style: str, **kw) -> list[float]:
    cfg = Config().optim
    cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps, cfg.decay_style = 1.0, 0.1, 10, 100, style
    for k, v in kw.items():
        setattr(cfg, k, v)
    return [lr_at(s, cfg) for s in range(130)]


def test_warmup_then_cosine():
    """Linear warmup to lr, cosine to min_lr over decay_steps (the last decay step lands on it), then flat."""
    lrs = schedule("cosine")
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[59] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lrs[108] > 0.1 and lrs[109] == pytest.approx(0.1)
    assert lrs[109:] == pytest.approx([0.1] * 21)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))


def test_linear_and_wsd_and_constant():
    """Linear decays evenly; WSD holds lr then decays over the last fraction; constant holds lr."""
    lin = schedule("linear")
    assert lin[35] == pytest.approx(1.0 - 0.9 * 26 / 100) and lin[109] == pytest.approx(0.1)
    wsd = schedule("wsd", wsd_decay_fraction=0.2)
    assert wsd[9:90] == pytest.approx([1.0] * 81)
    assert wsd[99] == pytest.approx(1.0 - 0.9 * 10 / 20) and wsd[109] == pytest.approx(0.1)
    assert schedule("constant")[50:] == pytest.approx([1.0] * 80)


# ------------------------------------------------------------------------------------------------ metrics
def test_mfu_arithmetic_and_peaks():
    """MFU = FLOPs/token x tokens/s / peak; peaks come from the override or the table, never a CPU guess."""
    assert mfu(6e9, 1e5, 989.4) == pytest.approx(6e9 * 1e5 / 989.4e12)
    assert mfu(6e9, 1e5, None) is None
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "bf16") is None
    assert peak_tflops(cpu, "bf16", override=12.5) == 12.5


def test_weight_decay_groups():
    """Matrices decay; norms, biases and embeddings do not (unless configured); every parameter once."""
    cfg = fill_defaults(valid(), 1)
    model = GPT(cfg.model)
    decay, no_decay = param_groups(model, cfg.optim)
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    emb = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    assert emb <= {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cfg.optim.decay_embeddings = True
    decay, _ = param_groups(model, cfg.optim)
    assert emb <= {id(p) for p in decay["params"]}


def test_dry_run_plans_a_tensor_parallel_layout_from_one_process():
    """One process plans a 32-rank TP8 x DP4 layout: each rank's exact parameter count and a smaller memory share."""
    overrides = ["model=llama_1b", "model.vocab_size=32000", "train.seq_len=2048", "train.micro_batch_size=1"]
    tp8 = subprocess.run([sys.executable, "-m", "engine.train", "train.dry_run=true", *overrides, "parallel.tp=8",
                          "parallel.dp=4", "parallel.sequence_parallel=true"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert tp8.returncode == 0, tp8.stderr
    assert "tp 8 + SP x pp 1 x dp 4 = 32 ranks" in tp8.stdout
    cfg = fill_defaults(composed(*overrides, "parallel.tp=8"), 32)
    assert f"every rank (layers 0-21): {parameters_per_rank(cfg.model, 8):,} parameters per tensor-parallel rank" \
        in tp8.stdout
    assert "vocab 32000 (padded to 32768)" in tp8.stdout  # 128 x tp 8 = 1024 divides 32768
    single = estimate_memory(fill_defaults(composed(*overrides), 1))[0]["total_gib"]
    assert float(tp8.stdout.split("total ")[1].split()[0]) < single / 5


def test_dry_run_prints_the_plan():
    """train.dry_run prints parameters, FLOPs/token and memory, and the model states each ZeRO stage would keep
    (16 bytes per parameter replicated; bf16 stage 3 over 8 ranks: 16 / 8), then exits."""
    r = subprocess.run([sys.executable, "-m", "engine.train", "model=llama_1b", "train.dry_run=true",
                        "model.vocab_size=32000", "train.seq_len=2048", "model.max_seq_len=2048", "parallel.dp=8",
                        "parallel.zero_stage=3", "train.precision=bf16", "train.global_batch_size=32"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "1,100,048,384 parameters" in r.stdout and "; ZeRO stage 3" in r.stdout
    psi = 1_100_048_384
    by_stage = [16 * psi, 4 * psi + 12 * psi / 8, 2 * psi + 14 * psi / 8, 16 * psi / 8]  # the ZeRO paper
    assert ("by parallel.zero_stage: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in enumerate(by_stage))
            + " <- this run") in r.stdout
    assert "FLOPs per token" in r.stdout and "every rank (layers 0-21)" in r.stdout and "estimated memory" in r.stdout
    flops_line = next(line for line in r.stdout.splitlines() if "FLOPs per token" in line)
    cfg = fill_defaults(composed("model=llama_1b", "model.vocab_size=32000", "train.seq_len=2048"), 1)
    assert float(flops_line.split(":")[1].split()[0]) == pytest.approx(flops_per_token(cfg.model, 2048), rel=1e-4)


def test_dry_run_plans_each_pipeline_stage():
    """A pp 4 plan from one process: each stage's layers, exact parameter count (the tied/untied head and the
    embedding at the ends) and the micro-batches its schedule keeps in flight (1F1B: pp - r; GPipe: all)."""
    overrides = ["model=llama_1b", "model.vocab_size=32000", "train.seq_len=2048", "train.micro_batch_size=1",
                 "train.global_batch_size=16", "parallel.pp=4", "parallel.dp=2", "parallel.pipeline_layers=[4,6,6,6]"]
    for schedule, in_flight in (("1f1b", [4, 3, 2, 1]), ("gpipe", [8, 8, 8, 8])):
        r = subprocess.run([sys.executable, "-m", "engine.train", "train.dry_run=true", *overrides,
                            f"parallel.pipeline_schedule={schedule}"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, r.stderr
        cfg = fill_defaults(composed(*overrides, f"parallel.pipeline_schedule={schedule}"), 8)
        lines = [line for line in r.stdout.splitlines() if line.startswith("pipeline stage")]
        assert [line.split("(layers ")[1].split(")")[0] for line in lines] == ["0-3", "4-9", "10-15", "16-21"]
        for line, row, held in zip(lines, estimate_memory(cfg), in_flight, strict=True):
            assert f"{row['parameters']:,} parameters per tensor-parallel rank" in line
            assert f"({held} micro-batch{'es' if held > 1 else ''} in flight)" in line, line
            assert row["activations_in_flight"] == held
        stages = [parameters_per_rank(cfg.model, 1, range(a, b)) for a, b in ((0, 4), (4, 10), (10, 16), (16, 22))]
        assert sum(stages) == count_parameters(cfg.model)  # untied Llama: every parameter on exactly one stage


@pytest.mark.parametrize(("args", "expected"), [
    (["train.stpes=10"], ["train.stpes: no such key; did you mean train.steps?"]),
    (["+modle.num_layers=2"], ["modle.num_layers: no such key; did you mean model.num_layers?"]),
    (["model=llama_tin"], ["model=llama_tin: no such option (options: gpt2_124m, gpt2_350m, gpt2_tiny, llama_1b, "
                           "llama_7b, llama_tiny); did you mean model=llama_tiny?"]),
    (["modle=llama_tiny"], ["modle: not a config group (model, parallel, data, optim, train, logging); did you mean "
                            "model?"]),
    (["train.steps=abc", "train.compile=maybe", "optim.lr=fast", "train.steps=null"],
     ["train.steps=abc: not an integer", "train.compile=maybe: not true or false", "optim.lr=fast: not a number",
      "train.steps=null: train.steps must be set"]),
    (["parallel.pipeline_layers=3"], ["parallel.pipeline_layers=3: a list, written [a,b,...]"]),
    (["data.split=98,1,1"], ["data.split=98,1,1: Hydra reads an unquoted comma as a sweep (-m); quote the value "
                             "(data.split='98,1,1') or give a list (data.split=[98,1,1])"]),
    (["-m", "optim.lr=1e-3,x", "model=gpt2_tiny,llama_tini"],
     ["optim.lr=x: not a number", "model=llama_tini: no such option (options: gpt2_124m, gpt2_350m, gpt2_tiny, "
                                  "llama_1b, llama_7b, llama_tiny); did you mean model=llama_tiny?"]),
])
def test_command_line_problems_are_found_before_hydra(args, expected):
    """Misspelt keys and options get a did-you-mean (Hydra's own advice is to add `+`), values that cannot be
    their key's type are named, and all of them come back together."""
    assert override_problems(args, REPO / "conf") == expected


def test_valid_command_lines_pass_the_check():
    args = ["model=llama_tiny", "train.steps=10", "parallel.dp=null", "data.split=[98,1,1]", "data.split=98/1/1",
            "optim.lr=${optim.min_lr}", "+train.seed=3", "hydra.run.dir=x", "--cfg", "job", "-m",
            "optim.lr=1e-3,3e-4", "train.steps=range(1,3)", "parallel.pipeline_layers=[1,1]", "train.compile=true",
            "data.prefix=[0.7,/d/web,0.3,/d/code]", "logging.wandb_entity=null"]
    assert override_problems(args, REPO / "conf") == []


def test_help_lists_every_key_with_a_line_saying_what_it_is():
    lines = {line.split()[0]: line for line in key_help().splitlines()}
    assert set(lines) == set(all_keys())
    for key, line in lines.items():
        note = line.split("  ")[-1].strip()
        assert note and not note.startswith(("null", "true", "false")), key


def test_choice_errors_do_not_hide_the_other_rules():
    cfg = fill_defaults(valid(train__precision="fp8", model__hidden_size=100, model__num_heads=3), 1)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert "train.precision='fp8'" in str(err.value) and "hidden_size=100 is not divisible" in str(err.value)


@pytest.mark.parametrize(("model", "preset", "tp", "world"), [("gpt2_124m", "pretrain_124m", 4, 32),
                                                              ("llama_1b", "pretrain_1b", 8, 32),
                                                              ("llama_1b", "pretrain_1b", 1, 64)])
def test_pretraining_presets_plan_real_layouts(model, preset, tp, world):
    """The presets' batch divides real layouts (the defaults' global batch of 8 does not), in bf16 at the model's
    context, with their own learning rate; a command-line key still wins."""
    cfg = fill_defaults(composed(f"model={model}", f"train={preset}", "model.vocab_size=32000", f"parallel.tp={tp}",
                                 "optim.min_lr=1e-5"), world)
    validate(cfg, world)
    assert cfg.train.precision == "bf16" and cfg.train.global_batch_size == 512
    assert cfg.train.seq_len == (1024 if model == "gpt2_124m" else 2048)
    assert cfg.optim.lr in (6e-4, 4e-4) and cfg.optim.min_lr == 1e-5 and cfg.train.save_interval == 1000


def test_sweep_jobs_are_named_by_their_swept_values():
    args = ["-m", "optim.lr=1e-3,3e-4", "data.prefix=/d/web", "model=gpt2_tiny,llama_tiny", "train.seed=range(1,3)"]
    job = ["optim.lr=0.0003", "data.prefix=/d/web", "model=llama_tiny", "train.seed=2"]
    assert sweep_job_name(3, job, args) == "3_optim.lr=0.0003_model=llama_tiny_train.seed=2"
    assert sweep_job_name(0, ["data.prefix=/d/a,b"], ["-m", "data.prefix=/d/a,b"]) == "0_data.prefix=_d_a,b"
