#!/usr/bin/env python3
"""ZeRO: step time and peak memory per stage against stage 0 and against DeepSpeed, the share of gradient
reduction hidden behind backward, and CPU optimizer offload against none.

Every configuration runs in a fresh launch of --ranks gloo processes (OMP_NUM_THREADS=--threads each), so each
peak is its own: peak memory = the largest rank's peak resident set (ru_maxrss) minus its resident set before the
model was built (and after DeepSpeed's import). Weft runs the real `Trainer` (its train_step: forward and
backward over the micro-batches, reductions, global-norm clipping, AdamW) on a random-token shard; DeepSpeed runs
`deepspeed.initialize` on the same GPT module (same initialisation) with torch's AdamW over the same weight-decay
groups, the same micro-batch, accumulation and clipping, fp32. Step time: the median of --steps timed steps after
--warmup, each between two barriers. ratio = Weft / DeepSpeed (< 1: ours is faster or smaller).

Overlap: with parallel.overlap_comm=false each reduce-scatter is waited for as it is launched, so that step is
compute + communication; with overlap the communication runs during the rest of backward. hidden = (t_off - t_on)
/ t_comm, t_comm being the same reduce-scatters timed alone, one after another (stages 1 and 2, whose collectives
differ between the two modes only there). On a machine with fewer cores than ranks x threads, compute and gloo's
communication threads compete for the same cores, and little can be hidden.

Prints numbers; asserts nothing (exits non-zero only if a rank fails).

    python tools/bench_zero.py                       # ~3 minutes on 2 cores (DeepSpeed if installed)
    python tools/bench_zero.py --deepspeed-offload   # also DeepSpeed's offload (builds cpu_adam once, ~1.5 min)
    python tools/bench_zero.py --cpu-quick           # a tiny model: a smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from io import StringIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine.config import Config, fill_defaults, validate  # noqa: E402
from engine.model import GPT  # noqa: E402
from engine.parallel.comm import reduce_scatter_flat  # noqa: E402
from engine.parallel.state import init_parallel  # noqa: E402
from engine.training.memory import model_state_bytes  # noqa: E402
from engine.training.optimizer import param_groups  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402
from tools.bench_pipeline import write_shard  # noqa: E402
from tools.bench_tp import free_port  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def bench_config(args: argparse.Namespace, stage: int, shard: str, cache: str, overlap: bool = True,
                 offload: str = "none") -> Config:
    """The benchmark model and batch on --ranks data-parallel ranks at ZeRO `stage`."""
    cfg = Config()
    m = cfg.model
    m.name, m.arch, m.num_layers, m.hidden_size, m.num_heads = "bench_zero", "llama", args.layers, args.hidden, \
        args.heads
    m.num_kv_heads, m.vocab_size, m.max_seq_len = args.heads, args.vocab, args.seq_len
    p = cfg.parallel
    p.dp, p.zero_stage, p.overlap_comm, p.optimizer_offload = args.ranks, stage, overlap, offload
    p.bucket_size_mb = args.bucket_mb
    t = cfg.train
    t.steps, t.seq_len, t.micro_batch_size, t.device = args.warmup + args.steps, args.seq_len, args.micro_batch_size, \
        "cpu"
    t.global_batch_size, t.eval_iters = args.micro_batch_size * args.accumulation * args.ranks, 1
    cfg.optim.impl = "foreach"
    cfg.data.prefix, cfg.data.split, cfg.data.cache_dir, cfg.data.tokenizer = shard, "100,0,0", cache, "byte"
    cfg.logging.console, cfg.logging.progress_bar = False, False
    fill_defaults(cfg, args.ranks)
    validate(cfg, args.ranks)
    return cfg


def timed(step, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones, each between barriers."""
    out = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def reduction_alone(trainer: Trainer, stage: int, accumulation: int, repeats: int = 3) -> float:
    """Seconds per step of the reduce-scatters `stage` launches, run one after another with nothing else."""
    buckets = trainer.grad_syncs[0].buckets
    flats = [torch.randn(b.shard_size * b.world) for b in buckets]
    outs = [torch.empty(b.shard_size) for b in buckets]
    per_step = 1 if stage == 1 else accumulation  # stage 1 reduces on the last micro-batch only
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(per_step):
            for flat, out in zip(flats, outs, strict=True):
                reduce_scatter_flat(out, flat)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weft_run(args: argparse.Namespace, run: dict, shard: str, tmp: str) -> dict:
    cfg = bench_config(args, run["stage"], shard, f"{tmp}/cache", run.get("overlap", True), run.get("offload", "none"))
    state = init_parallel(1, 1, args.ranks, torch.device("cpu"), timeout_s=cfg.parallel.timeout_s)
    with redirect_stderr(StringIO()) as err:
        trainer = Trainer(cfg, state, f"{tmp}/run")
    out = {"times": timed(trainer.train_step, args.steps, args.warmup),
           "state_bytes": sum(model_state_bytes(trainer.grad_syncs, trainer.optimizer).values()),
           "note": next((line for line in err.getvalue().splitlines() if line.startswith("optimizer offload")), "")}
    if run.get("comm"):
        out["comm"] = reduction_alone(trainer, run["stage"], args.accumulation)
    return out


def deepspeed_run(args: argparse.Namespace, run: dict, shard: str, tmp: str) -> dict:
    import deepspeed

    cfg = bench_config(args, 0, shard, f"{tmp}/cache")
    model = GPT(cfg.model, seed=cfg.train.seed)
    o = cfg.optim
    zero: dict = {"stage": run["stage"], "reduce_bucket_size": int(args.bucket_mb * 2**20 / 4),
                  "overlap_comm": True}
    if run.get("offload") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        zero["offload_optimizer"] = {"device": "cpu"}
    else:
        optimizer = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      foreach=True)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch_size, "gradient_accumulation_steps": args.accumulation,
              "gradient_clipping": o.clip_grad, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    g = torch.Generator().manual_seed(dist.get_rank())
    micro = [torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_len + 1), generator=g)
             for _ in range(args.accumulation)]

    def step() -> None:
        for t in micro:
            engine.backward(engine(t[:, :-1], t[:, 1:]))
            engine.step()

    return {"times": timed(step, args.steps, args.warmup), "state_bytes": None, "note": ""}


def worker(rank: int, port: int, args: argparse.Namespace, run: dict, shard: str, tmp: str, results: dict) -> None:
    """One rank of one configuration; every rank reports its times and memory."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.ranks),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, timeout=timedelta(seconds=600))
    if run["engine"] == "deepspeed":  # its import's own memory is not the run's
        import deepspeed  # noqa: F401
    base = resident_bytes()
    out = (weft_run if run["engine"] == "weft" else deepspeed_run)(args, run, shard, tmp)
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    results[rank] = out
    dist.barrier()
    dist.destroy_process_group()


def launch(args: argparse.Namespace, run: dict, shard: str, tmp: str) -> dict:
    """One configuration on fresh ranks: median step seconds (slowest rank's), peak bytes (largest rank's)."""
    results = mp.Manager().dict()
    mp.start_processes(worker, args=(free_port(), args, run, shard, f"{tmp}/{len(os.listdir(tmp))}", results),
                       nprocs=args.ranks, start_method="spawn")
    ranks = [results[r] for r in range(args.ranks)]
    step = statistics.median(max(times) for times in zip(*(r["times"] for r in ranks), strict=True))
    return {"step": step, "peak": max(r["peak"] for r in ranks), "state": ranks[0]["state_bytes"],
            "comm": ranks[0].get("comm"), "note": ranks[0]["note"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for what "
                                "each number means.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per rank per step (default 2)")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="parallel.bucket_size_mb (default 1)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--no-deepspeed", action="store_true", help="Weft only (DeepSpeed is used when installed)")
    p.add_argument("--deepspeed-offload", action="store_true",
                   help="also DeepSpeed's CPU offload (DeepSpeedCPUAdam: compiled on first use)")
    p.add_argument("--cpu-quick", action="store_true", help="a tiny model and two steps: a smoke test")
    args = p.parse_args()
    if args.cpu_quick:
        args.layers, args.hidden, args.vocab, args.seq_len, args.steps, args.warmup = 1, 32, 256, 16, 2, 1
    for name in ("ranks", "threads", "layers", "hidden", "heads", "vocab", "seq_len", "micro_batch_size",
                 "accumulation", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main() -> int:
    """Command-line entry point."""
    args = parse_args()
    deepspeed = not args.no_deepspeed and importlib.util.find_spec("deepspeed") is not None
    cores = os.cpu_count() or 1
    cfg = bench_config(args, 0, "", "")
    params = sum(p.numel() for p in GPT(cfg.model, seed=0).parameters())
    print(f"# ZeRO benchmark, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CPU gloo, dp {args.ranks} x "
          f"{args.threads} thread(s) on {cores} cores"
          + (f", DeepSpeed {__import__('deepspeed').__version__}" if deepspeed else ", no DeepSpeed"))
    print(f"model llama: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {params:,} parameters; "
          f"micro-batch {args.micro_batch_size} x seq {args.seq_len}, accumulation {args.accumulation}, fp32, "
          f"bucket {args.bucket_mb} MB")
    runs = {f"weft stage {s}": {"engine": "weft", "stage": s, "comm": s in (1, 2)} for s in range(4)}
    runs.update({f"weft stage {s} overlap off": {"engine": "weft", "stage": s, "overlap": False} for s in (1, 2)})
    runs["weft stage 2 offload"] = {"engine": "weft", "stage": 2, "offload": "cpu"}
    if deepspeed:
        runs.update({f"deepspeed stage {s}": {"engine": "deepspeed", "stage": s} for s in range(4)})
        if args.deepspeed_offload:
            runs["deepspeed stage 2 offload"] = {"engine": "deepspeed", "stage": 2, "offload": "cpu"}
    out = {}
    with tempfile.TemporaryDirectory(prefix="weft-bench-zero-") as tmp:
        tokens = (args.warmup + args.steps + 1) * args.micro_batch_size * args.accumulation * args.ranks
        write_shard(f"{tmp}/shard", args.vocab, 2 * tokens * (args.seq_len + 1) + 10_000, seed=0)
        for name, run in runs.items():
            out[name] = launch(args, run, f"{tmp}/shard", tmp)
            print(f"  ran {name}", file=sys.stderr, flush=True)

    base = out["weft stage 0"]
    print(f"\n{'configuration':<28}{'step s':>9}{'vs st.0':>9}{'peak MB':>10}{'vs st.0':>9}{'state MB':>10}"
          f"{'step / DS':>11}{'peak / DS':>11}")
    for name, r in out.items():
        ds = out.get(name.replace("weft", "deepspeed")) if name.startswith("weft") else None
        state = f"{r['state'] / 1e6:>10.1f}" if r["state"] else f"{'':>10}"
        vs_ds = (f"{r['step'] / ds['step']:>11.2f}{r['peak'] / ds['peak']:>11.2f}" if ds else "")
        print(f"{name:<28}{r['step']:>9.3f}{r['step'] / base['step']:>9.2f}{r['peak'] / 1e6:>10.1f}"
              f"{r['peak'] / base['peak']:>9.2f}{state}{vs_ds}")
    print("\nreduction hidden behind backward (overlap on vs off, t_comm: the reduce-scatters alone):")
    for s in (1, 2):
        on, off = out[f"weft stage {s}"], out[f"weft stage {s} overlap off"]
        hidden = (off["step"] - on["step"]) / on["comm"]
        print(f"  stage {s}: off {off['step']:.3f} s, on {on['step']:.3f} s, t_comm {on['comm']:.3f} s -> "
              f"hidden {100 * max(0.0, min(1.0, hidden)):.0f}% (raw {hidden:+.2f})")
    off = out["weft stage 2 offload"]
    print(f"\noffload (stage 2): {off['step']:.3f} s vs {out['weft stage 2']['step']:.3f} s without "
          f"({off['step'] / out['weft stage 2']['step']:.2f}x); {off['note']}")
    if cores < args.ranks * args.threads:
        print(f"note: {args.ranks} ranks x {args.threads} threads on {cores} cores: oversubscribed, timings distorted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
