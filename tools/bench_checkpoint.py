#!/usr/bin/env python3
"""Checkpoint save, load and verify time, and the training time one save costs (the stall), synchronous and
asynchronous, for the tiny and the 124M GPT-2 on this machine; prints numbers, asserts nothing.

Each save writes the model, the AdamW state (two moments per parameter) and the RNG state through safetensors into a
temporary step directory, fsyncs and hashes every file, writes the manifest, renames it and moves `latest`; each
load reads them back into a live model and optimizer; verify re-hashes every file. The stall: a synchronous save
blocks the loop for its whole length; an asynchronous one for its host copy, plus whatever the background write
slows the training steps that run meanwhile (measured against the median step before it).

    python tools/bench_checkpoint.py [--models gpt2_tiny gpt2_124m] [--repeats 3] [--dir /fast/disk]
"""

from __future__ import annotations

import argparse
import os
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
from engine.training.async_checkpoint import AsyncSaver  # noqa: E402
from engine.training.checkpoint import (  # noqa: E402
    Retention,
    checkpoints_dir,
    load_checkpoint,
    save_checkpoint,
    snapshot_checkpoint,
    step_dir_name,
)
from engine.training.integrity import checksum_problems, read_manifest  # noqa: E402
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab: int, seq_len: int) -> float:
    """One forward, backward and AdamW step on a random batch of one sequence; returns its seconds."""
    t0 = time.perf_counter()
    tokens = torch.randint(0, vocab, (1, seq_len + 1))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def stalls(run_dir: str, model, optimizer, state: ParallelState, vocab: int, seq_len: int, step: int,
           async_save: bool) -> tuple[float, float, float]:
    """(seconds the training loop was blocked or slowed by one save, the save's own seconds, the median step's
    seconds): steps run before, during and after a save at `step`."""
    base = statistics.median(train_step(model, optimizer, vocab, seq_len) for _ in range(3))
    t0 = time.perf_counter()
    if not async_save:
        save_checkpoint(run_dir, step, state, model, optimizer, {"config": {}}, Retention(keep_last=1))
        elapsed = time.perf_counter() - t0
        return elapsed, elapsed, base
    saver = AsyncSaver(Path(run_dir), state, Retention(keep_last=1))
    saver.save(snapshot_checkpoint(step, state, model, optimizer, {"config": {}}))
    blocked = time.perf_counter() - t0
    during = []
    while saver.in_flight is not None:  # train on while the background thread writes
        during.append(train_step(model, optimizer, vocab, seq_len))
        saver.poll()
    return blocked + sum(during) - base * len(during), time.perf_counter() - t0, base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2_tiny", "gpt2_124m"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training step (one sequence)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    state = ParallelState(1, 1, 1, 0, torch.device("cpu"))
    print(f"# checkpoint benchmark, {time.strftime('%Y-%m-%d')}, CPU ({os.cpu_count()} cores), torch "
          f"{torch.__version__}, median of {args.repeats}; stall = training time lost to one save")
    print(f"{'model':10s} {'parameters':>12s} {'size':>9s} {'save s':>7s} {'load s':>7s} {'verify s':>8s} "
          f"{'step s':>7s} {'sync stall s':>12s} {'async stall s':>13s} {'async write s':>13s}")
    for name in args.models:
        model, optimizer = build(name)
        vocab = model.tok_emb.weight.shape[0]
        params = sum(q.numel() for q in model.parameters())
        rows: dict[str, list[float]] = {k: [] for k in ("save", "load", "verify", "step", "sync", "async", "write")}
        with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
            for repeat in range(args.repeats):
                sync_stall, save_s, step_s = stalls(run_dir, model, optimizer, state, vocab, args.seq_len,
                                                    2 * repeat + 1, False)
                path = checkpoints_dir(run_dir) / step_dir_name(2 * repeat + 1)
                t0 = time.perf_counter()
                load_checkpoint(path, state, model, optimizer)
                rows["load"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                records = read_manifest(path)
                assert not checksum_problems(path, records, sorted(records))
                rows["verify"].append(time.perf_counter() - t0)
                size = sum(f.stat().st_size for f in path.iterdir())
                async_stall, write_s, _ = stalls(run_dir, model, optimizer, state, vocab, args.seq_len,
                                                 2 * repeat + 2, True)
                for key, value in (("save", save_s), ("step", step_s), ("sync", sync_stall), ("async", async_stall),
                                   ("write", write_s)):
                    rows[key].append(value)
        m = {k: statistics.median(v) for k, v in rows.items()}
        print(f"{name:10s} {params:12,d} {size / 1e6:7.1f}MB {m['save']:7.3f} {m['load']:7.3f} {m['verify']:8.3f} "
              f"{m['step']:7.3f} {m['sync']:12.3f} {m['async']:13.3f} {m['write']:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
