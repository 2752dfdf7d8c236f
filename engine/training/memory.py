"""A per-rank memory model for the planner (tools/plan.py), `train.dry_run` and run_info.json: model states, the
activations each pipeline stage holds, and the working memory of the step's peak, before anything is allocated.

Model states, for the Psi parameters this rank holds (replicated, padded and tied-copy ones included;
engine.model.flops), N data-parallel ranks and c bytes per compute value (2 at bf16/fp16 under ZeRO, else 4):

    stage 0   4 Psi parameters + 4 Psi gradients + 8 Psi AdamW moments (fp32; autocast computes in 16 bits)
    stage 1   c Psi parameters + c Psi gradients + (m + 8) Psi / N master weights and moments
    stage 2   c Psi parameters + c Psi / N gradients + (m + 8) Psi / N
    stage 3   (c Psi + c Psi + (m + 8) Psi) / N

with m = 4 bytes of fp32 master weights when they are a copy (16-bit compute, or offloaded to the host), else 0.
These are the ZeRO paper's (2 + 2 + 12) Psi at bf16, up to each bucket's padding to a multiple of N.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models":
count, per layer and micro-batch, every tensor autograd keeps for backward. The paper counts its own GPT layer
(34·s·b·h bytes at 16 bits with dropout masks, plus 5·a·s²·b for unfused attention scores); we count ours, item by
item (`layer_activation_bytes`), because our blocks differ: no dropout by default, an attention kernel that keeps
q, k, v, its output and one log-sum-exp per row (never the s² scores), SwiGLU and RMSNorm for Llama, and kernel
choices (`kernels.backend`) that keep different tensors. The paper's rules for the parallel splits carry over:
tensor parallelism t splits everything between a column-parallel layer and its row-parallel partner (q, k, v,
attention, MLP intermediates: /t); sequence parallelism splits the rest (norms, residual stream: /t) except the
gathered inputs of the column-parallel projections, which we keep for backward rather than gather again.
Recomputation: `full` keeps only each layer's input, and rebuilds one layer at a time in backward; `selective`
recomputes the attention kernel, whose own saved tensors (q, k, v, output) are kept by its neighbours anyway, so
it saves only the log-sum-exp: with a fused attention kernel there are no scores left to drop.

Under pipelining a stage holds those activations for every micro-batch in flight: the schedule decides how many
(GPipe: all m; 1F1B: pp - r on rank r; interleaved: its warm-up depth, per chunk). The count here is read off the
schedule's own action list (engine.training.schedule), so estimate and executor cannot disagree. The last stage
adds the loss: the logits and what the cross entropy keeps, and at the start of backward the logits' gradient.

The peak is the larger of two moments: backward's first steps on the last micro-batch (every activation in flight,
plus the loss's or one recomputed layer's working memory) and the optimizer step (model states, plus foreach
AdamW's temporaries on the host; CUDA's fused AdamW has none).
"""

from __future__ import annotations

import os

import torch

from engine.config import Config, micro_batches_per_step
from engine.data.index_cache import available_host_memory
from engine.model.flops import parameters_per_rank
from engine.parallel.layers import padded_vocab_size, vocab_parallel_loss
from engine.parallel.pipeline import rank_stages, stage_layers
from engine.training.optimizer import adamw_impl
from engine.training.schedule import schedule_actions

GIB = 2**30
F32 = 4


def value_sizes(cfg: Config) -> tuple[int, int]:
    """(bytes per value of the residual stream, bytes per value of a matmul's input or output)."""
    half = cfg.train.precision in ("bf16", "fp16")
    residual = 2 if half and cfg.parallel.zero_stage > 0 else F32  # ZeRO computes on 16-bit parameters
    return residual, 2 if half else F32


def _widths(cfg: Config) -> dict[str, float]:
    """One rank's tensor widths: rows (tokens of a micro-batch), rows of the norm region (split under SP), hidden,
    q / k-v / MLP widths and query heads after the tensor-parallel split."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    head_dim = m.hidden_size // m.num_heads
    kv_local = m.num_kv_heads // p.tp if m.num_kv_heads % p.tp == 0 else 1  # replicated K/V: one head each
    rows = t.seq_len * t.micro_batch_size
    sp = p.sequence_parallel and p.tp > 1
    return {"rows": rows, "norm_rows": rows / p.tp if sp else rows, "h": m.hidden_size,
            "q": m.hidden_size / p.tp, "kv": kv_local * head_dim, "f": m.ffn_hidden_size / p.tp,
            "heads": m.num_heads / p.tp}


def _norm_bytes(cfg: Config, w: dict[str, float]) -> float:
    """What one norm keeps for backward: its input (and the reference RMSNorm its fp32 input and normalised
    output), and fp32 per-row statistics (LayerNorm: mean and 1/std; RMSNorm: 1/rms)."""
    residual, _ = value_sizes(cfg)
    n, h = w["norm_rows"], w["h"]
    if cfg.model.arch == "gpt2":
        return n * h * residual + 2 * n * F32
    if cfg.kernels.backend == "triton":  # the Triton RMSNorm keeps x and 1/rms only
        return n * h * residual + n * F32
    return n * h * F32 + n * h * residual + n * F32  # x.float(), the normalised x, 1/rms


def layer_activation_bytes(cfg: Config) -> float:
    """Bytes one transformer layer keeps for backward per micro-batch on this rank, nothing recomputed."""
    _, mm = value_sizes(cfg)
    w = _widths(cfg)
    rows = w["rows"]
    norms = 2 * _norm_bytes(cfg, w)
    projection_inputs = 2 * rows * w["h"] * mm  # the (gathered, under SP) inputs of the q/k/v and MLP projections
    # The attention kernel keeps q, k, v and its output (the output projection's input too) and one fp32
    # log-sum-exp per row and head; Llama's q and k are the rotated ones (RoPE itself keeps only the shared tables).
    attention = rows * (2 * w["q"] + 2 * w["kv"]) * mm
    lse = 0.0 if cfg.model.recompute == "selective" else rows * w["heads"] * F32
    if cfg.model.arch == "gpt2":  # up projection's output (GELU's input) and GELU's output (down's input)
        mlp = 2 * rows * w["f"] * mm
    else:  # gate, up, silu(gate) (the PyTorch reference) and the product (down's input)
        mlp = (3 if cfg.kernels.backend == "triton" else 4) * rows * w["f"] * mm
    dropout = 2 * w["norm_rows"] * w["h"] if cfg.model.dropout > 0 else 0.0  # two bool masks per layer
    return norms + projection_inputs + attention + lse + mlp + dropout


def layer_input_bytes(cfg: Config) -> float:
    """Bytes one layer keeps per micro-batch under full recomputation: its input (this rank's sequence chunk)."""
    residual, _ = value_sizes(cfg)
    w = _widths(cfg)
    return w["norm_rows"] * w["h"] * residual


def autocast_weight_bytes(cfg: Config, params: int) -> float:
    """16-bit autocast over fp32 parameters (no ZeRO) casts each matrix weight once per micro-batch's forward, and
    backward keeps the 16-bit copy: 2 bytes per parameter of the chunk per micro-batch in flight."""
    half = cfg.train.precision in ("bf16", "fp16")
    return 2.0 * params if half and cfg.parallel.zero_stage == 0 else 0.0


def loss_bytes(cfg: Config) -> tuple[float, float]:
    """(kept, working): bytes the final norm, head and cross entropy keep for backward per micro-batch, and the
    extra the loss's backward allocates on top of them (the logits' gradients) at its peak."""
    m, p = cfg.model, cfg.parallel
    _, mm = value_sizes(cfg)
    w = _widths(cfg)
    rows = w["rows"]
    vocab = padded_vocab_size(m.vocab_size, p.tp, m.make_vocab_size_divisible_by) / p.tp
    head_input = _norm_bytes(cfg, w) + rows * w["h"] * mm  # the final norm's, and the head's input
    # Vocabulary-parallel: keeps the logits shard; backward: its fp32 softmax, then the gradient.
    if vocab_parallel_loss(m.vocab_size, p.tp, m.make_vocab_size_divisible_by):
        kept, working = rows * vocab * mm, rows * vocab * (2 * F32 + mm)
    elif cfg.kernels.backend == "triton":  # keeps the logits; backward writes their gradient
        kept, working = rows * vocab * mm, rows * vocab * mm
    else:  # F.cross_entropy on fp32 logits keeps their log-softmax; backward: its gradient and the logits'
        kept, working = rows * vocab * F32, 2 * rows * vocab * F32 + (rows * vocab * mm if mm != F32 else 0)
    return head_input + kept, working


def layer_backward_bytes(cfg: Config) -> float:
    """Working memory of one layer's backward: the incoming gradient and the MLP intermediates' gradients
    (GPT-2: GELU's output and input; Llama: the product's, the gate's and the up projection's)."""
    residual, mm = value_sizes(cfg)
    w = _widths(cfg)
    return w["rows"] * ((2 if cfg.model.arch == "gpt2" else 3) * w["f"] * mm + 2 * w["h"] * residual)


def chunk_parameters(cfg: Config, stage: int) -> int:
    """Parameters one tensor-parallel rank holds of pipeline stage `stage` (engine.model.flops.parameters_per_rank)."""
    p = cfg.parallel
    layers = stage_layers(cfg.model.num_layers, p.pp * p.virtual_stages, p.pipeline_layers)
    return parameters_per_rank(cfg.model, p.tp, layers[stage])


def bucket_bytes(cfg: Config, params: int) -> float:
    """Bytes of one gradient bucket over a model chunk of `params` parameters: parallel.bucket_size_mb, or the whole
    chunk's gradients when they are fewer."""
    _, mm = value_sizes(cfg)
    return min(cfg.parallel.bucket_size_mb * 2**20, params * mm)


def zero_working_bytes(cfg: Config, params: int) -> float:
    """ZeRO stages 2 and 3: one bucket's gradients exist whole while it fills, then as the flat reduce-scatter
    input, which stays in flight until the next micro-batch reduces the same bucket. Stage 3 adds the gathered
    parameters of the part running and of the next one, prefetched."""
    p = cfg.parallel
    if p.zero_stage < 2:
        return 0.0
    _, mm = value_sizes(cfg)
    bucket = bucket_bytes(cfg, params)
    gathered = 0.0
    if p.zero_stage == 3:
        layer = parameters_per_rank(cfg.model, p.tp, range(1)) - parameters_per_rank(cfg.model, p.tp, range(0))
        gathered = 2 * layer * mm
    return 2 * bucket + gathered


def estimate_memory(cfg: Config) -> list[dict]:
    """Per pipeline rank: its stages and their layers, parameters, the (micro-batch, chunk) activations it holds at
    its peak, and estimated bytes (and GiB) of parameters, gradients, optimizer states, activations, the working
    memory at the peak, and the peak total (every TP and DP rank of a stage alike)."""
    m, p = cfg.model, cfg.parallel
    stages = p.pp * p.virtual_stages
    layers = stage_layers(m.num_layers, stages, p.pipeline_layers)
    full = m.recompute == "full"
    per_layer = layer_activation_bytes(cfg)
    kept_per_layer = layer_input_bytes(cfg) if full else per_layer
    loss_kept, loss_working = loss_bytes(cfg)
    out = []
    for r in range(p.pp):
        mine = rank_stages(r, p.pp, p.virtual_stages)
        params = sum(chunk_parameters(cfg, s) for s in mine)
        # What one micro-batch leaves behind in each chunk until its backward.
        chunk_bytes = [len(layers[s]) * kept_per_layer + (loss_kept if s == stages - 1 else 0.0)
                       + autocast_weight_bytes(cfg, chunk_parameters(cfg, s)) for s in mine]
        # The most activation bytes held at once while the schedule runs, and how many (micro-batch, chunk)
        # activations make it up (micro-batches, with one chunk per rank).
        held: set[tuple[int, int]] = set()
        most, now, in_flight = 0.0, 0.0, 0
        for action in schedule_actions(p.pipeline_schedule, micro_batches_per_step(cfg), p.pp, r, p.virtual_stages):
            key = (action.micro, action.chunk)
            if action.kind == "F" and key not in held:
                held.add(key)
                now += chunk_bytes[action.chunk]
            elif action.kind == "B" and key in held:
                held.discard(key)
                now -= chunk_bytes[action.chunk]
            if now > most:
                most, in_flight = now, len(held)
        # Backward's working memory on top of what is held: the loss's (last stage), or one layer rebuilt.
        last = stages - 1 in mine
        working = max(loss_working if last else 0.0, per_layer if full else 0.0, layer_backward_bytes(cfg))
        working += zero_working_bytes(cfg, params)
        states = {stage: predict_model_state_bytes(params, stage, p.dp or 1, cfg.train.precision,
                                                   p.optimizer_offload) for stage in range(4)}
        mine_now = states[p.zero_stage]
        model_state = sum(mine_now.values())
        # Offloaded to a GPU's host, the master weights and AdamW (and the step's temporaries) are not on the GPU.
        host = (mine_now["master_weights"] + mine_now["optimizer_states"]
                if p.optimizer_offload == "cpu" and on_gpu(cfg) else 0)
        on_device = model_state - host
        step_peak = max(on_device + most + working,
                        on_device + (0.0 if host else optimizer_working_bytes(cfg, mine_now)))
        row = {"pp_rank": r, "stages": mine, "layers": [[layers[s].start, layers[s].stop] for s in mine],
               "parameters": params, "activations_in_flight": in_flight, "zero_stage": p.zero_stage,
               "parameters_bytes": mine_now["parameters"], "gradients_bytes": mine_now["gradients"],
               "optimizer_bytes": mine_now["master_weights"] + mine_now["optimizer_states"],
               "model_state_bytes": {stage: sum(v.values()) for stage, v in states.items()},
               "activations_bytes": most, "working_bytes": step_peak - on_device - most, "host_bytes": host,
               "total_bytes": step_peak}
        row.update({k.replace("_bytes", "_gib"): row[k] / GIB for k in
                    ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "working_bytes",
                     "total_bytes")})
        out.append(row)
    return out


def optimizer_working_bytes(cfg: Config, states: dict[str, int]) -> float:
    """Temporaries of the optimizer step on this rank: torch's foreach AdamW (the CPU path) builds a few lists of
    the size of the parameters it updates; CUDA's fused kernel none."""
    # An offloaded optimizer steps on the host, whatever device the model is on.
    device_type = "cuda" if on_gpu(cfg) and cfg.parallel.optimizer_offload != "cpu" else "cpu"
    fused = adamw_impl(cfg.optim, device_type) == "fused"
    return 0.0 if fused else states["optimizer_states"] / 2  # one fp32 list of the updated parameters' size


def on_gpu(cfg: Config) -> bool:
    """Whether the run computes on a GPU: train.device=cuda plans for one even where none is (tools/plan.py on a
    laptop); auto, where one is."""
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


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
