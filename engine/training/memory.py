"""A per-rank memory estimate for `train.dry_run` and run_info.json: model states plus the activations each
pipeline stage holds, before anything is allocated.

Model states, for the Psi parameters this rank holds (replicated, padded and tied-copy ones included;
engine.model.flops), N data-parallel ranks and c bytes per compute value (2 at bf16/fp16 under ZeRO, else 4):

    stage 0   4 Psi parameters + 4 Psi gradients + 8 Psi AdamW moments (fp32; autocast computes in 16 bits)
    stage 1   c Psi parameters + c Psi gradients + (m + 8) Psi / N master weights and moments
    stage 2   c Psi parameters + c Psi / N gradients + (m + 8) Psi / N
    stage 3   (c Psi + c Psi + (m + 8) Psi) / N

with m = 4 bytes of fp32 master weights when they are a copy (16-bit compute, or offloaded to the host), else 0.
These are the ZeRO paper's (2 + 2 + 12) Psi at bf16, up to each bucket's padding to a multiple of N. Per
micro-batch, each layer keeps activations for backward following Korthikanti et al. (2022) for a memory-efficient
attention kernel (no s^2 scores kept): about 34·s·b·h bytes at 16-bit, twice that in fp32; `full` recomputation
keeps only each layer's input (2·s·b·h at 16-bit), plus one layer's full activations while it is recomputed;
`selective` is counted like `none`, since the attention scores it would recompute are never stored by such a
kernel. The last stage adds the logits and their gradient, 2 x s·b·V fp32 values.

With tensor parallelism t the matmul-side activations split (Korthikanti's 10 + 24/t per s·b·h). Sequence
parallelism splits the rest too, except the two gathered inputs of the column-parallel projections, which we keep
for backward instead of gathering them again (30/t + 4). The logits are split by vocabulary (V/t).

Under pipelining a stage holds those activations for every micro-batch in flight: the schedule decides how many
(GPipe: all m; 1F1B: pp - r on rank r; interleaved: its warm-up depth, per chunk). The count here is read off the
schedule's own action list (engine.training.schedule), so estimate and executor cannot disagree.
"""

from __future__ import annotations

import os

import torch

from engine.config import Config, micro_batches_per_step
from engine.data.index_cache import available_host_memory
from engine.model.flops import parameters_per_rank
from engine.parallel.pipeline import rank_stages, stage_layers
from engine.training.schedule import schedule_actions

GIB = 2**30


def estimate_memory(cfg: Config) -> list[dict]:
    """Per pipeline rank: its stages and their layers, parameters, the (micro-batch, chunk) activations it holds at
    its peak, and estimated GiB of parameters, gradients, optimizer states, activations and their total (every TP
    and DP rank of a stage alike)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    stages = p.pp * p.virtual_stages
    layers = stage_layers(m.num_layers, stages, p.pipeline_layers)
    act_scale = 1.0 if t.precision in ("bf16", "fp16") else 2.0
    sbh = t.seq_len * t.micro_batch_size * m.hidden_size
    sp = p.sequence_parallel and p.tp > 1
    stored = sbh * (30 / p.tp + 4 if sp else 10 + 24 / p.tp) * act_scale  # one layer, one micro-batch, all kept
    kept = (2 * sbh / (p.tp if sp else 1)) * act_scale if m.recompute == "full" else stored
    logits = 2 * t.seq_len * t.micro_batch_size * m.vocab_size * 4 / p.tp
    out = []
    for r in range(p.pp):
        mine = rank_stages(r, p.pp, p.virtual_stages)
        params = sum(parameters_per_rank(m, p.tp, layers[s]) for s in mine)
        # What one micro-batch leaves behind in each chunk until its backward.
        chunk_bytes = [len(layers[s]) * kept + (logits if s == stages - 1 else 0.0) for s in mine]
        # The most activation bytes held at once while the schedule runs, and how many (micro-batch, chunk)
        # activations make it up (micro-batches, with one chunk per rank).
        held: set[tuple[int, int]] = set()
        most, in_flight = 0.0, 0
        for action in schedule_actions(p.pipeline_schedule, micro_batches_per_step(cfg), p.pp, r, p.virtual_stages):
            (held.add if action.kind == "F" else held.discard)((action.micro, action.chunk))
            now = sum(chunk_bytes[c] for _, c in held)
            if now > most:
                most, in_flight = now, len(held)
        transient = stored if m.recompute == "full" else 0.0  # one layer rebuilt at a time
        states = {stage: predict_model_state_bytes(params, stage, p.dp or 1, t.precision, p.optimizer_offload)
                  for stage in range(4)}
        mine_now = states[p.zero_stage]
        row = {"pp_rank": r, "stages": mine, "layers": [[layers[s].start, layers[s].stop] for s in mine],
               "parameters": params, "activations_in_flight": in_flight,
               "parameters_gib": mine_now["parameters"] / GIB, "gradients_gib": mine_now["gradients"] / GIB,
               "optimizer_gib": (mine_now["master_weights"] + mine_now["optimizer_states"]) / GIB,
               "activations_gib": (most + transient) / GIB,
               "model_state_bytes": {stage: sum(v.values()) for stage, v in states.items()}}
        row["total_gib"] = row["parameters_gib"] + row["gradients_gib"] + row["optimizer_gib"] + row["activations_gib"]
        out.append(row)
    return out


def device_memory_bytes(device: torch.device) -> int:
    """The memory one rank may count on: its GPU's, or on CPU its share of the host's free memory (the node's
    ranks, LOCAL_WORLD_SIZE, share it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return available_host_memory() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def memory_problem(cfg: Config, device: torch.device) -> str | None:
    """Why this run cannot fit on `device` by the estimate (a rank's model states and activations), or None."""
    need = max(row["total_gib"] for row in estimate_memory(cfg)) * GIB
    have = device_memory_bytes(device)
    if need <= have:
        return None
    where = "GPU memory" if device.type == "cuda" else "free host memory per rank"
    return (f"a rank would need about {need / GIB:,.1f} GiB (train.dry_run=true itemises it), more than the "
            f"{have / GIB:,.1f} GiB of {where}: lower train.seq_len or train.micro_batch_size, recompute "
            "(model.recompute=full), or split the model further (parallel.tp, parallel.pp, parallel.zero_stage)")


def predict_model_state_bytes(params: int, stage: int, dp: int, precision: str, offload: str = "none") -> dict:
    """Bytes of parameters, gradients, master weights and optimizer states one rank holding `params` parameters
    keeps under ZeRO `stage` over `dp` ranks (the table above; shards rounded up, bucket padding not counted)."""
    if stage == 0:
        return {"parameters": 4 * params, "gradients": 4 * params, "master_weights": 0, "optimizer_states": 8 * params}
    c = 2 if precision in ("bf16", "fp16") else 4
    shard = -(-params // dp)
    master = 4 * shard if c == 2 or offload == "cpu" else 0
    return {"parameters": c * (shard if stage == 3 else params), "gradients": c * (shard if stage >= 2 else params),
            "master_weights": master, "optimizer_states": 8 * shard}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-tensor optimizer state (AdamW's moments; scalar step counts left out) held."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.ndim > 0)


def model_state_bytes(grad_syncs: list, optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradients, master weights and optimizer states, measured from the
    tensors (`grad_syncs`: each model chunk's GradientAllReduce or ZeroDataParallel)."""
    out = {"parameters": 0, "gradients": 0, "master_weights": 0}
    for sync in grad_syncs:
        for key, value in sync.state_bytes().items():
            out[key] += value
    out["optimizer_states"] = optimizer_state_bytes(optimizer)
    return out
