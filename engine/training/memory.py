"""A per-rank memory estimate for `train.dry_run`: model states plus activations, before anything is allocated.

Model states (mixed precision keeps fp32 master parameters): 4 bytes of parameters + 4 of gradients + 8 of Adam
moments per parameter. Activations per layer follow Korthikanti et al. (2022) for a memory-efficient attention
kernel (no s^2 scores kept): about 34·s·b·h bytes at 16-bit, twice that in fp32; `full` recomputation keeps only
each layer's input (2·s·b·h at 16-bit); `selective` is counted like `none`, since the attention scores it would
recompute are never stored by such a kernel. The logits and their gradient add 2 x s·b·V fp32 values.
"""

from __future__ import annotations

from engine.config import Config
from engine.model.flops import count_parameters

GIB = 2**30


def estimate_memory(cfg: Config) -> dict[str, float]:
    """Estimated GiB per rank: parameters, gradients, optimizer states, activations and their total."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    params = count_parameters(m) / (p.tp * p.pp)
    act_scale = 1.0 if t.precision in ("bf16", "fp16") else 2.0
    sbh = t.seq_len * t.micro_batch_size * m.hidden_size
    per_layer = (2 if m.recompute == "full" else 34) * sbh * act_scale
    layers = m.num_layers // p.pp
    logits = 2 * t.seq_len * t.micro_batch_size * m.vocab_size * 4
    out = {
        "parameters_gib": 4 * params / GIB,
        "gradients_gib": 4 * params / GIB,
        "optimizer_gib": 8 * params / GIB,
        "activations_gib": (layers * per_layer + logits) / GIB,
    }
    out["total_gib"] = sum(out.values())
    return out
