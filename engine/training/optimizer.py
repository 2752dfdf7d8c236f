"""AdamW with weight-decay groups, and the learning-rate schedule (warmup, then cosine, linear or WSD decay)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from engine.config import OptimConfig
from engine.parallel.layers import VocabParallelEmbedding


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decayed matrices, and undecayed norms/biases/embeddings (unless configured otherwise)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, VocabParallelEmbedding))}
    # A tied embedding's copy on the last pipeline stage is the embedding: decayed (or not) as it is.
    embeddings |= {id(p) for p in model.parameters() if getattr(p, "tied_embedding", None)}
    decay, no_decay = [], []
    for p in model.parameters():  # unique parameters: a tied weight appears once
        if not p.requires_grad:
            continue
        is_vector = p.ndim < 2  # norm weights and biases
        if (is_vector and not cfg.decay_norms_and_biases) or (id(p) in embeddings and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": params, "weight_decay": wd} for params, wd in zip((decay, no_decay), group_weight_decays(cfg),
                                                                          strict=True)]


def group_weight_decays(cfg: OptimConfig) -> tuple[float, float]:
    """The weight decay of `param_groups`' two groups."""
    return cfg.weight_decay, 0.0


def adamw_impl(cfg: OptimConfig, device_type: str) -> str:
    """Which torch AdamW `optim.impl` means on a device type: `auto` is the fused kernel on CUDA, foreach elsewhere."""
    return cfg.impl if cfg.impl != "auto" else ("fused" if device_type == "cuda" else "foreach")


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over parameter `groups` (`param_groups`): torch's fused kernel on CUDA, its foreach path elsewhere, or
    apex's FusedAdam when asked."""
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            raise RuntimeError("optim.impl=apex but NVIDIA apex is not installed (it is not on PyPI; build it from "
                               "github.com/NVIDIA/apex) - or use optim.impl=auto") from None
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    impl = adamw_impl(cfg, device.type)
    if impl == "fused" and device.type != "cuda":
        raise RuntimeError("optim.impl=fused needs CUDA parameters; use optim.impl=auto or foreach on CPU")
    return torch.optim.AdamW(groups, fused=impl == "fused", foreach=impl == "foreach", **kwargs)


def build_offload_optimizer(cfg: OptimConfig) -> tuple[Callable[[list[dict]], torch.optim.Optimizer], str]:
    """A factory of AdamW over host-memory parameter groups, and its name: DeepSpeed's DeepSpeedCPUAdam (SIMD, built
    on first use) when DeepSpeed is installed and its op builds, else torch's AdamW on the CPU."""
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        DeepSpeedCPUAdam = None  # noqa: N806
    if DeepSpeedCPUAdam is not None:
        try:  # the constructor compiles the op once (~1.5 min), cached under TORCH_EXTENSIONS_DIR
            DeepSpeedCPUAdam([torch.zeros(1, requires_grad=True)], adamw_mode=True)
            return (lambda groups: DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)), "DeepSpeedCPUAdam"
        except Exception as e:  # noqa: BLE001 - a missing compiler or headers: torch AdamW can still run
            print(f"warning: DeepSpeedCPUAdam could not be built ({type(e).__name__}: {e}); using torch AdamW",
                  file=sys.stderr)
    return (lambda groups: torch.optim.AdamW(groups, foreach=True, **kwargs)), "torch AdamW (CPU)"


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr, then flat."""
    warmup, decay = cfg.warmup_steps or 0, cfg.decay_steps or 0
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = step - warmup
    if cfg.decay_style == "constant" or decay == 0:  # no decay phase
        return cfg.lr
    if t + 1 >= decay:  # the last decay step and after: exactly min_lr
        return cfg.min_lr
    if cfg.decay_style == "wsd":  # warmup-stable-decay: hold lr, then decay linearly over the last fraction
        decay_len = max(1, round(decay * cfg.wsd_decay_fraction))
        stable = decay - decay_len
        if t < stable:
            return cfg.lr
        frac = (t - stable + 1) / decay_len
    else:
        frac = (t + 1) / decay
    if cfg.decay_style == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.lr - (cfg.lr - cfg.min_lr) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply `lr` to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
