"""`python -m engine.train` and torchrun as users run them: the run directory, errors, sweeps, DP=2 == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from engine.data.preprocess import preprocess
from engine.parallel.state import ParallelState
from engine.train import configuration_problems
from engine.training.trainer import Trainer
from tests.test_trainer import tiny_config, write_pattern_shard

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.max_seq_len=64", "train.seq_len=32",
        "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_interval=2",
        "train.eval_interval=3", "train.eval_iters=1", "data.tokenizer=byte", "data.split=80/20/0"]


@pytest.fixture(scope="module")
def shard(tmp_path_factory, stdlib_corpus) -> str:
    prefix = tmp_path_factory.mktemp("cli") / "stdlib"
    preprocess([stdlib_corpus], str(prefix), tokenizer="byte", progress=False, log=lambda *a, **k: None)
    return str(prefix)


def train(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the trainer from `cwd` (not the checkout: it must work from anywhere)."""
    cmd = (launcher or [sys.executable]) + ["-m", "engine.train", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(tmp_path, shard):
    """One run writes config.yaml, run_info.json, metrics.jsonl and its final checkpoint, and nothing else."""
    run = tmp_path / "run"
    r = train([*TINY, f"data.prefix={shard}", f"train.run_dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "run_info.json"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 1 and (info["tp"], info["pp"], info["dp"]) == (1, 1, 1)
    assert info["parameters"] == info["parameters_rank0"] > 0 and info["versions"]["torch"]
    resolved = OmegaConf.load(run / "config.yaml")  # what ran, derived defaults filled in
    assert resolved.data.prefix == shard and resolved.model.vocab_size == 257 and resolved.parallel.dp == 1
    assert resolved.model.ffn_hidden_size == 4 * 32 and resolved.optim.decay_steps == 6 - resolved.optim.warmup_steps
    lines = metrics(run)
    assert [m["step"] for m in lines if "val_loss" in m] == [0, 3, 6]
    assert [m["step"] for m in lines if "loss" in m] == [2, 4, 6]
    assert "val_loss" in r.stdout and "tok/s" in r.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("model.num_heads=3", "model.num_heads=3"),
    ("+train.stepz=1", "train.stepz: no such key; did you mean train.steps?"),
    ("data.split=abc", "data.split='abc'"),
    ("data.prefix=/nonexistent/shard", "/nonexistent/shard.idx: no such file"),
    ("data.tokenizer=/nonexistent/tok", "data.tokenizer: tokenizer /nonexistent/tok: no such file"),
    ("optim.impl=fused", "optim.impl=fused needs CUDA"),
    ("train.device=cuda", "train.device=cuda but no CUDA device"),
    ("kernels.backend=triton", "kernels.backend='triton'"),
    # would build a sample index of ~10^16 GiB (the Llama sample of 10^9 tokens: test_runs_that_cannot_fit...)
    ("train.steps=1000000000000000000000", "the sample indices for 8,000,000,000,000,000,000,000 train"),
])
def test_bad_configuration_exits_2_before_starting(tmp_path, shard, override, message):
    """Bad values, and files or devices that do not exist, exit 2 naming the key; no run directory appears."""
    r = train([*TINY, f"data.prefix={shard}", f"train.run_dir={tmp_path / 'run'}", *override.split()], tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_at_start(tmp_path, shard):
    """model.vocab_size below the tokenizer's fails before anything starts, not as an embedding IndexError."""
    r = train([*TINY, f"data.prefix={shard}", f"train.run_dir={tmp_path / 'run'}", "model.vocab_size=100"], tmp_path)
    assert r.returncode == 2
    assert "model.vocab_size=100 is smaller than data.tokenizer's vocabulary" in r.stderr
    assert not (tmp_path / "run").exists()


def test_shards_from_another_tokenizer_are_refused(tmp_path):
    """Shards holding ids past the model's vocabulary (written with another tokenizer) stop at the first batch
    with a message naming the mismatch."""
    cfg = tiny_config(write_pattern_shard(tmp_path / "big", vocab=1000), str(tmp_path / "cache"))
    trainer = Trainer(cfg, ParallelState(1, 1, 1, 0, torch.device("cpu")), tmp_path / "run")
    with pytest.raises(ValueError, match=r"outside model\.vocab_size=257.*another tokenizer"):
        trainer.train_step()


def test_multirun_sweep_gets_one_directory_per_job(tmp_path, shard):
    """`-m optim.lr=a,b` runs both jobs, each in its own run directory, named by its number and swept value."""
    base = tmp_path / "sweep"
    r = train(["-m", *TINY, "train.steps=2", "train.log_interval=1", "train.eval_interval=0", f"data.prefix={shard}",
               f"train.run_dir={base}", "optim.lr=1e-3,2e-3"], tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = [base / "multirun" / name for name in ("0_optim.lr=0.001", "1_optim.lr=0.002")]
    assert sorted(p.name for p in (base / "multirun").iterdir() if p.is_dir()) == [job.name for job in jobs]
    assert all((job / "run_info.json").exists() for job in jobs)
    assert [next(m for m in metrics(job) if "lr" in m)["lr"] for job in jobs] == [1e-3, 2e-3]  # end of warmup


# The torchrun launch path once in make test (TP, the harder layout); DP's twin in make test-slow (DP == one
# process is also tested in-process by test_trainer).
@pytest.mark.parametrize("layout", [pytest.param(["parallel=dp2"], id="dp2", marks=pytest.mark.slow),
                                    pytest.param(["parallel.tp=2", "parallel.sequence_parallel=true"], id="tp2-sp")])
def test_torchrun_two_ranks_match_one_process(tmp_path, shard, layout):
    """torchrun with 2 gloo ranks (env://), data or tensor parallel, logs the single process's losses (rtol 1e-5),
    from one rank."""
    common = [*TINY, f"data.prefix={shard}", f"data.cache_dir={tmp_path / 'cache'}"]
    r1 = train([*common, f"train.run_dir={tmp_path / 'one'}"], tmp_path)
    assert r1.returncode == 0, r1.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r2 = train([*common, *layout, f"train.run_dir={tmp_path / 'two'}"], tmp_path, launcher=torchrun)
    assert r2.returncode == 0, r2.stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    np.testing.assert_allclose([m["loss"] for m in two if "loss" in m], [m["loss"] for m in one if "loss" in m],
                               rtol=1e-5)
    assert r2.stdout.count("step      2 |") == 1  # one logging rank
    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    tp = 2 if "parallel.tp=2" in layout else 1
    assert (info["dp"], info["tp"]) == (2 // tp, tp)
    if tp == 2:  # rank 0 holds its half of the matrices (plus replicated norms, biases, positions)
        assert info["parameters_rank0"] < 0.6 * info["parameters"]


def test_resume_appends_and_rolls_back_redone_steps(tmp_path, shard):
    """train.resume=auto continues from `latest`; metrics.jsonl keeps one line per step, the lines of steps
    redone after the checkpoint moved to metrics.rolled_back.jsonl, nothing lost."""
    run = tmp_path / "run"
    args = [*TINY, f"data.prefix={shard}", f"train.run_dir={run}", "train.log_interval=1", "train.eval_interval=0"]
    r = train([*args, "train.steps=4", "optim.warmup_steps=1", "optim.decay_steps=10"], tmp_path)
    assert r.returncode == 0 and "no checkpoint" in r.stdout, r.stderr
    # Pretend the first run went on to log steps 5 and 6 before dying without a checkpoint.
    with open(run / "metrics.jsonl", "a") as f:  # ... and died mid-write: a torn last line
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n" + json.dumps({"step": 6, "loss": 0.0}) + "\n")
        f.write('{"step": 7, "lo')
    r = train([*args, "train.steps=8", "optim.warmup_steps=1", "optim.decay_steps=10"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {run / 'checkpoints' / 'step_00000004'} (step 4)" in r.stdout
    steps = [m["step"] for m in metrics(run) if "loss" in m]
    assert steps == list(range(1, 9))
    rolled_back = (run / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rolled_back[:2]] == [5, 6] and rolled_back[2] == '{"step": 7, "lo'



def test_tensor_parallel_groups_crossing_nodes_are_warned_about():
    """TP groups are consecutive ranks: fewer processes per node than a multiple of tp puts one across nodes."""
    from engine.train import tp_placement_warning

    assert tp_placement_warning(2, 8) is None and tp_placement_warning(8, 8) is None
    assert tp_placement_warning(1, 3) is None and tp_placement_warning(4, None) is None  # no torchrun: one node
    assert "parallel.tp=8 but 4 processes per node" in tp_placement_warning(8, 4)
    assert "span nodes" in tp_placement_warning(4, 6)


@pytest.mark.slow  # resharding on resume is in the fast tier in-process (test_tensor_parallel_checkpoint)
def test_a_tensor_parallel_launch_resumes_a_single_process_run(tmp_path, shard):
    """torchrun with TP=2 (+SP) into a run directory of single-process checkpoints resumes them, resharded, says so
    once, and logs the uninterrupted single-process run's losses (rtol 1e-5)."""
    common = [*TINY, f"data.prefix={shard}", f"data.cache_dir={tmp_path / 'cache'}", "train.log_interval=1",
              "optim.warmup_steps=1", "optim.decay_steps=10"]
    assert train([*common, "train.steps=8", f"train.run_dir={tmp_path / 'full'}"], tmp_path).returncode == 0
    run = tmp_path / "run"
    assert train([*common, "train.steps=4", f"train.run_dir={run}"], tmp_path).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = train([*common, "train.steps=8", f"train.run_dir={run}", "parallel.tp=2", "parallel.sequence_parallel=true"],
              tmp_path, launcher=torchrun)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {run / 'checkpoints' / 'step_00000004'} (step 4)" in r.stdout
    assert r.stderr.count("saved as tp 1 x pp 1 x dp 1, this run is tp 2 x pp 1 x dp 1") == 1, r.stderr
    full, resumed = metrics(tmp_path / "full"), metrics(run)
    assert [m["step"] for m in resumed if "loss" in m] == list(range(1, 9))
    np.testing.assert_allclose([m["loss"] for m in resumed if "loss" in m][4:],
                               [m["loss"] for m in full if "loss" in m][4:], rtol=1e-5)


def test_help_explains_usage_and_exit_codes(tmp_path):
    """`--help` starts with how to run it, its exit codes (75: stopped after a checkpoint), then the groups."""
    r = train(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("python -m engine.train [group=option ...]")
    assert "75 stopped by SIGTERM/SIGUSR1 after a checkpoint" in r.stdout and "model: gpt2_124m" in r.stdout


def test_hydra_overrides_that_run_code_need_a_flag(tmp_path):
    """`+hydra.callbacks.x._target_=os.makedirs` would be called by Hydra before any of our code: refused (exit 2,
    nothing created) unless --allow-hydra-callbacks is given, which lets it through."""
    made = tmp_path / "made-by-a-callback"
    args = ["+hydra.callbacks.x._target_=os.makedirs", f"+hydra.callbacks.x.name={made}", "train.dry_run=true"]
    r = train(args, tmp_path)
    assert r.returncode == 2 and "may not run code unless --allow-hydra-callbacks" in r.stderr, r.stderr
    assert not made.exists()
    train(["--allow-hydra-callbacks", *args], tmp_path)
    assert made.is_dir()


def test_which_hydra_overrides_count_as_code():
    from engine.train import code_running_overrides

    harmless = ["hydra.run.dir=out", "hydra/job_logging=disabled", "hydra.verbose=true", "model=llama_tiny",
                "train.run_dir=callbacks", "~hydra.callbacks"]
    code = ["+hydra.callbacks.a._target_=os.system", "++hydra.launcher._target_=x.y", "hydra/callbacks=mine",
            "+hydra.job_logging.handlers.h.()=os.system"]
    assert code_running_overrides(harmless + code) == code


def test_checkpoints_and_exports_follow_the_umask(tmp_path, shard):
    """Under umask 027 every checkpoint and export file is 0640: group-readable on a shared file system (safetensors
    alone writes 0600), and no more than the umask allows."""
    run, hf = tmp_path / "run", tmp_path / "hf"
    script = (f"umask 027 && {sys.executable} -m engine.train {' '.join(TINY)} data.prefix={shard} "
              f"train.run_dir={run} && {sys.executable} {REPO / 'tools' / 'export_hf.py'} --checkpoint {run} "
              f"--output {hf}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = [f for f in (run / "checkpoints").rglob("*") if f.is_file()] + [f for f in hf.iterdir() if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files) and any(f.parent == hf for f in files)
    modes = {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o640"}, modes
    tok = json.loads((hf / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 64  # model.max_seq_len, not transformers' "no limit"


def test_resuming_with_another_model_says_what_the_checkpoint_holds(tmp_path, shard):
    """A resume whose model= is missing or different exits 2 naming the checkpoint's model and the overrides that
    match it (not a list of missing parameter names), and the command it suggests resumes."""
    run = tmp_path / "run"
    base = [*TINY, f"data.prefix={shard}", f"train.run_dir={run}", "train.eval_interval=0"]
    assert train(base, tmp_path).returncode == 0
    r = train([*base, "model=llama_tiny", "train.steps=8"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "holds a checkpoint (step_00000006) of another model: 'gpt2_tiny': arch gpt2" in r.stderr
    assert "this run's is 'llama_tiny': arch llama" in r.stderr and "Traceback" not in r.stderr
    fix = r.stderr.split("To resume it, pass ")[1].split(";")[0].split()
    assert fix[0] == "model=gpt2_tiny" and "model.arch=\"gpt2\"" in fix
    resumed = train([*base, "model=llama_tiny", "train.steps=8", *fix], tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]


def test_every_problem_comes_in_one_message(tmp_path, shard):
    """A tokenizer that does not load, a bad choice and a rule broken: all three reported at once, exit 2 (today
    the tokenizer's error hides the others); and misspelt keys get a did-you-mean rather than Hydra's `+` advice."""
    r = train([*TINY, f"data.prefix={shard}", "data.tokenizer=/nonexistent/tok", "train.precision=fp8",
               "model.num_heads=3"], tmp_path)
    assert r.returncode == 2
    for message in ("data.tokenizer: tokenizer /nonexistent/tok: no such file", "train.precision='fp8' is not one of",
                    "model.hidden_size=32 is not divisible by model.num_heads=3"):
        assert message in r.stderr, r.stderr
    assert "model.vocab_size=None" not in r.stderr


def test_runs_that_cannot_fit_are_refused_at_start(tmp_path, monkeypatch):
    """A Llama sample of 10^9 tokens over a 21k-token shard: its sample index (~43 GiB) and a rank's activations
    (~10^4 GiB) are both named, before anything is built (in process: what the CLI runs before any process group)."""
    cfg = tiny_config(write_pattern_shard(tmp_path / "shard"), str(tmp_path / "cache"), "llama")
    cfg.train.seq_len = 10**9
    for module in ("engine.data.builder", "engine.training.memory"):  # a 16 GiB host, whatever this one has
        monkeypatch.setattr(f"{module}.available_host_memory", lambda: 16 * 2**30)
    problems = configuration_problems(cfg, 1, tmp_path / "run")
    assert any(p.startswith("data: the sample indices for") and "samples of 1,000,000,000 tokens" in p
               for p in problems), problems
    assert any(p.startswith("a rank would need about") for p in problems), problems
    assert not (tmp_path / "cache").exists()


def test_data_split_takes_the_list_form(tmp_path, shard):
    """`data.split=[80,20,0]`, the form Hydra's own error suggests for a comma-separated value, trains."""
    r = train([*TINY, f"data.prefix={shard}", f"train.run_dir={tmp_path / 'run'}", "data.split=[80,20,0]",
               "train.steps=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_help_lists_the_keys(tmp_path):
    r = train(["--help"], tmp_path)
    assert r.returncode == 0 and "== Keys" in r.stdout
    assert "  train.steps " in r.stdout and "optimizer steps to train" in r.stdout
    assert "  parallel.zero_stage " in r.stdout and "Exit codes: 0 done; 2 invalid configuration" in r.stdout


@pytest.mark.parametrize("package,key", [("wandb", "logging.wandb"), ("tensorboard", "logging.tensorboard")])
def test_a_missing_logging_package_is_refused_at_start(tmp_path, monkeypatch, package, key):
    """logging.wandb or logging.tensorboard without its package: named at start (exit 2), not at the first log."""
    import importlib.util

    cfg = tiny_config(write_pattern_shard(tmp_path / "shard"), str(tmp_path / "cache"), "llama")
    setattr(cfg.logging, key.split(".")[1], True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    problems = configuration_problems(cfg, 1, tmp_path / "run")
    assert any(p.startswith(f"{key}=true but {package} is not installed") for p in problems), problems
