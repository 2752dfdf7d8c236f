"""A per-rank memory estimate for `train.dry_run`: model states plus activations, before anything is allocated.

Model states (mixed precision keeps fp32 master parameters): 4 bytes of parameters + 4 of gradients + 8 of Adam
moments per parameter this rank holds (replicated and padded ones included). Activations per layer follow
Korthikanti et al. (2022) for a memory-efficient attention kernel (no s^2 scores kept): about 34·s·b·h bytes at
16-bit, twice that in fp32; `full` recomputation keeps only each layer's input (2·s·b·h at 16-bit), plus one
layer's full activations while it is recomputed; `selective` is counted like `none`, since the attention scores it
would recompute are never stored by such a kernel. The logits and their gradient add 2 x s·b·V fp32 values.

With tensor parallelism t the matmul-side activations split (Korthikanti's 10 + 24/t per s·b·h). Sequence
parallelism splits the rest too, except the two gathered inputs of the column-parallel projections, which we keep
for backward instead of gathering them again (30/t + 4). The logits are split by vocabulary (V/t).
"""

from __future__ import annotations

from engine.config import Config
from engine.model.flops import parameters_per_rank

GIB = 2**30


def estimate_memory(cfg: Config) -> dict[str, float]:
    """Estimated GiB per rank: parameters, gradients, optimizer states, activations and their total."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    params = parameters_per_rank(m, p.tp) / p.pp  # pipeline stages: an even split, for now
    act_scale = 1.0 if t.precision in ("bf16", "fp16") else 2.0
    sbh = t.seq_len * t.micro_batch_size * m.hidden_size
    sp = p.sequence_parallel and p.tp > 1
    stored = sbh * (30 / p.tp + 4 if sp else 10 + 24 / p.tp)  # one layer's activations kept for backward
    layers = m.num_layers // p.pp
    if m.recompute == "full":  # each layer's input, and one layer's activations during its recomputation
        per_layer = (2 * sbh / (p.tp if sp else 1)) + stored / layers
    else:
        per_layer = stored
    per_layer *= act_scale
    logits = 2 * t.seq_len * t.micro_batch_size * m.vocab_size * 4 / p.tp
    out = {
        "parameters_gib": 4 * params / GIB,
        "gradients_gib": 4 * params / GIB,
        "optimizer_gib": 8 * params / GIB,
        "activations_gib": (layers * per_layer + logits) / GIB,
    }
    out["total_gib"] = sum(out.values())
    return out
