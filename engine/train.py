"""Training entry point: `python -m engine.train [overrides]`, or under torchrun for several ranks.

    python -m engine.train model=llama_tiny optim.lr=3e-4 train.steps=200
    torchrun --standalone --nproc-per-node 2 -m engine.train parallel=dp2
    python -m engine.train train.dry_run=true model=llama_1b
    python -m engine.train -m optim.lr=1e-3,3e-4          # a local sweep, one run directory per job

The configuration - and the files, device and packages it names - is checked before any process group starts;
every problem is reported at once, and the exit code is 2. SIGTERM or SIGUSR1 (Slurm's preemption and time-limit
warning) make every rank checkpoint after the current step and exit with 75; the same command then resumes. A run
stopped on non-finite values (train.nonfinite=stop, or train.max_skipped_steps exceeded) saves its last good state
and exits with 3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import kernels
from engine.config import (
    Config,
    ConfigError,
    fill_defaults,
    format_errors,
    key_help,
    micro_batches_per_step,
    override_problems,
    register_configs,
    samples_per_split,
    sweep_job_name,
    unknown_keys,
    validate,
)
from engine.data.builder import check_index_memory, open_shard, parse_prefix
from engine.data.gpt_dataset import parse_split
from engine.data.indexed_dataset import ShardFormatError
from engine.data.tokenizer import TokenizerError, load_tokenizer
from engine.launch import record_exit, recorded_exit
from engine.parallel.pipeline import PipelinePeerError, pipeline_place
from engine.parallel.state import init_parallel, pick_device, shutdown, world_from_env
from engine.training.checkpoint import (
    CheckpointError,
    checkpoint_weights,
    checkpoints_dir,
    find_resume_checkpoint,
    is_hf_model_dir,
    latest_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from engine.training.memory import memory_problem
from engine.training.numerics import EXIT_DIVERGED
from engine.training.preemption import EXIT_STOPPED, StopSignals, exit_together
from engine.training.reshard import TensorSource

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Hydra imports and calls whatever a `_target_` under hydra.* names (callbacks, launchers, sweepers) and logging's
# `()` factories before any of our code runs; from the command line that takes this flag (docs/training.md).
ALLOW_HYDRA_CODE = "--allow-hydra-callbacks"
_composed = False  # whether Hydra got as far as calling main(): its own failures before that exit 1
register_configs()
# --help's key list (conf/config.yaml hydra.help); `$` doubled for the string.Template Hydra fills the help into
OmegaConf.register_new_resolver("weft_keys", lambda: key_help().replace("$", "$$"))
# A sweep job's sub-directory, named by its swept values (conf/config.yaml hydra.sweep.subdir)
OmegaConf.register_new_resolver("weft_sweep_job", lambda num, job: sweep_job_name(num, list(job), sys.argv[1:]))


def to_config(cfg: DictConfig) -> Config:
    """The composed Hydra config as our dataclasses, refusing keys the schema does not define."""
    extra = unknown_keys(OmegaConf.to_container(cfg, resolve=True))
    if extra:
        raise ConfigError("unknown configuration keys: " + ", ".join(extra) + " (added with '+'? check the spelling "
                          "against `python -m engine.train --cfg job`)")
    return OmegaConf.to_object(cfg)


def dry_run(cfg: Config) -> None:
    """Print what the run would be - parameters, FLOPs per token, each stage's share and memory - without
    allocating it."""
    print("\n".join(dry_run_lines(cfg)))


def dry_run_lines(cfg: Config) -> list[str]:
    """The dry run's report (tools/plan.py prints it too, before its fit and step-time estimate)."""
    from engine.model.flops import count_parameters, flops_per_token
    from engine.parallel.layers import padded_vocab_size
    from engine.training.memory import estimate_memory

    lines = []
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tp, cfg.model.make_vocab_size_divisible_by)
    n = count_parameters(cfg.model)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    lines.append(f"model {m.name} ({m.arch}): {n:,} parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
                 f"{m.num_heads} heads ({m.num_kv_heads} KV), ffn {m.ffn_hidden_size}, vocab {m.vocab_size}"
                 + (f" (padded to {padded})" if padded != m.vocab_size else ""))
    lines.append(f"FLOPs per token (training): {flops_per_token(m, t.seq_len):.4g} at seq_len {t.seq_len}")
    micro = micro_batches_per_step(cfg)
    zero = (f"; ZeRO stage {p.zero_stage}" + (", optimizer offloaded to the CPU" if p.optimizer_offload == "cpu"
                                              else "")) if p.zero_stage else ""
    lines.append(f"layout: tp {p.tp}{' + SP' if p.sequence_parallel and p.tp > 1 else ''} x pp {p.pp} x dp {p.dp} = "
                 f"{p.tp * p.pp * p.dp} ranks; global batch {t.global_batch_size} = micro {t.micro_batch_size} x "
                 f"accumulation {micro} x dp {p.dp}"
                 + (f"; schedule {p.pipeline_schedule}"
                    + (f" over {p.virtual_stages} chunks per rank" if p.virtual_stages > 1 else "")
                    if p.pp > 1 else "") + zero)
    for row in estimate_memory(cfg):
        layers = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in row["layers"])
        where = "every rank" if p.pp == 1 else pipeline_place(row["pp_rank"], p.pp, p.virtual_stages)
        n = row["activations_in_flight"]
        held = ("micro-batch" + ("es" if n != 1 else "") if p.virtual_stages == 1
                else "(micro-batch, chunk) activation" + ("s" if n != 1 else ""))
        lines.append(f"{where} (layers {layers}): {row['parameters']:,} parameters per tensor-parallel rank; estimated "
                     "memory: " + ", ".join(f"{k.removesuffix('_gib')} {row[k]:.2f} GiB" for k in
                                 ("parameters_gib", "gradients_gib", "optimizer_gib", "activations_gib", "working_gib",
                                  "total_gib"))
                     + f" ({n} {held} in flight)"
                     + (f"; the optimizer's {row['host_bytes'] / 2**30:.2f} GiB are in host memory, not in the total"
                        if row["host_bytes"] else ""))
        stages = row["model_state_bytes"]
        lines.append("  model states (parameters, gradients, master weights, AdamW) by parallel.zero_stage: "
                     + ", ".join(f"{k} {v / 2**30:.2f} GiB" + (" <- this run" if k == p.zero_stage else "")
                                 for k, v in stages.items()))
    lines.append("(norms, row biases, positions and K/V heads fewer than tp are whole on every tensor-parallel rank)")
    return lines


def prepare_run_dir(run_dir: Path, config: Config, resume_step: int | None) -> None:
    """Create the run directory (logging rank only), write the resolved config, and set up metrics.jsonl.

    A fresh run moves an older metrics.jsonl aside. A resumed run appends to it, after moving the lines for steps
    past the checkpoint (logged before a crash, about to be redone) to metrics.rolled_back.jsonl.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and resume_step is None:
        kept = run_dir / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        shutil.move(metrics, kept)
        print(f"note: {run_dir} already held metrics.jsonl; moved it to {kept.name}", file=sys.stderr)
    elif metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        keep, redo = [], []
        for line in lines:
            (keep if _logged_step(line) <= resume_step else redo).append(line)
        if redo:
            with open(run_dir / "metrics.rolled_back.jsonl", "a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in redo)
            tmp = metrics.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, metrics)
    # The configuration that runs: every derived default (dp, vocabulary, FFN size, schedule lengths) filled in.
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a crash mid-write counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def model_vocab_size(config: Config) -> int | None:
    """model.vocab_size, else the size of data.tokenizer's vocabulary."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    try:
        return load_tokenizer(config.data.tokenizer, fast_backend=False).vocab_size
    except TokenizerError as e:
        raise ConfigError(f"data.tokenizer: {e}; point it at the tokenizer the shards were written with, or set "
                          "model.vocab_size") from None


# The model settings that shape a checkpoint's parameters (gpt2 adds its position table, max_seq_len).
SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
              "tie_embeddings")


def resume_model_problem(config: Config, run_dir: Path) -> str | None:
    """Why train.resume=auto cannot continue run_dir's latest checkpoint with this model - what the checkpoint
    holds and the overrides that match it - or None (a damaged checkpoint is the resume's own check to report)."""
    try:
        step = latest_checkpoint(run_dir)
        saved = read_meta(step)["config"]["model"] if step is not None else None
    except (CheckpointError, KeyError, TypeError):
        return None
    if not isinstance(saved, dict):
        return None
    ours = asdict(config.model)
    keys = SHAPE_KEYS + (("max_seq_len",) if saved.get("arch") == "gpt2" else ())
    differ = [k for k in keys if k in saved and saved[k] != ours[k]]
    if not differ:
        return None

    def describe(m: dict) -> str:
        return f"{m.get('name')!r}: " + ", ".join(f"{k} {m.get(k)}" for k in differ)

    name = saved.get("name")
    preset = f"model={name} " if name and (Path(CONF_DIR) / "model" / f"{name}.yaml").exists() else ""
    overrides = " ".join(f"model.{k}={json.dumps(saved[k])}" for k in differ)
    return (f"{run_dir} holds a checkpoint ({step.name}) of another model: {describe(saved)}; this run's is "
            f"{describe(ours)}. To resume it, pass {preset}{overrides}; to start a new run, use another "
            "train.run_dir (or train.resume=none to overwrite it)")


def environment_problems(config: Config, run_dir: Path, valid: bool) -> list[str]:
    """What the configuration names must exist (the shards, the device, optional packages) and, when it is `valid`
    (the sizes below divide), fit: memory, the checkpoint it would resume."""
    errors = []
    if valid and config.train.resume == "auto" and (problem := resume_model_problem(config, run_dir)):
        errors.append(problem)
    if config.model.vocab_size is not None:  # None: the tokenizer would not load, and that is reported already
        try:
            tokenizer = load_tokenizer(config.data.tokenizer, fast_backend=False)
            if config.model.vocab_size < tokenizer.vocab_size:
                errors.append(f"model.vocab_size={config.model.vocab_size} is smaller than data.tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size}): its ids would not fit; raise it or leave it unset")
        except TokenizerError as e:
            errors.append(f"data.tokenizer: {e}")
    try:
        parse_split(config.data.split)
        blend = parse_prefix(config.data.prefix)
        shards = [open_shard(prefix) for _, prefix in blend]
        if valid:
            check_index_memory(shards, [w for w, _ in blend], config.data.split, config.train.seq_len,
                               samples_per_split(config))
    except (ShardFormatError, ValueError) as e:
        errors.append(f"data: {e}")
    try:
        device = pick_device(config.train.device)
        if config.optim.impl == "fused" and device.type != "cuda":
            errors.append("optim.impl=fused needs CUDA; use optim.impl=auto (foreach on CPU)")
        if valid and (problem := memory_problem(config, device)):
            errors.append(problem)
    except RuntimeError as e:
        errors.append(str(e))
    if config.optim.impl == "apex" and importlib.util.find_spec("apex") is None:
        errors.append("optim.impl=apex but NVIDIA apex is not installed (not on PyPI: build it from "
                      "github.com/NVIDIA/apex), or use optim.impl=auto")
    try:
        kernels.configure(config.kernels.backend, config.kernels.attention)
    except (RuntimeError, ValueError) as e:
        errors.append(str(e))
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        errors.append("logging.wandb=true but wandb is not installed: pip install wandb, or set logging.wandb=false")
    if config.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        # torch.utils.tensorboard imports the tensorboard package only when a writer is made: fail before training.
        errors.append("logging.tensorboard=true but tensorboard is not installed: pip install tensorboard, or set "
                      "logging.tensorboard=false")
    if config.train.init_from and not is_hf_model_dir(config.train.init_from):
        try:
            resolve_checkpoint(config.train.init_from)
        except CheckpointError as e:
            errors.append(f"train.init_from: {e} (or give a Hugging Face model directory)")
    return errors


def init_weights(path: str) -> TensorSource:
    """train.init_from's weights: a checkpoint of ours in any layout, or a transformers directory."""
    if is_hf_model_dir(path):
        from engine.hf import hf_weights  # needs transformers: imported only for a transformers directory

        return hf_weights(path)
    return checkpoint_weights(path)


def pipeline_bubble_warning(config: Config) -> str | None:
    """Why this pipeline would mostly idle (fewer micro-batches per step than stages), or None. (The interleaved
    schedule never gets here: it needs a multiple of pp.)"""
    p, m = config.parallel, micro_batches_per_step(config)
    if p.pp == 1 or m >= p.pp:
        return None
    bubble = (p.pp - 1) / (m + p.pp - 1)
    return (f"{m} micro-batch{'es' if m > 1 else ''} per step for parallel.pp={p.pp} stages: the pipeline idles "
            f"~{bubble:.0%} of each step ((pp - 1) / (m + pp - 1)); raise train.global_batch_size or lower "
            "train.micro_batch_size so that train.global_batch_size / (train.micro_batch_size x dp) >= pp, "
            "ideally several times pp")


def tp_placement_warning(tp: int, local_world_size: int | None) -> str | None:
    """Why this launch's tensor-parallel groups would cross nodes (they are consecutive ranks), or None."""
    if tp == 1 or local_world_size is None or local_world_size % tp == 0:
        return None
    return (f"parallel.tp={tp} but {local_world_size} processes per node: tensor-parallel groups are consecutive "
            "ranks, so some span nodes and every layer's collectives cross the network; make the processes per "
            "node a multiple of parallel.tp")


def run_directory(config: Config) -> Path:
    """train.run_dir; in a Hydra multirun sweep, the job's own sub-directory of it."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.runtime.output_dir)
    return Path(config.train.run_dir)


def configuration_problems(config: Config, world: int, run_dir: Path) -> list[str]:
    """Every problem of `config` for `world` ranks at once, the environment's too unless it is a dry run; fills in
    the derived defaults on the way."""
    problems: list[str] = []
    try:
        vocab = model_vocab_size(config)
    except ConfigError as e:
        vocab, problems = None, e.problems
    fill_defaults(config, world, vocab)
    try:
        validate(config, world)
    except ConfigError as e:  # (its "vocab_size=None: set it" would repeat the tokenizer's problem)
        problems += [m for m in e.problems if vocab is not None or not m.startswith("model.vocab_size=None")]
    if not config.train.dry_run:
        problems += environment_problems(config, run_dir, valid=not problems)
    return problems


def run(cfg: DictConfig, stop: StopSignals) -> None:
    """Validate everything, then set up the mesh and train; after a stop signal (`stop`) every rank checkpoints and
    the process exits 75; after non-finite values that train.nonfinite stops on, 3 (exit_together)."""
    config = to_config(cfg)
    rank, world = world_from_env()
    p = config.parallel
    if config.train.dry_run and world == 1:  # plan the layout the configuration asks for, from one process
        world = p.tp * p.pp * (p.dp or 1)
    run_dir = run_directory(config)
    problems = configuration_problems(config, world, run_dir)
    if problems:
        raise ConfigError(problems)
    bubble = pipeline_bubble_warning(config)
    if bubble and rank == 0:
        warnings.warn(bubble, stacklevel=1)
    if config.train.dry_run:
        if rank == 0:
            dry_run(config)
        return
    local = os.environ.get("LOCAL_WORLD_SIZE")
    placement = tp_placement_warning(config.parallel.tp, int(local) if local else None)
    if placement and rank == 0:
        warnings.warn(placement, stacklevel=1)
    from engine.parallel import comm
    from engine.training.trainer import Trainer, run_info, write_json
    from engine.training.watchdog import Watchdog, nccl_flight_recorder_env

    device = pick_device(config.train.device)
    if device.type == "cuda":  # read when NCCL starts: its flight recorder then dumps into run_dir/faults/
        os.environ.update(nccl_flight_recorder_env(run_dir))
    state = init_parallel(p.tp, p.pp, p.dp, device, p.backend, p.timeout_s, checkpoint_group=config.train.async_save)
    # A rank stuck in a collective past parallel.timeout_s, or whose peer died, ends and says what it waited on.
    watchdog = Watchdog(state, run_dir, p.timeout_s).start() if world > 1 else None
    trainer = None
    try:
        t = config.train
        checkpoint = (find_resume_checkpoint(run_dir, state, t.verify_checkpoint, t.resume_fallback)
                      if t.resume == "auto" else None)
        resume_step = read_meta(checkpoint)["step"] if checkpoint is not None else None
        if state.is_logging_rank:
            if checkpoint is not None:
                print(f"resuming from {checkpoint} (step {resume_step})")
            elif config.train.resume == "auto":
                print(f"no checkpoint in {checkpoints_dir(run_dir)}: starting fresh")
            elif (checkpoints_dir(run_dir) / "latest").exists():
                print(f"note: train.resume=none, but {checkpoints_dir(run_dir)} holds an earlier run's "
                      "checkpoints; this run's own replace them as it reaches their steps", file=sys.stderr)
            prepare_run_dir(run_dir, config, resume_step)
        if world > 1:
            comm.barrier()
        trainer = Trainer(config, state, run_dir)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        elif config.train.init_from:
            trainer.init_weights_from(init_weights(config.train.init_from))
        if state.is_logging_rank:
            write_json(run_dir / "run_info.json", run_info(config, state, trainer.model))
        trainer.fit(stop)
        if trainer.diverged is not None:
            exit_together(EXIT_DIVERGED, world > 1)
        if trainer.stopped_by is not None:
            exit_together(EXIT_STOPPED, world > 1)
        if state.is_logging_rank:
            print(f"done: {config.train.steps} steps; metrics in {run_dir / 'metrics.jsonl'}")
    except Exception as e:
        if world > 1 and not isinstance(e, CheckpointError):
            # Say where: the other ranks see only a closed connection or a timeout (parallel.timeout_s).
            c = state.coords()
            step = f" in step {trainer.step + 1}" if trainer is not None else " at start-up"
            what = "stopped" if isinstance(e, PipelinePeerError) else "failed"
            where = pipeline_place(c.pp, p.pp, p.virtual_stages)
            print(f"error: rank {state.rank} of {world} ({where}, tensor rank {c.tp}, data rank {c.dp}) {what}"
                  f"{step}: {type(e).__name__}: {e}", file=sys.stderr)
        if watchdog is not None and not isinstance(e, CheckpointError):  # that one is agreed and says it all
            watchdog.report(f"{type(e).__name__}: {e}")
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        shutdown()


def code_running_overrides(args: list[str]) -> list[str]:
    """The command-line overrides that would make Hydra call code: hydra.callbacks, or any `_target_` or `()` key
    under hydra."""
    out = []
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~").replace("/", ".")
        parts = key.split(".")
        if "=" in arg and parts[0] == "hydra" and ({"callbacks", "_target_", "()"} & set(parts)):
            out.append(arg)
    return out


def command_line_problems(args: list[str]) -> list[str]:
    """What `cli` refuses in `args` before Hydra sees them: overrides that would run code (unless ALLOW_HYDRA_CODE
    is among them), and `override_problems`."""
    allowed = ALLOW_HYDRA_CODE in args
    args = [a for a in args if a != ALLOW_HYDRA_CODE]
    refused = [] if allowed else code_running_overrides(args)
    problems = [f"{' '.join(refused)}: Hydra would import and call what this names at start-up; a command-line "
                f"override may not run code unless {ALLOW_HYDRA_CODE} is given (put trusted callbacks in a config file "
                "instead: configs are code, docs/training.md)"] if refused else []
    return problems + override_problems(args, CONF_DIR)


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings for people running a job: the message, not the source line that raised it."""
    return f"warning: {message}\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    global _composed
    _composed = True
    warnings.formatwarning = _plain_warning
    rank, _ = world_from_env()
    # From here on SIGTERM and SIGUSR1 (preemption, Slurm's time-limit warning) only ask for a stop: after the next
    # step every rank checkpoints and the process exits 75 (engine/training/preemption.py).
    with StopSignals() as stop:
        try:
            run(cfg, stop)
        except ConfigError as e:
            if rank == 0:  # every rank finds the same problem; say it once
                print(f"error: {e}", file=sys.stderr)
            else:  # torchrun stops every rank when one exits: let rank 0 say it first
                time.sleep(2.0)
            record_exit(2)
            sys.exit(2)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


def cli() -> None:
    """`python -m engine.train` and `weft-train`: refuse overrides that run code unless allowed, then start Hydra."""
    earlier = recorded_exit()
    if earlier is not None:  # a restart by engine.launch after a stop or a refused config would only repeat it
        if world_from_env()[0] == 0:
            print(f"note: this launch's ranks already ended with exit {earlier}; not restarting", file=sys.stderr)
        sys.exit(earlier)
    problems = command_line_problems(sys.argv[1:])
    if ALLOW_HYDRA_CODE in sys.argv:  # ours, not Hydra's
        sys.argv.remove(ALLOW_HYDRA_CODE)
    if problems:  # every one at once, where Hydra would stop at the first with its own advice (add `+`)
        if world_from_env()[0] == 0:
            print(f"error: {format_errors(problems)}", file=sys.stderr)
        record_exit(2)
        sys.exit(2)
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _composed:  # Hydra could not compose the config it printed: an invalid configuration
            record_exit(2)
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli()
