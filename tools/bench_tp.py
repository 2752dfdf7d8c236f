#!/usr/bin/env python3
"""Tensor-parallel throughput: tokens/s of the same model and batch at TP 1, 2 and 4, and where the time goes.

Each TP size runs in its own group of gloo ranks (NCCL on CUDA, one GPU per rank) building `GPT(cfg, tp_group,
sequence_parallel)`: forward, backward, the TP gradient reductions, clipping by the global norm and AdamW on
random tokens. The collectives of the TP mappings, the vocab-parallel loss and the partial-gradient reduction are
timed (on CUDA between synchronizes), so the table shows the share of the step spent communicating, and per
attention or MLP layer. Prints numbers; asserts nothing.

    python tools/bench_tp.py                         # CPU: TP 1, 2, 4 on the demo's model, SP off and on
    python tools/bench_tp.py --device cuda --tp 1 2 4 --precision bf16 --model-preset gpt2_124m   # 4 GPUs
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine.config import Config, ConfigError, fill_defaults, validate  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.parallel import cross_entropy, grads, mappings  # noqa: E402
from engine.parallel.grads import allreduce_partial_grads, clip_grads_, grad_norm, param_grads  # noqa: E402
from engine.parallel.state import init_parallel  # noqa: E402
from engine.training.trainer import autocast_factory  # noqa: E402

PRESETS = {  # (layers, hidden, heads, vocab)
    "demo": (4, 128, 4, 4096),
    "small": (4, 256, 4, 4096),
    "gpt2_124m": (12, 768, 12, 50257),
}


@contextmanager
def timed_collectives(device: torch.device, totals: dict[str, float]) -> Iterator[None]:
    """Add the wall time of every TP collective (by kind) to `totals` while inside."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def wrap(kind, fn):
        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            totals[kind] += time.perf_counter() - t0
            return out
        return timed

    with mock.patch.object(mappings, "_all_reduce", wrap("all_reduce", mappings._all_reduce)), \
            mock.patch.object(mappings, "_all_gather", wrap("all_gather", mappings._all_gather)), \
            mock.patch.object(mappings, "_reduce_scatter", wrap("reduce_scatter", mappings._reduce_scatter)), \
            mock.patch.object(cross_entropy, "tp_all_reduce_", wrap("loss_all_reduce", cross_entropy.tp_all_reduce_)), \
            mock.patch.object(grads, "_allreduce_flat", wrap("partial_grads", grads._allreduce_flat)):
        yield


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def layout_config(args: argparse.Namespace, tp: int, sp: bool) -> Config:
    """The benchmark's model on `tp` ranks, defaults filled in."""
    num_layers, hidden, heads, vocab = PRESETS[args.model_preset]
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads = num_layers, hidden, heads
    cfg.model.vocab_size, cfg.model.max_seq_len = vocab, args.seq_len
    cfg.parallel.tp, cfg.train.seq_len, cfg.parallel.sequence_parallel = tp, args.seq_len, sp
    return fill_defaults(cfg, tp)


def worker(rank: int, tp: int, port: int, args: argparse.Namespace, results: dict) -> None:
    """One rank of a TP group: time `args.steps` training steps; rank 0 stores the medians in `results`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.threads // tp))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if tp > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=tp,
                                timeout=timedelta(seconds=300))
    state = init_parallel(tp, 1, 1, device)
    m = layout_config(args, tp, args.sp).model
    vocab = m.vocab_size
    torch.manual_seed(0)
    model = GPT(m, state.tp_group, args.sp).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = autocast_factory(args.precision, device)
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    step_times, comm_times = [], []
    for step in range(args.warmup + args.steps):
        totals: dict[str, float] = defaultdict(float)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with timed_collectives(device, totals):
            with autocast():
                loss = model(inputs, targets)
            loss.backward()
            allreduce_partial_grads(param_grads(model.parameters()), state.tp_group)
            params = list(model.parameters())
            clip_grads_([p.grad for p in params], 1.0, grad_norm(param_grads(params), state.tp_group))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            comm_times.append(dict(totals))
    if rank == 0:
        median = statistics.median(step_times)
        comm = {k: statistics.median(c.get(k, 0.0) for c in comm_times) for k in comm_times[0]} if tp > 1 else {}
        results[(tp, args.sp)] = {"step_s": median, "tokens_per_s": args.batch * args.seq_len / median,
                                  "params_rank0": sum(p.numel() for p in model.parameters()), "comm": comm}
    if tp > 1:
        dist.destroy_process_group()


def main() -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP sizes to run (default: 1 2 4)")
    p.add_argument("--sp", choices=["off", "on", "both"], default="both",
                   help="sequence parallelism for TP > 1 (default: both)")
    p.add_argument("--model-preset", choices=sorted(PRESETS), default="demo",
                   help="model shape (default: demo, the make demo model)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, the median reported (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: gloo ranks; cuda: NCCL, one GPU per rank (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="(default: fp32)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads shared by a TP group's ranks (default: all cores)")
    args = p.parse_args()
    num_layers, hidden, heads, vocab = PRESETS[args.model_preset]
    # Every problem before any rank starts: a worker's failure would be a multiprocessing traceback.
    if args.device == "cuda" and torch.cuda.device_count() < max(args.tp):
        p.error(f"--device cuda needs a GPU per rank: {max(args.tp)} for --tp {max(args.tp)}, "
                f"{torch.cuda.device_count()} here")
    for tp in args.tp:
        try:
            validate(layout_config(args, tp, sp=args.sp != "off"), tp)
        except ConfigError as e:
            p.error(f"--tp {tp} with --model-preset {args.model_preset}: {e}")
    print(f"model {args.model_preset}: {num_layers} layers, hidden {hidden}, {heads} heads, vocab {vocab}; batch "
          f"{args.batch} x seq {args.seq_len}, {args.precision}, {args.device}, {args.threads} threads in all")
    results = mp.Manager().dict()
    sps = {"off": [False], "on": [True], "both": [False, True]}[args.sp]
    for tp in args.tp:
        for sp in (sps if tp > 1 else [False]):
            args.sp = sp
            mp.start_processes(worker, args=(tp, free_port(), args, results), nprocs=tp, start_method="spawn")
            r = results[(tp, sp)]
            comm = sum(r["comm"].values())
            kinds = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in sorted(r["comm"].items()))
            # The mappings' collectives: per attention or MLP layer one each way (SP: two each way), and the
            # embedding and output layer together as many again as one layer, so 2L + 1 layers' worth.
            layer_comm = comm - r["comm"].get("loss_all_reduce", 0.0) - r["comm"].get("partial_grads", 0.0)
            per_region = 1e3 * layer_comm / (2 * num_layers + 1)
            print(f"tp {tp} sp {'on ' if sp else 'off'}: {1e3 * r['step_s']:7.1f} ms/step, "
                  f"{r['tokens_per_s']:8.0f} tokens/s, params on rank 0 {r['params_rank0']:,}"
                  + (f"; communication {100 * comm / r['step_s']:.0f}% of the step ({kinds}; "
                     f"{per_region:.1f} ms per attention or MLP layer)" if tp > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
