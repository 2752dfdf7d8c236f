"""The training loop: data, model, optimizer, the step over micro-batches, evaluation, metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import engine
from engine.config import Config, samples_per_split
from engine.data.builder import build_datasets
from engine.data.sampler import BatchSampler
from engine.data.tokenizer import BYTE_TOKENIZER, load_tokenizer
from engine.model import GPT
from engine.model.flops import count_parameters, flops_per_token
from engine.model.gpt import GPTChunks, parameter_names
from engine.parallel import comm
from engine.parallel.data_parallel import GradientAllReduce, GradientSync
from engine.parallel.grads import (
    allreduce_partial_grads,
    allreduce_tied_embedding_grads,
    clip_grads_,
    grad_norm,
    param_grads,
)
from engine.parallel.layers import padded_vocab_size
from engine.parallel.pipeline import PipelineExchange, exchange_shape, rank_stages, stage_layers
from engine.parallel.random import mix_seed
from engine.parallel.state import ParallelState
from engine.parallel.zero import ZeroDataParallel, ZeroOptimizer
from engine.training.async_checkpoint import AsyncSaver
from engine.training.checkpoint import (
    Retention,
    checkpoints_dir,
    load_checkpoint,
    load_weights,
    snapshot_checkpoint,
    step_dir_name,
    write_checkpoint,
)
from engine.training.loss_scaler import DynamicLossScaler
from engine.training.memory import estimate_memory, model_state_bytes
from engine.training.metrics import (
    MetricsLogger,
    Throughput,
    device_name,
    memory_gib,
    mfu,
    peak_tflops,
    perplexity,
)
from engine.training.numerics import EXIT_DIVERGED, SpikeDetector, nonfinite_vote
from engine.training.optimizer import (
    build_offload_optimizer,
    build_optimizer,
    group_weight_decays,
    lr_at,
    param_groups,
    set_lr,
)
from engine.training.preemption import EXIT_STOPPED, StopSignals
from engine.training.reshard import TensorSource
from engine.training.schedule import StepStats, forward_backward, forward_only, schedule_steps
from engine.training.stragglers import StragglerWatch
from engine.training.tensorboard_logger import TensorBoardRun
from engine.training.timers import PhaseTimer, TimedExchange

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context manager factory: torch.autocast for bf16/fp16 (fp32 parameters, grads, optimizer), else a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def get_batch(dataset, indices: np.ndarray, device: torch.device, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the samples `indices`."""
    tokens = np.stack([dataset[int(i)] for i in indices])
    # Checked here, on the host: on a GPU an out-of-range id is an opaque device-side assert inside the embedding.
    if tokens.max() >= vocab_size:
        raise ValueError(f"token id {tokens.max()} in the training data is outside model.vocab_size={vocab_size}: "
                         "the shards were written with another tokenizer than data.tokenizer")
    tokens = torch.from_numpy(tokens).to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def dp_mean(value: torch.Tensor, state: ParallelState) -> float:
    """Average a scalar over the data-parallel group (float64 throughout)."""
    value = value.to(torch.float64)
    if state.dp > 1:
        comm.all_reduce(value, group=state.dp_group)
        value = value / state.dp
    return value.item()


class Trainer:
    """Owns one run: built from a validated Config and a ParallelState, driven by `fit()`."""

    def __init__(self, cfg: Config, state: ParallelState, run_dir: str | os.PathLike):
        self.cfg, self.state, self.run_dir = cfg, state, Path(run_dir)
        t, m = cfg.train, cfg.model
        self.device = state.device
        p = cfg.parallel
        torch.manual_seed(t.seed)
        # This rank's model chunks: one pipeline stage each (the whole model without pipelining). Every part draws
        # the single-process model's weights from the seed; each rank keeps its stages and its TP slice of them.
        self.stages = p.pp * p.virtual_stages
        self.stage_of = rank_stages(state.pp_rank, state.pp, p.virtual_stages)
        layers = stage_layers(m.num_layers, self.stages, p.pipeline_layers)
        self.model = GPTChunks([GPT(m, state.tp_group, p.sequence_parallel, layers[s], t.seed).to(self.device)
                                for s in self.stage_of])
        if t.compile:
            for chunk in self.model:
                for block in chunk.blocks.values():
                    block.compile()  # in place: parameter names, and so checkpoints, stay the plain model's
        groups = param_groups(self.model, cfg.optim)  # before ZeRO: stage 3 leaves the parameters empty
        self.zero = p.zero_stage > 0
        # ZeRO computes on 16-bit parameters (fp32 masters in the shards); replicated runs autocast fp32 ones.
        self.compute_dtype = AUTOCAST_DTYPES.get(t.precision, torch.float32) if self.zero else torch.float32
        self.grad_syncs: list[GradientSync]
        if self.zero:
            self.grad_syncs, self.optimizer = build_zero(self.model, groups, cfg, state, self.compute_dtype)
        else:
            self.grad_syncs = [GradientAllReduce(chunk, state.dp_group, p.bucket_size_mb) for chunk in self.model]
            self.optimizer = build_optimizer(groups, cfg.optim, self.device)
        self.autocast = autocast_factory(t.precision, self.device)
        self.scaler = DynamicLossScaler() if t.precision == "fp16" else None
        self.exchange = None
        if state.pp > 1:
            shape = exchange_shape(t.micro_batch_size, t.seq_len, m.hidden_size, state.tp, p.sequence_parallel)
            self.exchange = PipelineExchange(state, shape, self.compute_dtype)
        self.last_step_stats = StepStats()  # of the last schedule run (activations held, timeline)
        self.timer = PhaseTimer(self.device)  # where the steps' time goes: the perf/ phases of each training row
        self.record_timeline = False  # tools/bench_pipeline.py: time every forward and backward
        self.flops_per_token = flops_per_token(m, t.seq_len)
        self.peak = peak_tflops(self.device, t.precision, t.peak_tflops)
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0  # updates not applied: fp16 overflows and non-finite steps
        self.nonfinite_steps = 0  # steps whose loss or gradient norm was not finite (engine.training.numerics)
        self.loss_spikes = 0
        self.spikes = SpikeDetector(t.spike_window, t.spike_threshold)
        self.fault: str | None = None  # what was not finite in the last step
        self.last_loss = 0.0  # the last step's loss (a checkpoint records whether it was finite)
        self.diverged: str | None = None  # why fit() stopped for non-finite values (train.nonfinite)
        self.wandb_run_id: str | None = None
        self.stopped_by: str | None = None  # a signal that stopped fit() early (engine.training.preemption)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, fast_backend=False)  # checkpoints carry it
        if t.async_save and state.world_size > 1 and state.checkpoint_group is None:
            raise ValueError("train.async_save needs the parallel state's checkpoint group: "
                             "init_parallel(..., checkpoint_group=True)")
        self.saver = AsyncSaver(self.run_dir, state, Retention.of(t)) if t.async_save else None
        self.stragglers = StragglerWatch(state, t.straggler_ratio)
        self._build_data()

    # ------------------------------------------------------------------------------------------- data
    def _build_data(self) -> None:
        cfg, state = self.cfg, self.state
        g = cfg.train.global_batch_size
        # Every rank asks; the index cache's file lock lets the first build while the others wait, then map.
        datasets = build_datasets(cfg.data.prefix, cfg.data.split, cfg.train.seq_len, samples_per_split(cfg),
                                  cfg.train.seed, cfg.data.cache_dir)
        self.train_data, self.valid_data = datasets["train"], datasets.get("valid")
        mbs = cfg.train.micro_batch_size
        self.train_sampler = BatchSampler(len(self.train_data), g, mbs, state.dp_rank, state.dp)
        self.valid_sampler = (BatchSampler(len(self.valid_data), g, mbs, state.dp_rank, state.dp)
                              if self.valid_data is not None else None)

    def micro_batches(self, dataset, indices: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of these sample indices (a sampler's `micro_batches`)."""
        vocab = self.cfg.model.vocab_size
        return [get_batch(dataset, idx, self.device, vocab) for idx in indices]

    def dropout_keys(self, indices: list[np.ndarray]) -> list[int]:
        """Each micro-batch's dropout key: the seed and its first sample, so masks follow samples, not layouts."""
        return [mix_seed(self.cfg.train.seed, int(idx[0])) for idx in indices]

    def _run_schedule(self, batches: list, training: bool, keys: list[int] | None = None) -> torch.Tensor:
        """This rank's part of one global batch through the pipeline; the summed micro-batch losses on every rank
        (float64), from the last stage."""
        p = self.cfg.parallel
        steps = schedule_steps(p.pipeline_schedule, len(batches), self.state.pp, self.state.pp_rank, p.virtual_stages)
        scale = self.scaler.scale if self.scaler is not None else (lambda loss: loss)
        self.last_step_stats = StepStats(timeline=[] if self.record_timeline else None)
        # A training step's waits on its pipeline neighbours are its pipeline bubble (evaluation is timed whole).
        exchange = TimedExchange(self.exchange, self.timer) if training and self.exchange is not None else self.exchange
        total = forward_backward(list(self.model), steps if training else forward_only(steps), batches,
                                 grad_syncs=self.grad_syncs if training else None, autocast=self.autocast,
                                 scale_loss=scale, exchange=exchange, stage_of=self.stage_of,
                                 stages=self.stages, dropout_keys=keys, stats=self.last_step_stats)
        if self.state.pp > 1:  # the loss exists on the last stage; every rank reports it
            # The last stage waits here for the first to finish its cool-down backwards: bubble too.
            with self.timer.phase("pipeline_bubble") if training else contextlib.nullcontext():
                comm.broadcast(total, src=self.state.pp_peer(self.state.pp - 1), group=self.state.pp_group)
        return total

    # ------------------------------------------------------------------------------------------- steps
    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics."""
        loss = self.compute_gradients()
        with self.timer.phase("optimizer"):
            lr, norm = self.apply_gradients(loss)
        self.last_loss = loss
        return {"loss": loss, "lr": lr, "grad_norm": norm}

    def compute_gradients(self) -> float:
        """Forward and backward over this step's micro-batches, gradients completed; returns the mean loss.

        Afterwards every gradient is whole: averaged over DP, partial ones summed over TP, the loss scale removed.
        """
        with self.timer.phase("data"):
            indices = self.train_sampler.micro_batches(self.consumed_samples)
            batches = self.micro_batches(self.train_data, indices)
        self.model.train()
        with self.timer.phase("forward_backward"):
            loss_sum = self._run_schedule(batches, True, self.dropout_keys(indices))
        with self.timer.phase("dp_comm"):  # the gradient reductions that backward did not hide
            for sync in self.grad_syncs:
                sync.finish_grad_sync()
        grads = self.grads()
        allreduce_partial_grads(grads, self.state.tp_group)
        allreduce_tied_embedding_grads(grads, self.state.embedding_group)
        if self.scaler is not None:
            self.scaler.unscale_([g for g, _ in grads])
        return dp_mean(loss_sum / len(batches), self.state)

    def grads(self) -> list[tuple[torch.Tensor, torch.nn.Parameter]]:
        """(gradient, parameter) pairs: whole gradients, or under ZeRO this rank's shards of them."""
        if self.zero:
            return [pair for sync in self.grad_syncs for pair in sync.grads()]
        return param_grads(self.model.parameters())

    def apply_gradients(self, loss: float) -> tuple[float, float]:
        """Clip by the whole model's gradient norm, step the optimizer, zero the gradients; returns (lr, norm).

        A step whose loss or norm is not finite on any rank is skipped by every rank (engine.training.numerics)."""
        cfg, t = self.cfg, self.cfg.train
        lr = lr_at(self.step, cfg.optim)
        set_lr(self.optimizer, lr)
        grads = self.grads()
        # Over every rank's shards and stages, not just this rank's.
        norm = grad_norm(grads, self.state.tp_group, self.state.pp_group, self.state.dp_group if self.zero else None)
        loss_bad, norm_bad = nonfinite_vote(loss, norm, self.state.world_size > 1)
        overflow = self.scaler is not None and norm_bad and not loss_bad  # fp16: the loss scaler's to handle
        self.fault = None if overflow or not (loss_bad or norm_bad) else (
            "the loss and the gradient norm are" if loss_bad and norm_bad else
            "the loss is" if loss_bad else "the gradient norm is") + " not finite"
        if overflow or self.fault:  # every rank skips this step together
            self.skipped_steps += 1
        else:
            if cfg.optim.clip_grad > 0:
                clip_grads_([g for g, _ in grads], cfg.optim.clip_grad, norm)
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(overflow or self.fault is not None)
        if self.fault:
            self.nonfinite_steps += 1
            if t.nonfinite == "stop":
                self.diverged = f"step {self.step + 1}: {self.fault} (train.nonfinite=stop)"
            elif t.max_skipped_steps and self.nonfinite_steps > t.max_skipped_steps:
                self.diverged = (f"step {self.step + 1}: {self.nonfinite_steps} steps skipped for non-finite values, "
                                 f"more than train.max_skipped_steps={t.max_skipped_steps}")
        for sync in self.grad_syncs:
            sync.zero_grad()
        self.step += 1
        self.consumed_samples += cfg.train.global_batch_size
        return lr, math.nan if norm_bad else norm.item()  # the vote's: some rank's norm was not finite

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean validation loss and perplexity over `train.eval_iters` global batches (the same ones every time)."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        g = self.cfg.train.global_batch_size
        for it in range(self.cfg.train.eval_iters):
            batches = self.micro_batches(self.valid_data, self.valid_sampler.micro_batches(it * g))
            total += self._run_schedule(batches, False)
            count += len(batches)
        loss = dp_mean(total / count, self.state)
        return {"val_loss": loss, "val_ppl": perplexity(loss)}

    # ------------------------------------------------------------------------------------------- the run
    def fit(self, stop: StopSignals | None = None) -> list[dict]:
        """Train for `train.steps` steps with evaluation and logging; returns every metrics record written.

        A stop signal (SIGTERM, SIGUSR1) ends it early after a checkpoint, with `stopped_by` set. `stop` watches for
        them (engine/train.py keeps one for the whole process); None: watch while fit runs.
        """
        t = self.cfg.train
        lg = self.cfg.logging
        self.stopped_by = self.diverged = None
        logger = MetricsLogger(self.run_dir, self.state.is_logging_rank, t.steps, self.step, lg.progress_bar,
                               self.peak, f"{device_name(self.device)}, {t.precision}", lg.console)
        records: list[dict] = []
        # Before W&B: a missing tensorboard package fails with nothing started.
        tensorboard = (TensorBoardRun(self.run_dir, self.step) if lg.tensorboard and self.state.is_logging_rank
                       else None)
        wandb = self._start_wandb()
        sinks = [sink for sink in (wandb, tensorboard) if sink is not None]

        def emit(record: dict) -> None:
            records.append(record)
            logger.log(record)
            for sink in sinks:
                sink.log(record)

        can_eval = self.valid_data is not None
        throughput = Throughput()

        def evaluate() -> None:
            t0 = time.perf_counter()
            with self.timer.phase("eval"):
                emit({"step": self.step, **self.evaluate(), **self.progress()})
            throughput.exclude(time.perf_counter() - t0)  # tokens/s and MFU measure training alone

        ok = False
        try:
            with contextlib.nullcontext(stop) if stop is not None else StopSignals() as watcher:
                self._train_loop(t, emit, logger, throughput, evaluate, can_eval, watcher)
            if self.saver is not None:  # the run ends with its last checkpoint on disk
                self.saver.wait()
            ok = True
        finally:
            logger.close()
            if tensorboard is not None:
                tensorboard.close()
            if wandb is not None:
                # W&B shows a run marked preempting as preempted only when it exits non-zero
                stopped = ok and self.stopped_by is not None
                code = EXIT_DIVERGED if ok and self.diverged else EXIT_STOPPED if stopped else 0 if ok else 1
                wandb.finish(code, preempted=stopped)
        return records

    def _train_loop(self, t, emit, logger, throughput, evaluate, can_eval, stop: StopSignals) -> None:
        """The step loop: train, log, evaluate, checkpoint; stop early after a checkpoint when signalled."""
        tokens_per_step = t.global_batch_size * t.seq_len
        world = self.state.world_size
        if can_eval and self.step == 0:  # a resumed run evaluated at its checkpoint already
            evaluate()
        profiler = Profiler(self.run_dir, t.profile_steps, self.device, self.state.is_logging_rank)
        self.timer.restart()  # the first row's window starts here, after the evaluation at step 0
        while self.step < t.steps:
            comm.LOG.step = self.step + 1  # what a fault dump calls the step in progress
            self.stragglers.start()
            with profiler.step(self.step + 1):
                metrics = self.train_step()
            self.stragglers.stop()
            self.timer.count_step()
            if self.saver is not None:
                self.saver.poll()  # a background save that failed stops every rank here
            throughput.add(tokens_per_step)
            logger.advance(1, metrics["loss"])
            self._watch_numerics(metrics["loss"])
            last = self.step == t.steps or self.diverged is not None
            # Before evaluating: the time left after a signal (Slurm's lead or grace time) goes to the checkpoint.
            self.stopped_by = None if last else stop.requested(self.device, world > 1)
            if (can_eval and not self.stopped_by and not self.diverged
                    and ((t.eval_interval and self.step % t.eval_interval == 0) or last)):
                evaluate()
            periodic = bool(t.save_interval and self.step % t.save_interval == 0)
            saving = periodic or last or self.stopped_by is not None
            if saving:
                t0 = time.perf_counter()
                with self.timer.phase("checkpoint"):
                    self.save()
                throughput.exclude(time.perf_counter() - t0)
            # After the evaluation and the checkpoint, whose time is this step's; a saving step always ends a row.
            if self.step % t.log_interval == 0 or saving or self.fault:
                emit(self._train_row(metrics, throughput.read()))
            if periodic and not self.stopped_by and not last:  # a signal during the evaluation or the save just made
                self.stopped_by = stop.requested(self.device, world > 1)
            if self.diverged:
                if self.state.is_logging_rank:
                    print(f"error: stopped at {self.diverged}; the checkpoint of step {self.step} holds the weights "
                          "and optimizer state from before it (its batch is passed over). Lower optim.lr, or resume "
                          "an earlier checkpoint; docs/fault_tolerance.md", file=sys.stderr)
                return
            if self.stopped_by:
                if self.state.is_logging_rank:
                    print(f"{self.stopped_by}: stopped after step {self.step} of {t.steps}, checkpoint saved; "
                          "run the same command again (or requeue the job) to continue", file=sys.stderr)
                return

    def _watch_numerics(self, loss: float) -> None:
        """Warn about the step just taken: skipped for non-finite values, or a loss spike (counted)."""
        t = self.cfg.train
        if self.fault and self.state.is_logging_rank:
            policy = "stopping" if t.nonfinite == "stop" else "update skipped"
            print(f"warning: step {self.step}: {self.fault} ({policy}; {self.nonfinite_steps} non-finite step"
                  f"{'s' if self.nonfinite_steps != 1 else ''} so far)", file=sys.stderr)
        mean = self.spikes.check(loss)
        if mean is not None:
            self.loss_spikes += 1
            if self.state.is_logging_rank:
                print(f"warning: step {self.step}: loss spike, {loss:.4f} against a mean of {mean:.4f} over the last "
                      f"{len(self.spikes.losses) - 1} steps (train.spike_threshold={t.spike_threshold} standard "
                      "deviations)", file=sys.stderr)

    def _train_row(self, metrics: dict, tokens_per_s: float) -> dict:
        """A training row: the step's metrics, throughput, phase times, memory, counters and stragglers (every rank
        builds it: memory and stragglers are gathered)."""
        per_device = tokens_per_s / self.state.world_size
        return {"step": self.step, **metrics,
                **({"loss_scale": self.scaler.scale_value} if self.scaler is not None else {}),
                "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
                "tflops_per_device": self.flops_per_token * per_device / 1e12,
                "mfu": mfu(self.flops_per_token, per_device, self.peak), **self.timer.read(), **self._memory(),
                "model_state_bytes": sum(model_state_bytes(self.grad_syncs, self.optimizer).values()),
                "skipped_steps": self.skipped_steps, "nonfinite_steps": self.nonfinite_steps,
                "loss_spikes": self.loss_spikes, **self.stragglers.read(), **self.progress()}

    def _memory(self) -> dict[str, float]:
        """Memory in GiB, the highest of any rank for each figure (1F1B's activations pile up on the first stage, not
        the logging one)."""
        mine = memory_gib(self.device)
        values = torch.tensor(list(mine.values()), dtype=torch.float64, device=self.device)
        if self.state.world_size > 1:
            comm.all_reduce(values, op=dist.ReduceOp.MAX)
        return dict(zip(mine, values.tolist(), strict=True))

    def _start_wandb(self):
        """The W&B run on the logging rank (same id across resumes), its id shared with every rank for checkpoints."""
        lg = self.cfg.logging
        if not lg.wandb:
            return None
        run = None
        if self.state.is_logging_rank:
            from engine.training.wandb_logger import WandbRun

            run = WandbRun.start(lg, self.run_dir, asdict(self.cfg), self.wandb_run_id)
            self.wandb_run_id = run.run_id
        if self.state.world_size > 1:  # rank 0 writes checkpoint metadata; the logging rank may be another
            box = [self.wandb_run_id]
            comm.broadcast_object_list(box, src=self.state.logging_rank)
            self.wandb_run_id = box[0]
        return run

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Checkpoint the current step (every rank calls this)."""
        t = self.cfg.train
        tokenizer = self.tokenizer
        is_byte = tokenizer.name == BYTE_TOKENIZER
        meta = {"consumed_samples": self.consumed_samples, "skipped_steps": self.skipped_steps,
                "finite_loss": math.isfinite(self.last_loss),  # retention keeps a checkpoint from before NaNs
                "nonfinite_steps": self.nonfinite_steps, "loss_spikes": self.loss_spikes,
                "loss_window": self.spikes.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "wandb_run_id": self.wandb_run_id, "config": asdict(self.cfg),
                "tokenizer": BYTE_TOKENIZER if is_byte else "tokenizer.json", "eod_id": tokenizer.eod_id}
        snapshot = snapshot_checkpoint(self.step, self.state, self.model, self.optimizer, meta,
                                       None if is_byte else tokenizer.path)
        if self.saver is not None:  # written in the background; the next save and the end of fit() wait for it
            self.saver.save(snapshot)
            return checkpoints_dir(self.run_dir) / step_dir_name(self.step)
        return write_checkpoint(self.run_dir, snapshot, self.state, Retention.of(t))

    def resume(self, path: Path) -> dict:
        """Continue exactly where the checkpoint at `path` stopped: weights, optimizer, RNG, data position."""
        meta = load_checkpoint(path, self.state, self.model, self.optimizer, parameter_names(self.cfg.model))
        self.step, self.consumed_samples = meta["step"], meta["consumed_samples"]
        self.skipped_steps, self.wandb_run_id = meta["skipped_steps"], meta.get("wandb_run_id")
        self.nonfinite_steps, self.loss_spikes = meta.get("nonfinite_steps", 0), meta.get("loss_spikes", 0)
        self.spikes.load_state_dict(meta.get("loss_window", []))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        # The moments come from the checkpoint; the hyper-parameters from this run's config (they may be changed).
        o = self.cfg.optim
        for group, decay in zip(self.optimizer.param_groups, group_weight_decays(o), strict=True):
            group.update(weight_decay=decay, betas=(o.beta1, o.beta2), eps=o.eps)
        saved = meta["config"]["optim"]
        now = (self.cfg.optim.warmup_steps, self.cfg.optim.decay_steps)
        if (saved["warmup_steps"], saved["decay_steps"]) != now and self.state.is_logging_rank:
            print(f"warning: the learning-rate schedule changed on resume (warmup/decay steps {saved['warmup_steps']}/"
                  f"{saved['decay_steps']} -> {now[0]}/{now[1]}); set optim.warmup_steps and optim.decay_steps to "
                  "keep it", file=sys.stderr)
        return meta

    def init_weights_from(self, source: TensorSource) -> None:
        """Start from weights only (fresh optimizer and data state): a checkpoint's (`checkpoint_weights`) or a
        Hugging Face model's (`engine.hf.hf_weights`)."""
        load_weights(source, self.model, self.optimizer, self.state.tp_group, parameter_names(self.cfg.model))

    def progress(self) -> dict:
        """Where the run is in the sample stream."""
        return {"consumed_samples": self.consumed_samples,
                "tokens_seen": self.consumed_samples * self.cfg.train.seq_len}


def build_zero(model: GPTChunks, groups: list[dict], cfg: Config, state: ParallelState,
               compute_dtype: torch.dtype) -> tuple[list[ZeroDataParallel], ZeroOptimizer]:
    """ZeRO over the DP group for every model chunk, and the optimizer stepping their master shards."""
    p = cfg.parallel
    offload = p.optimizer_offload == "cpu"
    reduce_dtype = torch.bfloat16 if p.grad_reduce_dtype == "bf16" else torch.float32
    syncs = [ZeroDataParallel(chunk, state.dp_group, p.zero_stage, p.bucket_size_mb, compute_dtype, reduce_dtype,
                              p.overlap_comm, offload, cfg.model.recompute == "full") for chunk in model]
    if offload:
        make, which = build_offload_optimizer(cfg.optim)
        if state.is_logging_rank:
            print(f"optimizer offload: master weights and AdamW states in host memory, stepped by {which}",
                  file=sys.stderr)
    else:
        make, which = (lambda g: build_optimizer(g, cfg.optim, state.device)), None
    optimizer = ZeroOptimizer(syncs, groups, make)
    optimizer.name = which or optimizer.name
    return syncs, optimizer


class Profiler:
    """torch.profiler traces (and, on CUDA, a memory snapshot) for the steps in `train.profile_steps`."""

    def __init__(self, run_dir: Path, steps: list[int], device: torch.device, enabled: bool):
        self.steps, self.dir, self.device = set(steps), run_dir / "profile", device
        self.enabled = enabled and bool(self.steps)

    @contextlib.contextmanager
    def step(self, step: int):
        """Profile this step if it was asked for."""
        if not self.enabled or step not in self.steps:
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        cuda = self.device.type == "cuda"
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            yield
        prof.export_chrome_trace(str(self.dir / f"step{step}.trace.json"))
        if cuda:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"step{step}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        print(f"profile of step {step} written to {self.dir}", file=sys.stderr)


def run_info(cfg: Config, state: ParallelState, model: GPTChunks) -> dict:
    """What run_info.json records: layout, parameter counts, versions."""
    total = count_parameters(cfg.model)
    stages = estimate_memory(cfg)
    m = cfg.model
    return {
        "world_size": state.world_size, "tp": state.tp, "pp": state.pp, "dp": state.dp,
        "sequence_parallel": model[0].sequence_parallel,
        "padded_vocab_size": padded_vocab_size(m.vocab_size, state.tp, m.make_vocab_size_divisible_by),
        # parameters: the model's, unpadded; parameters_rank0: what rank 0 holds (its shards, replicas, padding);
        # stages: each pipeline rank's layers, parameters per TP rank and memory estimate (as train.dry_run prints).
        "parameters": total, "parameters_rank0": stages[0]["parameters"], "stages": stages,
        "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
        "device": device_name(state.device), "backend": dist.get_backend() if dist.is_initialized() else None,
        "versions": {"weft": engine.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": asdict(cfg.model),
    }


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
