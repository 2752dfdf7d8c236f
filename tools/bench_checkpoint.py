#!/usr/bin/env python3
"""Checkpoint save and load time on this machine, for the tiny and the 124M GPT-2; prints numbers, asserts nothing.

Each save writes the model, the AdamW state (two moments per parameter) and the RNG state through safetensors into a
temporary step directory, renames it and moves `latest`; each load reads them back into a live model and optimizer.

    python tools/bench_checkpoint.py [--models gpt2_tiny gpt2_124m] [--repeats 3] [--dir /fast/disk]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from engine.config import Config, OptimConfig, fill_defaults  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from engine.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from engine.training.optimizer import build_optimizer, param_groups  # noqa: E402


def preset_config(name: str, tp: int = 1, vocab: int = 50304) -> Config:
    """The preset `conf/model/<name>.yaml` with vocabulary `vocab` (default GPT-2's, padded) on `tp` ranks."""
    cfg = Config()
    cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.model),
                                                    OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")))
    cfg.model.vocab_size, cfg.parallel.tp = vocab, tp
    return fill_defaults(cfg, tp)


def build(name: str, tp: int = 1, group: torch.distributed.ProcessGroup | None = None,
          vocab: int = 50304) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """This rank's part of the preset (TP `group` of `tp` ranks), and an AdamW whose state exists (one step on
    random grads)."""
    model = GPT(preset_config(name, tp, vocab).model, group)
    optimizer = build_optimizer(param_groups(model, OptimConfig()), OptimConfig(), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2_tiny", "gpt2_124m"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    state = ParallelState(1, 1, 1, 0, torch.device("cpu"))
    print(f"# checkpoint benchmark, {time.strftime('%Y-%m-%d')}, CPU, torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"{'model':12s} {'parameters':>12s} {'size':>9s} {'save s':>8s} {'load s':>8s} {'save GB/s':>10s}")
    for name in args.models:
        model, optimizer = build(name)
        params = sum(q.numel() for q in model.parameters())
        saves, loads = [], []
        with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
            for step in range(1, args.repeats + 1):
                t0 = time.perf_counter()
                path = save_checkpoint(run_dir, step, state, model, optimizer, {"config": {}}, keep_last=1)
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                load_checkpoint(path, state, model, optimizer)
                loads.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.iterdir())
        save_s, load_s = statistics.median(saves), statistics.median(loads)
        print(f"{name:12s} {params:12,d} {size / 1e6:7.1f}MB {save_s:8.3f} {load_s:8.3f} {size / save_s / 1e9:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
