#!/usr/bin/env python3
"""Training-step throughput: our Trainer against a minimal plain-PyTorch GPT of identical shape and batch.

The reference below is written here, independent of engine/: a nanoGPT-style GPT-2 block stack (fused QKV, SDPA,
tanh GELU, tied head), AdamW, global-norm clipping, random token batches already in memory. Our step is the real
`Trainer.train_step` (data read from a shard, LR schedule, the data-parallel wrapper, metrics bookkeeping), so the
ratio is the whole framework's overhead. Prints numbers; asserts nothing.

    python tools/bench_train.py                    # CPU, fp32, 2 threads
    python tools/bench_train.py --device cuda --precision bf16 --model gpt2_124m
    python tools/bench_train.py --device cuda --precision bf16 --model gpt2_124m --seq-len 1024 --kernels torch triton

--kernels runs our step once per kernel choice (torch: PyTorch references + SDPA; triton: the Triton kernels and
attention; auto: what a run picks by default), interleaved, and reports each one's peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from engine.config import Config, fill_defaults, validate  # noqa: E402
from engine.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from engine.parallel.state import ParallelState  # noqa: E402
from engine.training.metrics import device_name, mfu, peak_tflops  # noqa: E402
from engine.training.trainer import Trainer, autocast_factory  # noqa: E402

PRESETS = {  # (layers, hidden, heads, arch)
    "small": (4, 256, 4, "gpt2"),
    "gpt2_124m": (12, 768, 12, "gpt2"),
    "llama_1b": (22, 2048, 32, "llama"),
}


class PlainBlock(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc, self.out = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, layers: int, h: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(PlainBlock(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def time_interleaved(steps: dict, warmup: int, rounds: int, per_round: int, sync) -> dict[str, list[float]]:
    """Per-step seconds of each step function, measured in alternating rounds so machine drift hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - t0)
    return times


# --kernels choice -> (kernels.backend, kernels.attention)
KERNEL_CHOICES = {"auto": ("auto", "auto"), "torch": ("torch", "sdpa"), "triton": ("triton", "triton")}


def kernel_step(trainer: Trainer, backend: str, attention: str):
    """The trainer's step under one kernel choice (the dispatch is process-wide, so set it before each step)."""
    def step():
        kernels.configure(backend, attention)
        trainer.train_step()
    return step


def peak_step_memory_gib(step, device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one more call of `step` (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def plain_gpt_step(args, device: torch.device, params: int):
    """One training step of the plain reference: forward, backward, clip, AdamW, zero grads."""
    torch.manual_seed(0)
    plain = PlainGPT(args.vocab, args.seq_len, *PRESETS[args.model][:3]).to(device)
    if sum(q.numel() for q in plain.parameters()) != params:
        raise AssertionError("the reference and our model differ in size")
    opt = torch.optim.AdamW(plain.parameters(), lr=3e-4, weight_decay=0.1, foreach=device.type != "cuda",
                            fused=device.type == "cuda")
    data = torch.randint(0, args.vocab, (64, args.seq_len + 1), device=device)
    autocast = autocast_factory(args.precision, device)

    def step():
        rows = data[torch.randint(0, 64, (args.batch,), device=device)]
        with autocast():
            loss = plain(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernels", nargs="+", choices=sorted(KERNEL_CHOICES), default=["auto"],
                   help="kernel choices to time our step with (default: auto)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layers, h, heads, arch = PRESETS[args.model]
    tokens_per_step = args.batch * args.seq_len
    rounds = max(1, args.steps // 5)
    args.steps = 5 * rounds  # whole rounds of 5 steps each

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        with IndexedDatasetBuilder(f"{tmp}/shard", np.uint16) as b:
            for _ in range(2000):
                b.add_document(rng.integers(0, args.vocab, size=int(rng.integers(50, 2000))))
        cfg = Config()
        cfg.model.name, cfg.model.arch, cfg.model.num_layers = args.model, arch, layers
        cfg.model.hidden_size, cfg.model.num_heads, cfg.model.vocab_size = h, heads, args.vocab
        cfg.model.max_seq_len = args.seq_len
        cfg.data.prefix, cfg.data.split, cfg.data.cache_dir = f"{tmp}/shard", "99,1,0", f"{tmp}/cache"
        cfg.data.tokenizer = "byte"  # only checkpoints read it; none are written here
        cfg.train.steps = args.warmup + args.steps + 1  # + the step that measures peak memory
        cfg.train.seq_len, cfg.train.micro_batch_size = args.seq_len, args.batch
        cfg.train.global_batch_size, cfg.train.precision = args.batch, args.precision
        cfg.logging.console = False
        fill_defaults(cfg, 1)
        validate(cfg, 1)
        steps = {}
        for choice in args.kernels:
            trainer = Trainer(cfg, ParallelState(1, 1, 1, 0, device), tmp)
            name = "weft Trainer.train_step" + (f" ({choice})" if len(args.kernels) > 1 else "")
            steps[name] = kernel_step(trainer, *KERNEL_CHOICES[choice])
        flops = trainer.flops_per_token
        params = sum(q.numel() for q in trainer.model.parameters())
        if arch == "gpt2":
            steps["plain PyTorch GPT (same shape)"] = plain_gpt_step(args, device, params)
        results = time_interleaved(steps, args.warmup, rounds, 5, sync)
        peaks = {name: peak_step_memory_gib(step, device) for name, step in steps.items()}

    peak = peak_tflops(device, args.precision)
    print(f"# training-step benchmark, {time.strftime('%Y-%m-%d')}, {device_name(device)}, torch {torch.__version__}, "
          f"{args.threads} threads")
    print(f"model {args.model} ({arch}, {layers} layers, hidden {h}, {params:,} parameters), batch {args.batch} x "
          f"seq {args.seq_len}, {args.precision}, median of {args.steps} steps each, in alternating rounds of 5")
    print(f"{'':34s} {'ms/step':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s}")
    medians = {}
    for name, times in results.items():
        med = statistics.median(times)
        medians[name] = med
        tps = tokens_per_step / med
        u = mfu(flops, tps, peak)
        mem = "n/a" if peaks[name] is None else f"{peaks[name]:.2f}"
        print(f"{name:34s} {med * 1e3:9.1f} {tps:10,.0f} {flops * tps / 1e12:8.3f} "
              f"{'n/a' if u is None else f'{100 * u:5.1f}%':>6s} {mem:>9s}")
    plain_t = medians.get("plain PyTorch GPT (same shape)")
    if plain_t is not None and len(medians) == 2:
        ours_t = next(t for name, t in medians.items() if name.startswith("weft"))
        print(f"overhead of weft vs plain PyTorch: {100 * (ours_t / plain_t - 1):+.1f}% per step "
              f"(goal: at most +5%)")
    return 0 if all(math.isfinite(v) for v in medians.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
