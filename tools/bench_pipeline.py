#!/usr/bin/env python3
"""Pipeline parallelism: a per-stage timeline of one step, the measured bubble beside theory, and our 1F1B executor
against torch.distributed.pipelining's Schedule1F1B on the same stages.

One process per pipeline stage (gloo on CPU, OMP_NUM_THREADS=--threads each), all three parts in one launch:

1. Timeline. The real `Trainer` (pp ranks, --schedule, --micro-batches, --virtual chunks per rank for the
   interleaved schedule) on a random-token shard runs --warmup steps, then one measured step with
   `trainer.record_timeline`. Every rank's (F|B, micro-batch, chunk, start, end) actions are gathered and written as
   a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev): one row per pipeline rank, an "X" event
   per action named F<micro> / B<micro> (F<micro>.c<chunk> for the interleaved schedule), in microseconds from the
   step start. The start is one instant for all ranks: each rank reads its clock after a barrier and the ranks
   all-reduce the latest reading (the ranks share one host's monotonic clock).
2. Bubble. For m = p, 2p, 4p, 8p micro-batches (p = --pp) and each schedule, one measured step's bubble per stage:
   1 - busy / wall, busy = the sum of that rank's F and B durations, wall = from the first action on any rank to
   the last one's end (data loading before and the optimizer after are outside it). Reported as the mean and the
   max over stages beside the theory for equal stages and free communication: (p-1)/(m+p-1) for gpipe and 1f1b,
   (p-1)/(v*m+p-1) for interleaved_1f1b (Megatron: bubble / ideal time = (p-1)/(v*m)). Measured is above theory
   when stages are unequal (stage 0 holds the embedding, the last stage the head and loss: see the busy column),
   and because waiting for a message or copying it counts as bubble. It can be below theory where the ranks do
   not really have a core each: a stage then computes faster while its neighbours idle than while they compute,
   so the warm-up and cool-down shrink. A matmul probe before and after says how independent the ranks' cores
   are (100%: fully; 2 "cores" of a busy VM can be 50%), and the output says whether the machine is
   oversubscribed (fewer cores than ranks x threads), where the numbers say little.
3. Against torch. The same GPT stage modules (engine/model/gpt.py, GPT(cfg, layers=range(a, b), seed)), the same
   split, micro-batches and ranks: our `forward_backward` executor with the 1F1B schedule and `PipelineExchange`
   against `torch.distributed.pipelining.Schedule1F1B` over `PipelineStage`s wrapping the same modules (tensor in,
   tensor out; the last stage returns fp32 logits and a cross-entropy loss_fn scores them; ours computes the loss
   inside the last stage from targets). Forward and backward only, no optimizer step; the two alternate step by
   step (each going first in turn), --warmup untimed steps each, then --steps timed ones, each between two
   barriers and as long as its slowest rank's. ratio = ours / theirs of the median step times (< 1: ours is
   faster); the median of the step-by-step ratios is less sensitive to a noisy machine's drift, and the CPU time
   per step (summed over ranks) shows the work done apart from waiting. The first step's gradients and loss of
   both are compared, so both compute the same thing.

Prints numbers; asserts nothing (exits non-zero only if a rank fails).

    python tools/bench_pipeline.py                                  # all three parts, pp 2, ~2 minutes on 2 cores
    python tools/bench_pipeline.py --schedule interleaved_1f1b --virtual 2 --parts trace
    python tools/bench_pipeline.py --pp 4 --layers 8 --parts bubble   # 4 ranks: oversubscribed on 2 cores
    python tools/bench_pipeline.py --cpu-quick                      # tiny model, seconds: a smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from engine.config import PIPELINE_SCHEDULES, Config, ConfigError, fill_defaults, validate  # noqa: E402
from engine.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.parallel.data_parallel import GradientAllReduce  # noqa: E402
from engine.parallel.pipeline import PipelineExchange, exchange_shape, rank_stages, stage_layers  # noqa: E402
from engine.parallel.state import ParallelState, init_parallel  # noqa: E402
from engine.training.schedule import forward_backward, schedule_steps  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402
from tools.bench_tp import free_port  # noqa: E402

PARTS = ("trace", "bubble", "compare")
# --cpu-quick: a model and sweep small enough for a test to run all three parts in seconds.
QUICK = {"layers": 4, "hidden": 64, "heads": 4, "vocab": 512, "seq_len": 32, "micro_batch_size": 2,
         "factors": [1, 2], "steps": 2, "warmup": 1}


def virtual_of(schedule: str, args: argparse.Namespace) -> int:
    """Model chunks per rank for `schedule`: --virtual for the interleaved one, else 1."""
    return args.virtual if schedule == "interleaved_1f1b" else 1


def bench_config(args: argparse.Namespace, schedule: str, micro_batches: int, shard: str = "", cache: str = "",
                 steps: int = 1) -> Config:
    """The benchmark's model and batch on --pp pipeline ranks under `schedule`, defaults filled in."""
    cfg = Config()
    m = cfg.model
    m.name, m.arch, m.num_layers, m.hidden_size, m.num_heads = "bench_pipeline", args.arch, args.layers, \
        args.hidden, args.heads
    m.vocab_size, m.max_seq_len = args.vocab, args.seq_len
    if args.arch == "llama":
        m.num_kv_heads = args.heads
    p = cfg.parallel
    p.pp, p.tp, p.dp, p.pipeline_schedule = args.pp, 1, 1, schedule
    p.virtual_stages, p.timeout_s = virtual_of(schedule, args), args.timeout_s
    p.pipeline_layers = list(args.split) if args.split and p.virtual_stages == 1 else None
    t = cfg.train
    t.steps, t.seq_len, t.micro_batch_size = steps, args.seq_len, args.micro_batch_size
    t.global_batch_size, t.eval_iters, t.device = args.micro_batch_size * micro_batches, 1, "cpu"
    cfg.data.prefix, cfg.data.split, cfg.data.cache_dir, cfg.data.tokenizer = shard, "100,0,0", cache or None, "byte"
    cfg.logging.console, cfg.logging.progress_bar = False, False
    return fill_defaults(cfg, args.pp)


def bubble_theory(schedule: str, m: int, p: int, v: int) -> float:
    """Bubble fraction of the step for equal stages and free communication: (p-1)/(v*m+p-1), v=1 but interleaved."""
    v = v if schedule == "interleaved_1f1b" else 1
    return (p - 1) / (v * m + p - 1)


def runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(part, schedule, micro-batches) of every Trainer run the trace and bubble parts make, in order."""
    out = []
    if "trace" in args.parts:
        out.append(("trace", args.schedule, args.micro_batches))
    if "bubble" in args.parts:
        out += [("bubble", s, f * args.pp) for s in args.bubble_schedules for f in args.factors]
    return out


# ---------------------------------------------------------------------------------------------- inside the ranks
def common_start(state: ParallelState) -> float:
    """One perf_counter instant for every rank: the latest reading after a barrier (one host's shared clock)."""
    dist.barrier()
    now = torch.tensor([time.perf_counter()], dtype=torch.float64)
    dist.all_reduce(now, op=dist.ReduceOp.MAX)
    return now.item()


def concurrency_probe(state: ParallelState, seconds: float = 0.3) -> float:
    """The mean over ranks of (time of a fixed matmul loop run alone) / (the same loop on every rank at once): 1.0
    when the ranks have a core each, about 1/ranks when they share one."""
    a, b = torch.randn(256, 512), torch.randn(512, 512)

    def work(rounds: int) -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            a @ b
        return time.perf_counter() - t0

    rounds = torch.tensor([max(1, round(seconds / max(work(5) / 5, 1e-6)))], dtype=torch.float64)
    dist.all_reduce(rounds, op=dist.ReduceOp.MIN)  # the same loop everywhere
    n = int(rounds.item())
    solo = 0.0
    for rank in range(state.world_size):  # one at a time, the others waiting in the barrier
        dist.barrier()
        if rank == state.rank:
            solo = work(n)
        dist.barrier()
    together = work(n)
    speed = torch.tensor([solo / together], dtype=torch.float64)
    dist.all_reduce(speed)
    return speed.item() / state.world_size


def measured_step(cfg: Config, state: ParallelState, run_dir: str, warmup: int) -> list[list[tuple]]:
    """A Trainer's `warmup` steps, then one whose actions every rank returns: [rank][(kind, micro, chunk, start s,
    end s)], times from the step's common start."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # no validation split, index-cache messages: not what is measured
        trainer = Trainer(cfg, state, run_dir)
    trainer.record_timeline = True
    for _ in range(warmup):
        trainer.train_step()
    start = common_start(state)
    trainer.train_step()
    mine = [(k, i, c, s - start, e - start) for k, i, c, s, e in trainer.last_step_stats.timeline]
    timelines: list = [None] * state.world_size
    dist.all_gather_object(timelines, mine)
    return timelines


class TensorStage(nn.Module):
    """A GPT stage for torch.distributed.pipelining: plain tensor in (tokens or hidden states), tensor out (hidden
    states, or fp32 logits on the last stage)."""

    def __init__(self, chunk: GPT):
        super().__init__()
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's forward without targets."""
        return self.chunk(x)


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of (batch, seq, vocab) logits."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def compare_schedules(args: argparse.Namespace, state: ParallelState) -> dict:
    """Our 1F1B forward_backward against torch's Schedule1F1B on the same stage module; step times and agreement."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    pp, rank, m = args.pp, state.pp_rank, args.compare_micro_batches
    cfg = bench_config(args, "1f1b", m).model
    layers = stage_layers(cfg.num_layers, pp, args.split)
    chunk = GPT(cfg, layers=layers[rank], seed=args.seed)
    sync = GradientAllReduce(chunk, state.dp_group)  # one DP rank: only the flat gradient buffers, as a run has
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (m * args.micro_batch_size, args.seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    micro = list(zip(inputs.chunk(m), targets.chunk(m), strict=True))

    shape = exchange_shape(args.micro_batch_size, args.seq_len, args.hidden, 1, False)
    exchange = PipelineExchange(state, shape, torch.float32)
    steps = schedule_steps("1f1b", m, pp, rank)
    last = rank == pp - 1

    def ours() -> float:
        total = forward_backward([chunk], steps, micro, [sync], nullcontext, exchange=exchange, stage_of=[rank],
                                 stages=pp)
        return total.item() / m if last else float("nan")

    stage = PipelineStage(TensorStage(chunk), rank, pp, state.device, group=state.pp_group)
    schedule = Schedule1F1B(stage, m, loss_fn=logits_loss, scale_grads=True)

    def theirs() -> float:
        if rank == 0:
            schedule.step(inputs, return_outputs=False)
        elif last:
            losses: list = []
            schedule.step(target=targets, losses=losses, return_outputs=False)
            return torch.stack(losses).mean().item()
        else:
            schedule.step(return_outputs=False)
        return float("nan")

    fns = {"ours": ours, "theirs": theirs}
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}  # this process's CPU seconds per step
    first: dict[str, tuple[float, list[torch.Tensor]]] = {}
    for step in range(args.warmup + args.steps):
        order = list(fns.items()) if step % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:  # alternating, each first in turn, so the machine's drift hits both alike
            sync.zero_grad()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = fn()
            c1 = time.process_time()
            dist.barrier()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(c1 - c0)
            if step == 0:
                first[name] = (loss, [p.grad.clone() for p in chunk.parameters()])
    diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(first["ours"][1], first["theirs"][1], strict=True))
    worst = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    loss = torch.tensor([first["ours"][0], first["theirs"][0]] if last else [0.0, 0.0], dtype=torch.float64)
    dist.broadcast(loss, src=pp - 1)
    per_step = torch.tensor([times["ours"], times["theirs"]], dtype=torch.float64)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)  # each step as long as its slowest rank's
    ours_s, theirs_s = per_step.tolist()
    cpu_step = torch.tensor([statistics.median(cpu["ours"]), statistics.median(cpu["theirs"])], dtype=torch.float64)
    dist.all_reduce(cpu_step)  # over the ranks
    return {"ours_s": ours_s, "theirs_s": theirs_s, "cpu_s": cpu_step.tolist(), "grad_rel_diff": worst.item(),
            "loss_ours": loss[0].item(), "loss_theirs": loss[1].item(),
            "stage_layers": [(r.start, r.stop) for r in layers]}


def worker(rank: int, port: int, args: argparse.Namespace, shard: str, tmp: str, results: dict) -> None:
    """One pipeline rank: every Trainer run of the trace and bubble parts, then the comparison; rank 0 reports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.pp),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.pipelining")
    dist.init_process_group("gloo", rank=rank, world_size=args.pp, timeout=timedelta(seconds=args.timeout_s))
    state = init_parallel(1, args.pp, 1, torch.device("cpu"), timeout_s=args.timeout_s)
    out: dict = {"speed": [concurrency_probe(state)]}
    for i, (part, schedule, m) in enumerate(runs(args)):
        cfg = bench_config(args, schedule, m, shard, f"{tmp}/cache", steps=args.warmup + 1)
        warmup = args.warmup if part == "trace" else args.bubble_warmup
        out[(part, schedule, m)] = measured_step(cfg, state, f"{tmp}/run{i}", warmup)
    if "compare" in args.parts:
        out["compare"] = compare_schedules(args, state)
    out["speed"].append(concurrency_probe(state))
    if rank == 0:
        results.update(out)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- in the parent
def bubble_of(timelines: list[list[tuple]]) -> tuple[float, list[float], list[float]]:
    """(wall s, busy s per rank, bubble fraction per rank) of one step's gathered timelines."""
    start = min(a[3] for tl in timelines for a in tl)
    wall = max(a[4] for tl in timelines for a in tl) - start
    busy = [sum(a[4] - a[3] for a in tl) for tl in timelines]
    return wall, busy, [1 - b / wall for b in busy]


def chrome_trace(timelines: list[list[tuple]], args: argparse.Namespace) -> dict:
    """The gathered timelines as a Chrome/Perfetto trace: one row (tid) per pipeline rank, one X event per action."""
    v = virtual_of(args.schedule, args)
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                           "args": {"name": f"{args.schedule}, pp {args.pp}, {args.micro_batches} micro-batches"
                                            + (f", {v} chunks per rank" if v > 1 else "")}}]
    for rank, timeline in enumerate(timelines):
        stage_of = rank_stages(rank, args.pp, v)
        stages = ", ".join(map(str, stage_of))
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                       "args": {"name": f"pp rank {rank} (stage{'s' if v > 1 else ''} {stages})"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
        for kind, micro, chunk, start, end in timeline:
            events.append({"name": f"{kind}{micro}" + (f".c{chunk}" if v > 1 else ""),
                           "cat": "forward" if kind == "F" else "backward", "ph": "X", "pid": 0, "tid": rank,
                           "ts": round(start * 1e6, 3), "dur": round((end - start) * 1e6, 3),
                           "args": {"micro_batch": micro, "chunk": chunk, "stage": stage_of[chunk]}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"schedule": args.schedule, "pp": args.pp, "virtual": v, "micro_batches": args.micro_batches,
                          "time_zero": "the step's common start (barrier, then the latest clock reading of all ranks)"}}


def write_shard(prefix: str, vocab: int, tokens: int, seed: int) -> None:
    """Random-token documents, `tokens` in all: the Trainer runs' training data."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, np.uint16 if vocab <= 65535 else np.int32) as b:
        written = 0
        while written < tokens:
            n = int(rng.integers(50, 1000))
            b.add_document(rng.integers(0, vocab, size=n))
            written += n


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with --cpu-quick's sizes applied where no flag was given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all three)")
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks, one process each (default: 2)")
    p.add_argument("--schedule", choices=PIPELINE_SCHEDULES, default="1f1b",
                   help="the timeline's schedule (default: 1f1b)")
    p.add_argument("--virtual", type=int, default=2,
                   help="model chunks per rank for interleaved_1f1b, in the timeline and the bubble table (default: 2)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches of the timeline's step (default: 4 x pp)")
    p.add_argument("--trace", default="runs/bench/pipeline_trace.json",
                   help="where to write the timeline's Chrome trace (default: runs/bench/pipeline_trace.json)")
    p.add_argument("--bubble-schedules", nargs="+", choices=PIPELINE_SCHEDULES, default=list(PIPELINE_SCHEDULES),
                   help="schedules in the bubble table (default: all three)")
    p.add_argument("--factors", type=int, nargs="+", default=None,
                   help="the bubble table's micro-batch counts, as multiples of pp (default: 1 2 4 8)")
    p.add_argument("--bubble-warmup", type=int, default=1,
                   help="untimed steps before each bubble measurement (default: 1)")
    p.add_argument("--compare-micro-batches", type=int, default=None,
                   help="micro-batches per step in the comparison with torch (default: 4 x pp)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of the comparison, the median reported "
                                                           "(default: 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before the timeline's step and before the comparison's timed ones (default: 2)")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="model architecture (default: gpt2)")
    p.add_argument("--layers", type=int, default=None,
                   help="transformer layers, split over pp x chunks stages (default: 4)")
    p.add_argument("--split", type=int, nargs="+", default=None,
                   help="layers of each of the pp stages (default: an even split); not used with chunks > 1")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 256)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: 4)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 128)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per micro-batch (default: 4)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank, OMP_NUM_THREADS (default: 1)")
    p.add_argument("--seed", type=int, default=1234, help="weights and tokens of the comparison (default: 1234)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="a collective or receive waiting longer fails the run (default: 300)")
    p.add_argument("--cpu-quick", action="store_true",
                   help="tiny sizes for a smoke test (seconds): hidden 64, vocab 512, seq 32, micro-batch 2, "
                        "factors 1 2, 2 timed steps, 1 warm-up; explicit flags still win")
    args = p.parse_args()
    defaults = {"layers": 4, "hidden": 256, "heads": 4, "vocab": 4096, "seq_len": 128, "micro_batch_size": 4,
                "factors": [1, 2, 4, 8], "steps": 5, "warmup": 2}
    for name, value in (QUICK if args.cpu_quick else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.micro_batches = args.micro_batches or 4 * args.pp
    args.compare_micro_batches = args.compare_micro_batches or 4 * args.pp
    return p, args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every problem before any rank starts (a worker's failure would be a multiprocessing traceback)."""
    if args.pp < 2:
        p.error(f"--pp {args.pp}: a pipeline needs at least 2 ranks")
    for name in ("virtual", "micro_batches", "compare_micro_batches", "steps", "threads", "micro_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.warmup < 0 or args.bubble_warmup < 0 or any(f < 1 for f in args.factors):
        p.error("--warmup and --bubble-warmup must be >= 0, --factors >= 1")
    if "compare" in args.parts and args.warmup < 1:
        p.error("--warmup must be >= 1 for the comparison: torch's schedule infers its shapes in the first step")
    if args.split is not None and (len(args.split) != args.pp or sum(args.split) != args.layers
                                   or min(args.split) < 1):
        p.error(f"--split {args.split}: give {args.pp} positive layer counts summing to --layers {args.layers}")
    checks = [(f"--schedule {s} --micro-batches {m}" if part == "trace" else f"the bubble table's {s} at m={m}",
               bench_config(args, s, m, "x")) for part, s, m in runs(args)]
    if "compare" in args.parts:
        checks.append((f"the comparison (1f1b, {args.compare_micro_batches} micro-batches)",
                       bench_config(args, "1f1b", args.compare_micro_batches, "x")))
    for what, cfg in checks:
        try:
            validate(cfg, args.pp)
        except ConfigError as e:
            p.error(f"{what} with these sizes: {e}")
    if "compare" in args.parts:
        try:
            import torch.distributed.pipelining  # noqa: F401
        except ImportError as e:
            p.error(f"--parts compare needs torch.distributed.pipelining ({e}); leave compare out")


def main() -> int:
    """Command-line entry point."""
    p, args = parse_args()
    check_args(p, args)
    cores = os.cpu_count() or 1
    over = cores < args.pp * args.threads
    print(f"# pipeline benchmark, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CPU gloo, pp {args.pp}")
    print(f"model {args.arch}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
          f"micro-batch {args.micro_batch_size} x seq {args.seq_len}, fp32")
    print(f"{args.pp} ranks x {args.threads} thread(s) on {cores} cores: "
          + ("OVERSUBSCRIBED, ranks share cores, the timings are distorted" if over else "not oversubscribed"))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the spawned ranks start with it
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="weft-bench-pp-") as tmp:
        most = max([m for _, _, m in runs(args)] + [1])
        samples = (args.warmup + 1) * most * args.micro_batch_size
        write_shard(f"{tmp}/shard", args.vocab, 2 * samples * (args.seq_len + 1) + 10_000, args.seed)
        results = mp.Manager().dict()
        mp.start_processes(worker, args=(free_port(), args, f"{tmp}/shard", tmp, results), nprocs=args.pp,
                           start_method="spawn")
        results = dict(results)
    before, after = results["speed"]
    print(f"measured: ranks computing at once run at {100 * before:.0f}% (before) and {100 * after:.0f}% (after) of "
          "their speed alone (a matmul loop; 100%: a core each)")
    if min(before, after) < 0.8:
        print("  so stages that compute at the same time slow each other down: busy times include it, bubbles and "
              "step times shift with it")

    if "trace" in args.parts:
        timelines = results[("trace", args.schedule, args.micro_batches)]
        wall, busy, bubble = bubble_of(timelines)
        path = Path(args.trace)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(chrome_trace(timelines, args)))
        v = virtual_of(args.schedule, args)
        chunks = f", {v} chunks per rank" if v > 1 else ""
        print(f"\n## timeline: {args.schedule}, {args.micro_batches} micro-batches{chunks}")
        for rank, tl in enumerate(timelines):
            order = " ".join(f"{k}{i}" + (f".{c}" if v > 1 else "") for k, i, c, _, _ in tl)
            print(f"rank {rank}: busy {1e3 * busy[rank]:7.1f} ms of {1e3 * wall:.1f}, bubble {bubble[rank]:.3f}; "
                  f"{order}")
        print(f"Chrome trace ({sum(map(len, timelines))} actions) written to {path} (chrome://tracing or "
              "ui.perfetto.dev)")

    if "bubble" in args.parts:
        print(f"\n## bubble fraction, one step, pp {args.pp}" + (" (OVERSUBSCRIBED: distorted)" if over else ""))
        print(f"{'schedule':18s} {'v':>2s} {'m':>4s} {'step ms':>9s} {'measured mean':>14s} {'max':>7s} "
              f"{'theory':>7s}  busy ms per rank")
        for s in args.bubble_schedules:
            v = virtual_of(s, args)
            for f in args.factors:
                m = f * args.pp
                wall, busy, bubble = bubble_of(results[("bubble", s, m)])
                print(f"{s:18s} {v:2d} {m:4d} {1e3 * wall:9.1f} {statistics.mean(bubble):14.3f} {max(bubble):7.3f} "
                      f"{bubble_theory(s, m, args.pp, v):7.3f}  " + " ".join(f"{1e3 * b:.1f}" for b in busy))
        print("theory: (p-1)/(m+p-1), interleaved (p-1)/(v*m+p-1), for equal stages and free messages")

    if "compare" in args.parts:
        r = results["compare"]
        split = ", ".join(f"layers {a}-{b - 1}" for a, b in r["stage_layers"])
        print(f"\n## 1F1B forward+backward, {args.compare_micro_batches} micro-batches, same stages and data"
              + (" (OVERSUBSCRIBED: distorted)" if over else ""))
        print(f"stages: {split}; the embedding on the first, the head and loss on the last")
        print(f"{'':44s} {'ms/step':>9s} {'min':>9s} {'max':>9s} {'CPU ms':>9s}   (of {args.steps} steps after "
              f"{args.warmup} warm-up, alternating)")
        for i, (name, key) in enumerate((("ours: forward_backward + PipelineExchange", "ours_s"),
                                         ("torch.distributed.pipelining Schedule1F1B", "theirs_s"))):
            t = r[key]
            print(f"{name:44s} " + " ".join(f"{1e3 * x:9.1f}" for x in (statistics.median(t), min(t), max(t),
                                                                          r["cpu_s"][i])))
        ratio = statistics.median(r["ours_s"]) / statistics.median(r["theirs_s"])
        paired = statistics.median(a / b for a, b in zip(r["ours_s"], r["theirs_s"], strict=True))
        print(f"ratio ours / theirs {ratio:.3f} (goal <= 1.0); median of the step-by-step ratios {paired:.3f} (each "
              "pair ran back to back: less of the machine's drift)")
        print("CPU ms: the ranks' CPU time per step, summed (median): the work done, without the time spent "
              "blocked waiting for messages")
        print(f"same computation: first-step loss {r['loss_ours']:.6f} vs {r['loss_theirs']:.6f}, gradients' max "
              f"relative difference {r['grad_rel_diff']:.1e}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
