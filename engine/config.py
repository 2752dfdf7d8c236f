"""The typed configuration of a run, and every consistency rule checked before any process group starts.

Hydra composes `conf/` into these dataclasses (registered in its ConfigStore as `weft_schema`); `validate`
turns a composed config plus a world size into either nothing or one `ConfigError` listing every problem found,
each naming the keys involved and a fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import io
import json
import math
import os
import re
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_ARCHS = ("gpt2", "llama")
PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE = ("none", "selective", "full")
DECAY_STYLES = ("cosine", "linear", "wsd", "constant")
OPTIM_IMPLS = ("auto", "fused", "foreach", "apex")
KERNEL_BACKENDS = ("auto", "triton", "torch")
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "sdpa")
GRAD_REDUCE_DTYPES = ("fp32", "bf16")
OPTIMIZER_OFFLOAD = ("none", "cpu")
NONFINITE_POLICIES = ("skip", "stop")


class ConfigError(ValueError):
    """One or more configuration problems, each with the keys involved and a fix."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(format_errors(self.problems))


@dataclass
class ModelConfig:
    """A decoder-only transformer: GPT-2 or Llama flavour, chosen by `arch` and the switches below."""

    name: str = "gpt2_tiny"  # the model's name (the run directory's default name)
    arch: str = "gpt2"  # gpt2 (learned positions, LayerNorm, GELU) | llama (RoPE, RMSNorm, SwiGLU)
    num_layers: int = 2  # transformer blocks
    hidden_size: int = 64  # the residual stream's width
    num_heads: int = 4  # attention heads (hidden_size / num_heads each)
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    ffn_hidden_size: int | None = None  # None: 4 * hidden (gpt2) or 8/3 * hidden rounded up to 64 (llama)
    vocab_size: int | None = None  # None: the tokenizer's vocabulary
    # The embedding and output rows are padded (with zero rows never predicted) to a multiple of this x parallel.tp;
    # 128 keeps the output matmul's shapes tensor-core friendly on GPUs. Export drops the padding.
    make_vocab_size_divisible_by: int = 1
    max_seq_len: int = 1024  # learned position embeddings (gpt2); RoPE needs no table size
    rope_theta: float = 10000.0  # RoPE's base (llama)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
    dropout: float = 0.0  # dropout on attention and residual outputs (pretraining: 0)
    init_std: float = 0.02  # normal init's standard deviation (output projections scaled by depth)
    tie_embeddings: bool | None = None  # None: tied for gpt2, untied for llama
    recompute: str = "none"  # none | selective (the attention core) | full (each layer): activation memory for compute


@dataclass
class ParallelConfig:
    """Sizes of the (pp, dp, tp) mesh; dp=None fills the world left by tp and pp."""

    tp: int = 1  # tensor-parallel size (heads and FFN split over consecutive ranks)
    pp: int = 1  # pipeline-parallel stages
    dp: int | None = None  # data-parallel size; None fills the world left by tp x pp
    sequence_parallel: bool = False  # with tp > 1: split norms, dropout and activations along the sequence
    # Pipeline stages: None splits the layers evenly; [a, b, ...] gives stage i its own count (one entry per model
    # chunk, pp x virtual_stages of them, in stage order: chunk c of pipeline rank r is stage c * pp + r).
    pipeline_layers: list[int] | None = None
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved_1f1b)
    pipeline_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b (used when pp > 1)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    bucket_size_mb: float = 25.0  # data-parallel gradient all-reduce (ZeRO: reduce-scatter) bucket size
    # ZeRO over the DP group (engine/parallel/zero.py): 0 replicates everything (bucketed all-reduce); 1 shards
    # the fp32 master weights and AdamW states, 2 the gradients too, 3 the parameters too.
    zero_stage: int = 0
    grad_reduce_dtype: str = "fp32"  # ZeRO: the gradient reduce-scatter's precision (fp32 | bf16)
    overlap_comm: bool = True  # ZeRO: asynchronous collectives overlapping compute; false waits on each (debugging)
    optimizer_offload: str = "none"  # ZeRO: cpu keeps master weights and AdamW states in host memory, steps there
    # A collective or pipeline receive that waits longer than this fails the run instead of hanging it.
    timeout_s: float = 600.0


@dataclass
class DataConfig:
    """Where the token shards are and how they are split and cached."""

    prefix: Any = "runs/demo/shards/stdlib"  # a shard prefix, or [weight, prefix, weight, prefix, ...]
    tokenizer: str = "runs/demo/tokenizer"  # the shards' tokenizer (a tokenizer.json or its directory, or byte)
    split: Any = "98,1,1"  # train,valid,test weights: "98,1,1", "98/1/1" or [98,1,1]
    cache_dir: str | None = None  # sample-index cache; None: index-cache/ beside the shards (else ~/.cache/weft)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4  # peak learning rate (after warm-up)
    min_lr: float = 3e-5  # the learning rate decay ends at
    warmup_steps: int | None = None  # None: 1% of train.steps
    decay_steps: int | None = None  # None: train.steps - warmup_steps
    decay_style: str = "cosine"  # cosine | linear | wsd (warm-up, stable, decay) | constant
    wsd_decay_fraction: float = 0.2  # wsd: the final fraction of decay_steps spent decaying
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (matrices only, unless the two below)
    decay_norms_and_biases: bool = False  # also decay norm weights and biases
    decay_embeddings: bool = False  # also decay the embeddings
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables
    impl: str = "auto"  # auto: fused on CUDA, foreach elsewhere; apex: apex's FusedAdam


@dataclass
class TrainConfig:
    """The run: its length, batch, precision, evaluation, logging cadence and where it writes."""

    steps: int = 100  # optimizer steps to train
    seq_len: int = 128  # tokens per sample
    micro_batch_size: int = 4  # samples per rank per forward/backward
    global_batch_size: int = 8  # samples per optimizer step (micro batch x accumulation x dp)
    seed: int = 1234  # model init, data order and dropout
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a dynamic loss scaler)
    run_dir: str = "runs/${model.name}"  # checkpoints, metrics.jsonl, config.yaml, fault dumps
    log_interval: int = 10  # steps between log lines and metrics.jsonl records
    eval_interval: int = 50  # steps between validation passes (0: only at the end)
    eval_iters: int = 4  # global batches per validation pass
    dry_run: bool = False  # print parameters, FLOPs and per-rank memory for the layout, allocate nothing
    compile: bool = False  # torch.compile each transformer block
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: a torch.profiler trace of those steps
    peak_tflops: float | None = None  # per device; overrides the built-in peak table for MFU
    device: str = "auto"  # auto: cuda when available, else cpu
    save_interval: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept (the newest); 0 keeps all
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    resume: str = "auto"  # auto: continue from run_dir/checkpoints/latest if there is one; none: always fresh
    verify_checkpoint: bool = False  # resume: re-hash every file against the manifest's SHA-256 (sizes: always)
    resume_fallback: bool = False  # resume: a damaged latest checkpoint falls back to the newest intact one
    async_save: bool = False  # write checkpoints in the background from a host copy (one in flight at a time)
    # Every log_interval steps each rank's compute time per step is gathered; a rank slower than this many times
    # the median is named as a straggler in the log and metrics.jsonl (0: not gathered).
    straggler_ratio: float = 1.5
    init_from: str | None = None  # weights only (a checkpoint or a Hugging Face model directory); fresh optimizer
    # A step whose loss or gradient norm is not finite on any rank (docs/fault_tolerance.md): skip drops its update
    # and counts it; stop saves the last good state and exits 3. skip also stops after max_skipped_steps (0: never).
    nonfinite: str = "skip"
    max_skipped_steps: int = 20  # skip: stop after this many non-finite steps (0: never)
    spike_window: int = 100  # loss spikes: compared with the mean of this many recent losses (0: no detector)
    spike_threshold: float = 6.0  # a spike: more than this many standard deviations above that mean


@dataclass
class LoggingConfig:
    """What the logging rank shows besides metrics.jsonl (which is always written)."""

    console: bool = True  # a line per train.log_interval steps and per evaluation
    progress_bar: bool | None = None  # None: on an interactive terminal
    wandb: bool = False  # log the config and every metric to Weights & Biases (one rank)
    wandb_project: str = "weft"  # W&B project
    wandb_entity: str | None = None  # W&B entity (team or user); None: your default
    wandb_mode: str = "online"  # online | offline (offline: synced later with `wandb sync`)
    wandb_name: str | None = None  # the run's display name (default: the run directory's name)
    tensorboard: bool = False  # also write every metric as TensorBoard scalars into train.run_dir/tensorboard/


@dataclass
class KernelsConfig:
    """Which implementation the model's fused operations use."""

    backend: str = "auto"  # auto | triton | torch (norms, RoPE, SwiGLU, cross entropy)
    attention: str = "auto"  # auto | flash_attn | triton | sdpa


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore so conf/config.yaml composes onto it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="weft_schema", node=Config)


def unknown_keys(raw: dict, schema: type = Config, path: str = "") -> list[str]:
    """Keys in a plain dict (e.g. from `+key=value` overrides) that the schema does not define."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key, value in raw.items():
        full = f"{path}{key}"
        if key not in names:
            out.append(full)
        elif isinstance(value, dict) and dataclasses.is_dataclass(_nested_schema(schema, key)):
            out.extend(unknown_keys(value, _nested_schema(schema, key), full + "."))
    return out


def _nested_schema(schema: type, name: str) -> Any:
    """The dataclass a field holds (its default factory), or None for a plain field."""
    default = next(f for f in dataclasses.fields(schema) if f.name == name).default_factory
    return default if default is not dataclasses.MISSING else None


def fill_defaults(cfg: Config, world_size: int, vocab_size: int | None = None) -> Config:
    """Resolve the `None` = derived settings (dp, kv heads, ffn size, tying, vocabulary, schedule lengths)."""
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train
    if p.dp is None and p.tp * p.pp > 0 and world_size % (p.tp * p.pp) == 0:
        p.dp = world_size // (p.tp * p.pp)
    if m.num_kv_heads is None:
        m.num_kv_heads = m.num_heads
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size if m.arch == "gpt2" else 64 * -(-(8 * m.hidden_size // 3) // 64)
    if m.tie_embeddings is None:
        m.tie_embeddings = m.arch == "gpt2"
    if m.vocab_size is None:
        m.vocab_size = vocab_size
    if o.warmup_steps is None:
        o.warmup_steps = max(1, t.steps // 100) if t.steps > 1 else 0
    if o.decay_steps is None:
        o.decay_steps = max(0, t.steps - o.warmup_steps)
    return cfg


def validate(cfg: Config, world_size: int) -> None:
    """Raise ConfigError listing every inconsistency of `cfg` for `world_size` processes."""
    m, p, o, t, k = cfg.model, cfg.parallel, cfg.optim, cfg.train, cfg.kernels
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    for name, value, choices in [
        ("model.arch", m.arch, MODEL_ARCHS), ("model.recompute", m.recompute, RECOMPUTE),
        ("train.precision", t.precision, PRECISIONS), ("optim.decay_style", o.decay_style, DECAY_STYLES),
        ("optim.impl", o.impl, OPTIM_IMPLS), ("kernels.backend", k.backend, KERNEL_BACKENDS),
        ("kernels.attention", k.attention, ATTENTION_BACKENDS), ("parallel.backend", p.backend,
                                                                 ("auto", "nccl", "gloo")),
        ("train.device", t.device, ("auto", "cpu", "cuda")),
        ("parallel.pipeline_schedule", p.pipeline_schedule, PIPELINE_SCHEDULES),
        ("parallel.grad_reduce_dtype", p.grad_reduce_dtype, GRAD_REDUCE_DTYPES),
        ("parallel.optimizer_offload", p.optimizer_offload, OPTIMIZER_OFFLOAD),
        ("train.resume", t.resume, ("auto", "none")), ("train.nonfinite", t.nonfinite, NONFINITE_POLICIES),
        ("logging.wandb_mode", cfg.logging.wandb_mode, ("online", "offline")),
    ]:
        check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")
    choice_errors = len(errors)  # reported with the rest; the bounds below must hold before anything divides
    for name, value in [("model.num_layers", m.num_layers),
                        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
                        ("model.hidden_size", m.hidden_size),
                        ("model.num_heads", m.num_heads), ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                        ("parallel.virtual_stages", p.virtual_stages),
                        ("train.steps", t.steps), ("train.seq_len", t.seq_len),
                        ("train.micro_batch_size", t.micro_batch_size),
                        ("train.global_batch_size", t.global_batch_size), ("train.log_interval", t.log_interval),
                        ("train.eval_iters", t.eval_iters)]:
        check(value >= 1, f"{name}={value} must be at least 1")
    check(m.num_kv_heads is None or m.num_kv_heads >= 1, f"model.num_kv_heads={m.num_kv_heads} must be at least 1")
    for name, value in float_settings(cfg):  # inf or nan passes every comparison below, or fails it misleadingly
        check(math.isfinite(value), f"{name}={value} is not a finite number")
    if len(errors) > choice_errors:  # the rules below divide by these
        raise ConfigError(errors)

    kv = m.num_kv_heads or m.num_heads
    check(m.hidden_size % m.num_heads == 0,
          f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; pick a multiple")
    check(m.num_heads % kv == 0,
          f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={kv} (grouped-query attention "
          "needs whole groups)")
    check(m.num_heads % p.tp == 0,
          f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}; use a tp that divides the heads")
    check(kv % p.tp == 0 or p.tp % kv == 0,
          f"model.num_kv_heads={kv} and parallel.tp={p.tp}: one must divide the other (KV heads are split or "
          "replicated across the tensor-parallel group)")
    if m.ffn_hidden_size is not None:
        check(m.ffn_hidden_size % p.tp == 0,
              f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    errors.extend(pipeline_errors(cfg))
    check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    check(m.vocab_size is not None and m.vocab_size >= 1,
          f"model.vocab_size={m.vocab_size}: set it, or point data.tokenizer at the run's tokenizer")
    if m.arch == "llama":
        check((m.hidden_size // m.num_heads) % 2 == 0,
              f"model.hidden_size / model.num_heads = {m.hidden_size // m.num_heads} must be even for RoPE")
    if m.arch == "gpt2":
        check(t.seq_len <= m.max_seq_len,
              f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} (learned positions); raise "
              "model.max_seq_len or shorten train.seq_len")
    dp = p.dp
    if dp is None:
        check(world_size % (p.tp * p.pp) == 0,
              f"world size {world_size} is not divisible by parallel.tp={p.tp} x parallel.pp={p.pp}; launch a "
              f"multiple of {p.tp * p.pp} processes")
    else:
        check(dp >= 1, f"parallel.dp={dp} must be at least 1")
        check(p.tp * p.pp * dp == world_size,
              f"parallel.tp={p.tp} x parallel.pp={p.pp} x parallel.dp={dp} = {p.tp * p.pp * dp} but the world "
              f"size is {world_size}; launch {p.tp * p.pp * dp} processes or set parallel.dp=null")
    if dp and dp >= 1:
        check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
              f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
              f"{t.micro_batch_size} x parallel.dp={dp}; use a multiple of {t.micro_batch_size * dp}")
        micro_batches = micro_batches_per_step(cfg)
        if p.pp > 1 and p.pipeline_schedule == "interleaved_1f1b" and micro_batches % p.pp:
            errors.append(f"parallel.pipeline_schedule=interleaved_1f1b needs the micro-batches per step "
                          f"(train.global_batch_size / (train.micro_batch_size x parallel.dp) = {micro_batches}) to be "
                          f"a multiple of parallel.pp={p.pp}: it runs them in groups of pp on each model chunk")
    check(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s} must be positive")
    errors.extend(zero_errors(cfg))
    if p.sequence_parallel and p.tp > 1:
        check(t.seq_len % p.tp == 0,
              f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}: sequence parallelism splits the "
              "sequence between the tensor-parallel ranks")
    check(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"optim.lr={o.lr} and optim.min_lr={o.min_lr}: need 0 <= min_lr <= lr")
    check(o.clip_grad >= 0, f"optim.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)")
    check(0 < o.wsd_decay_fraction <= 1, f"optim.wsd_decay_fraction={o.wsd_decay_fraction} must be in (0, 1]")
    if o.warmup_steps is not None:
        check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if o.decay_steps is not None:
        check(o.decay_steps >= 0, f"optim.decay_steps={o.decay_steps} must be >= 0")
    check(t.eval_interval >= 0, f"train.eval_interval={t.eval_interval} must be >= 0 (0: only at the end)")
    check(t.peak_tflops is None or t.peak_tflops > 0, f"train.peak_tflops={t.peak_tflops} must be positive")
    check(t.spike_threshold > 0, f"train.spike_threshold={t.spike_threshold} must be positive")
    check(t.straggler_ratio == 0 or t.straggler_ratio > 1,
          f"train.straggler_ratio={t.straggler_ratio} must be above 1 (a multiple of the median), or 0 to turn it off")
    for name, value in [("train.save_interval", t.save_interval), ("train.keep_last", t.keep_last),
                        ("train.keep_every", t.keep_every), ("train.max_skipped_steps", t.max_skipped_steps),
                        ("train.spike_window", t.spike_window)]:
        check(value >= 0, f"{name}={value} must be >= 0")
    if errors:
        raise ConfigError(errors)


def zero_errors(cfg: Config) -> list[str]:
    """What ZeRO (parallel.zero_stage and its keys) cannot run with."""
    p, t = cfg.parallel, cfg.train
    errors = []
    if p.zero_stage not in (0, 1, 2, 3):
        return [f"parallel.zero_stage={p.zero_stage} is not one of 0, 1, 2, 3"]
    if p.bucket_size_mb <= 0:
        errors.append(f"parallel.bucket_size_mb={p.bucket_size_mb} must be positive")
    if p.zero_stage == 0:
        for key, value, default in [("grad_reduce_dtype", p.grad_reduce_dtype, "fp32"),
                                    ("optimizer_offload", p.optimizer_offload, "none"),
                                    ("overlap_comm", p.overlap_comm, True)]:
            if value != default:
                errors.append(f"parallel.{key}={str(value).lower() if isinstance(value, bool) else value} needs "
                              "ZeRO: set parallel.zero_stage to 1, 2 or 3")
        return errors
    if p.zero_stage == 3 and t.compile:
        # torch.compile traces the parameters' storage; stage 3 swaps it for every gather and release.
        errors.append("parallel.zero_stage=3 with train.compile=true: compiled blocks cannot follow stage 3's "
                      "gathered-and-freed parameters; use zero_stage 1 or 2, or train.compile=false")
    if p.grad_reduce_dtype == "bf16" and t.precision == "fp16":
        errors.append("parallel.grad_reduce_dtype=bf16 with train.precision=fp16: reduce fp16 loss-scaled "
                      "gradients in fp32 (the default)")
    return errors


def float_settings(node: Any, path: str = "") -> list[tuple[str, float]]:
    """Every float-valued setting of a config (dataclass) as (dotted key, value)."""
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += float_settings(value, f"{path}{f.name}.")
        elif isinstance(value, float):
            out.append((f"{path}{f.name}", value))
    return out


def samples_per_split(cfg: Config) -> dict[str, int]:
    """The samples a run draws from each split: every step's global batch, and train.eval_iters of them."""
    g = cfg.train.global_batch_size
    return {"train": cfg.train.steps * g, "valid": cfg.train.eval_iters * g}


def micro_batches_per_step(cfg: Config) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step: global batch / (micro batch x dp)."""
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * (cfg.parallel.dp or 1))


def pipeline_errors(cfg: Config) -> list[str]:
    """What is wrong with the pipeline settings (stage split, virtual stages, schedule), as messages."""
    p, n = cfg.parallel, cfg.model.num_layers
    stages = p.pp * p.virtual_stages
    errors = []
    if p.pipeline_layers is not None:
        counts = list(p.pipeline_layers)
        if len(counts) != stages:
            errors.append(f"parallel.pipeline_layers={counts} has {len(counts)} entries; it needs one per stage: "
                          f"parallel.pp x parallel.virtual_stages = {stages}")
        elif any(c < 1 for c in counts):
            empty = [i for i, c in enumerate(counts) if c < 1]
            errors.append(f"parallel.pipeline_layers={counts}: stage{'s' if len(empty) > 1 else ''} "
                          f"{', '.join(map(str, empty))} would hold no layer; every stage needs at least 1")
        elif sum(counts) != n:
            errors.append(f"parallel.pipeline_layers={counts} sums to {sum(counts)}; it must sum to "
                          f"model.num_layers={n}")
    elif stages > n:
        errors.append(f"parallel.pp x parallel.virtual_stages = {stages} stages but only model.num_layers={n} layers: "
                      "every stage needs at least 1; lower parallel.pp or parallel.virtual_stages, or raise "
                      "model.num_layers")
    elif n % stages:
        errors.append(f"model.num_layers={n} does not split evenly into parallel.pp x parallel.virtual_stages = "
                      f"{stages} stages; give the split with parallel.pipeline_layers=[...] (summing to {n})")
    if p.virtual_stages > 1 and (p.pp == 1 or p.pipeline_schedule != "interleaved_1f1b"):
        errors.append(f"parallel.virtual_stages={p.virtual_stages} is for parallel.pipeline_schedule=interleaved_1f1b "
                      "with parallel.pp > 1; set parallel.virtual_stages=1 otherwise")
    if p.pp > 1 and p.pipeline_schedule == "interleaved_1f1b" and p.virtual_stages < 2:
        errors.append("parallel.pipeline_schedule=interleaved_1f1b needs parallel.virtual_stages >= 2 model chunks per "
                      "rank (with 1 it is plain 1f1b)")
    return errors


def format_errors(errors: list[str]) -> str:
    """One message for one or several problems, one line each."""
    head = "invalid configuration:" if len(errors) > 1 else "invalid configuration: "
    return head + ("\n  - " + "\n  - ".join(errors) if len(errors) > 1 else errors[0])


# ----------------------------------------------------------------------------------- the command line, before Hydra
CONFIG_GROUPS = ("model", "parallel", "data", "optim", "train", "logging")  # conf/<group>/<option>.yaml
# Hydra's own flags that take the next argument as their value.
_VALUED_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                 "--config-dir", "--experimental-rerun"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_BOOLEANS = {"true", "false", "yes", "no", "on", "off", "y", "n", "1", "0"}


def _leaf_fields(schema: type = Config, path: str = "") -> list[tuple[str, type, dataclasses.Field, Any]]:
    """(dotted key, its dataclass, its field, its type hint) for every setting of the schema, in order."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        nested = _nested_schema(schema, f.name)
        if nested is not None and dataclasses.is_dataclass(nested):
            out += _leaf_fields(nested, f"{path}{f.name}.")
        else:
            out.append((f"{path}{f.name}", schema, f, hints[f.name]))
    return out


def all_keys() -> dict[str, Any]:
    """Every dotted key of the schema and its type hint."""
    return {key: hint for key, _, _, hint in _leaf_fields()}


def override_problems(args: Sequence[str], conf_dir: str | os.PathLike) -> list[str]:
    """What is wrong with command-line overrides, found before Hydra composes them (where each is its own error,
    and a misspelt key gets advice to add `+`): unknown keys with a did-you-mean, unknown group options, values
    that cannot be their key's type, and commas Hydra would read as a sweep."""
    sweep = "-m" in args or "--multirun" in args
    keys = all_keys()
    problems = []
    for arg in _overrides(args):
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key.startswith(("hydra", "~")) or "@" in key:
            continue
        values = _split_sweep(value) if sweep else [value]
        if "." not in key:
            problems += _group_problems(key, values, Path(conf_dir))
        elif key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
            problems.append(f"{key}: no such key" + (f"; did you mean {near[0]}?" if near else
                                                      " (python -m engine.train --help lists them)"))
        elif not sweep and _bare_comma(value):
            problems.append(f"{arg}: Hydra reads an unquoted comma as a sweep (-m); quote the value "
                            f"({key}='{value}') or give a list ({key}=[{value}])")
        else:
            problems += [p for v in values if (p := _type_problem(key, v, keys[key]))]
    return problems


def _overrides(args: Sequence[str]) -> list[str]:
    """The key=value arguments, Hydra's flags and their values left out."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in _VALUED_FLAGS or (arg == "--info" and i + 1 < len(args) and args[i + 1] in _INFO_TOPICS):
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            out.append(arg)
    return out


def sweep_job_name(num: int, job_overrides: Sequence[str], args: Sequence[str]) -> str:
    """A sweep job's directory name: its number, then its values of the keys `args` (the command line) sweeps,
    e.g. `1_optim.lr=0.002` (a `/` in a value becomes `_`)."""
    swept = {a.split("=", 1)[0].lstrip("+") for a in _overrides(args)
             if _bare_comma(a.split("=", 1)[1]) or re.match(r"\w+\(", a.split("=", 1)[1])}
    named = [o for o in job_overrides if o.split("=", 1)[0].lstrip("+") in swept]
    return "_".join([str(num), *(o.replace("/", "_") for o in named)])


def _split_sweep(value: str) -> list[str]:
    """The values of a multirun sweep `a,b,c` (a bracketed list, a function like range(...) or an interpolation
    stays one value)."""
    return value.split(",") if _bare_comma(value) else [value]


def _bare_comma(value: str) -> bool:
    return "," in value and not value.startswith(("[", "{", "'", '"')) and "(" not in value and "${" not in value


def _group_problems(group: str, options: list[str], conf_dir: Path) -> list[str]:
    if group not in CONFIG_GROUPS:
        near = difflib.get_close_matches(group, CONFIG_GROUPS, n=1)
        return [f"{group}: not a config group ({', '.join(CONFIG_GROUPS)})"
                + (f"; did you mean {near[0]}?" if near else "; a key is written section.key=value")]
    known = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    out = []
    for option in options:
        if option not in known and option != "null":
            near = difflib.get_close_matches(option, known, n=1)
            out.append(f"{group}={option}: no such option (options: {', '.join(known)})"
                       + (f"; did you mean {group}={near[0]}?" if near else ""))
    return out


def _type_problem(key: str, value: str, hint: Any) -> str | None:
    """Why `value` cannot be `key`'s type, or None (interpolations, quoted text and sweep functions pass)."""
    if hint is Any or "${" in value or "(" in value:
        return None
    kinds = set(typing.get_args(hint)) if typing.get_origin(hint) in (types.UnionType, typing.Union) else {hint}
    if value == "null":
        return None if type(None) in kinds else f"{key}=null: {key} must be set"
    kinds.discard(type(None))
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is bool and value.lower() not in _BOOLEANS:
        return f"{key}={value}: not true or false"
    if kind is int and not _parses(int, value):
        return f"{key}={value}: not an integer"
    if kind is float and not _parses(float, value):
        return f"{key}={value}: not a number"
    if typing.get_origin(kind) is list and not value.startswith("["):
        return f"{key}={value}: a list, written [a,b,...]"
    return None


def _parses(kind: type, value: str) -> bool:
    try:
        kind(value)
        return True
    except ValueError:
        return False


def key_help() -> str:
    """`--help`'s key list: each key with its type, default and the first line of the comment that explains it here."""
    notes = _field_comments()
    rows = []
    for key, schema, f, hint in _leaf_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")
        rows.append((key, f"{kind} = {json.dumps(default)}", notes.get((schema.__name__, f.name), "")))
    width = max(len(k) for k, _, _ in rows)
    kinds = max(len(t) for _, t, _ in rows)
    return "\n".join(f"  {k:<{width}}  {t:<{kinds}}  {note}".rstrip() for k, t, note in rows)


def _field_comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the first line of the comment on a field's line, or else of the block just above it."""
    source = Path(__file__).read_text()
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                line = top = stmt.lineno
                while top - 1 in comments and lines[top - 2].lstrip().startswith("#"):
                    top -= 1
                block = " ".join(comments[n] for n in range(top, line))
                note = comments.get(line) or (block.split(". ")[0].split("; ")[0] if block else None)
                if note:
                    out[(node.name, stmt.target.id)] = note
    return out
