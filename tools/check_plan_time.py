#!/usr/bin/env python3
"""The planner's step-time model against measured steps: real Trainer runs on gloo CPU ranks, one calibration.

The "cluster" is this machine, measured first on the same ranks: each rank's matmul rate while every rank
multiplies at once (its share of the cores: the peak), gloo's all-reduce bus bandwidth and latency between the
ranks (every link), and a rank's memory bandwidth (the optimizer's). Then every configuration below runs its
real `Trainer` for --warmup untimed steps and --steps timed ones; a step lasts as long as its slowest rank's
(all-reduced), and the median step is the measurement.

Calibration fixes two constants on two runs, so that their predicted step times equal the measured ones: the
compute efficiency on dp2, the run with the least communication (the fraction of the matmul rate the whole step's
computation achieves: norms, attention, elementwise work and Python's overhead all land in it); then, on tp2, the
time one collective costs inside a step beyond its bytes (a blocking collective also waits for the slower rank to
arrive, so it is several times the latency measured idle). Every other configuration is predicted with those two,
and error = predicted / measured - 1 is reported: the model's error on layouts it was not fitted to.

    python tools/check_plan_time.py            # the table of docs/planning.md (~1.5 minutes on 2 cores)
    python tools/check_plan_time.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine.config import Config  # noqa: E402
from engine.parallel import comm  # noqa: E402
from engine.parallel.state import init_parallel  # noqa: E402
from engine.training.step_time import Cluster, estimate_step_time  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402
from tools.bench_pipeline import write_shard  # noqa: E402
from tools.bench_tp import free_port  # noqa: E402
from tools.check_plan_memory import VOCAB, apply, base_config  # noqa: E402

RANKS = 2
# (name, overrides of the base configuration), on RANKS ranks; the first two calibrate.
CASES: list[tuple[str, dict]] = [
    ("dp2", {"parallel.dp": 2}),
    ("tp2", {"parallel.tp": 2}),
    ("dp2, ZeRO 1", {"parallel.dp": 2, "parallel.zero_stage": 1}),
    ("dp2, ZeRO 2", {"parallel.dp": 2, "parallel.zero_stage": 2}),
    ("dp2, ZeRO 3", {"parallel.dp": 2, "parallel.zero_stage": 3}),
    ("dp2, full recompute", {"parallel.dp": 2, "model.recompute": "full"}),
    ("tp2 + SP", {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    ("pp2, 1F1B", {"parallel.pp": 2, "parallel.pipeline_schedule": "1f1b"}),
    ("pp2, GPipe", {"parallel.pp": 2, "parallel.pipeline_schedule": "gpipe"}),
    ("pp2, interleaved 1F1B (2 chunks)", {"parallel.pp": 2, "parallel.pipeline_schedule": "interleaved_1f1b",
                                          "parallel.virtual_stages": 2}),
]


def case_config(overrides: dict, tmp: str) -> Config:
    """A 4-layer Llama (hidden 256, 4 heads, 2 KV heads), seq 256, micro-batch 2, global batch 16, fp32, with
    `overrides`: large enough that a step's matmuls, not Python, take most of its time."""
    cfg = base_config(tmp)
    m, t = cfg.model, cfg.train
    m.hidden_size, m.max_seq_len, m.ffn_hidden_size = 256, 256, None
    t.seq_len, t.micro_batch_size, t.global_batch_size, t.steps = 256, 2, 16, 50
    return apply(cfg, overrides, RANKS)


def timed(fn, calls: int) -> float:
    """Seconds per call of `fn` over `calls` calls after one untimed call (a fixed count: every rank must make the
    same collective calls)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def machine(cfg: Config) -> dict:
    """This rank's matmul FLOP/s (every rank multiplying at once), the ranks' all-reduce bus bandwidth (bytes/s)
    and latency (s), and its memory bandwidth (bytes/s)."""
    rows, h, f = cfg.train.seq_len * cfg.train.micro_batch_size, cfg.model.hidden_size, cfg.model.ffn_hidden_size
    a, b = torch.randn(rows, h), torch.randn(h, f)
    dist.barrier()
    flops = 2 * rows * h * f / timed(lambda: a @ b, 50)
    big, small = torch.zeros(2**20), torch.zeros(1)  # 4 MiB
    dist.barrier()
    bus = 2 * (RANKS - 1) / RANKS * big.numel() * 4 / timed(lambda: dist.all_reduce(big), 50)
    latency = timed(lambda: dist.all_reduce(small), 200)
    x, y = torch.randn(2**23), torch.randn(2**23)  # 32 MiB each: out of cache
    memory = 3 * x.numel() * 4 / timed(lambda: x.add_(y), 20)  # read two, write one
    return {"flops": flops, "bus_bytes_per_s": bus, "latency_s": latency, "memory_bytes_per_s": memory}


def timed_step(trainer: Trainer) -> tuple[float, float]:
    """One training step's length on the slowest rank, and the most seconds a rank spent inside collectives and
    their waits during it (engine.parallel.comm's record)."""
    dist.barrier()
    start, blocked = time.perf_counter(), comm.LOG.blocked_s
    trainer.train_step()
    took = torch.tensor([time.perf_counter() - start, comm.LOG.blocked_s - blocked], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took[0]), float(took[1])


def worker(rank: int, port: int, tmp: str, warmup: int, steps: int, results: dict) -> None:
    """One rank: the machine's measurements, then every configuration's Trainer built, warmed up and stepped in
    rounds (one step of each per round), so that the machine's drift over the run falls on all of them alike."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=300))
    probe = case_config({"parallel.dp": 2}, tmp)
    before = machine(probe)
    out = {"steps": {name: [] for name, _ in CASES}}
    trainers = {}
    for i, (name, overrides) in enumerate(CASES):
        cfg = case_config(overrides, tmp)
        p = cfg.parallel
        trainers[name] = Trainer(cfg, init_parallel(p.tp, p.pp, p.dp, torch.device("cpu"), backend="gloo"),
                                 f"{tmp}/run{i}-{rank}")
        for _ in range(warmup):
            trainers[name].train_step()
    for _ in range(steps):
        for name, trainer in trainers.items():
            out["steps"][name].append(timed_step(trainer))
    after = machine(probe)
    out["machine"] = {key: (before[key] + after[key]) / 2 for key in before}
    results[rank] = out
    dist.barrier()
    dist.destroy_process_group()


def cpu_cluster(measured: dict, efficiency: float, latency_s: float) -> Cluster:
    """This machine as a planner cluster: one node of RANKS ranks, each with its measured matmul rate, all-reduce
    bandwidth and memory bandwidth (gloo's threads compute on the same cores, so no overlap), at `efficiency` of
    the matmul rate and `latency_s` per collective."""
    gbps = measured["bus_bytes_per_s"] / 1e9
    return Cluster(name="this CPU", nodes=1, gpus_per_node=RANKS, gpu_memory_gib=1e6,
                   peak_tflops=measured["flops"] / 1e12, intra_node_gbps=gbps, inter_node_gbps=gbps,
                   hbm_gbps=measured["memory_bytes_per_s"] / 1e9, efficiency=efficiency, comm_efficiency=1.0,
                   latency_us=latency_s * 1e6, overlap=False)


def solve(predict, seconds: float, low: float, high: float) -> float:
    """The x in [low, high] at which `predict(x)`, a step time falling as x rises, equals `seconds` (bisection in
    log space; an end of the range when none does)."""
    if predict(high) > seconds:
        return high
    if predict(low) < seconds:
        return low
    for _ in range(60):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if predict(mid) > seconds else (low, mid)
    return high


def compare(warmup: int = 1, steps: int = 4) -> dict:
    """Measure the machine and every configuration; calibrate on the first two; predict the rest."""
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(f"{tmp}/shard", VOCAB, 400_000, seed=0)
        results = mp.Manager().dict()
        mp.start_processes(worker, args=(free_port(), tmp, warmup, steps, results), nprocs=RANKS,
                           start_method="spawn")
        ranks = [results[r] for r in range(RANKS)]
    # The slower rank's rates: every layout here waits for its slowest rank.
    measured = {key: min(r["machine"][key] for r in ranks) for key in ("flops", "bus_bytes_per_s",
                                                                       "memory_bytes_per_s")}
    measured["latency_s"] = max(r["machine"]["latency_s"] for r in ranks)
    step = {name: statistics.median(s for s, _ in ranks[0]["steps"][name]) for name, _ in CASES}
    blocked = {name: statistics.median(b for _, b in ranks[0]["steps"][name]) for name, _ in CASES}
    configs = {name: case_config(overrides, "/nonexistent") for name, overrides in CASES}
    (compute_case, _), (comm_case, _) = CASES[0], CASES[1]
    # The compute efficiency from the run with the least communication, and what a collective costs inside a
    # step beyond its bytes (its wait for the slower rank to arrive included) from TP's many small ones; each
    # depends a little on the other, so a few rounds until both runs are predicted as measured.
    efficiency, latency = 1.0, measured["latency_s"]
    for _ in range(5):
        efficiency = solve(lambda e, x=latency: estimate_step_time(configs[compute_case], cpu_cluster(
            measured, e, x))["step_s"], step[compute_case], 1e-4, 2.0)  # of a probe: may exceed 1
        latency = solve(lambda x, e=efficiency: -estimate_step_time(configs[comm_case], cpu_cluster(
            measured, e, x))["step_s"], -step[comm_case], 1e-6, 1.0)
    rows = []
    for name, cfg in configs.items():
        estimate = estimate_step_time(cfg, cpu_cluster(measured, efficiency, latency))
        rows.append({"case": name, "measured_s": step[name], "all_measured_s": ranks[0]["steps"][name],
                     "measured_blocked_s": blocked[name], "calibration": name in (compute_case, comm_case),
                     "predicted_s": estimate["step_s"], "error": estimate["step_s"] / step[name] - 1,
                     "estimate": estimate})
    return {"machine": measured, "efficiency": efficiency, "latency_s": latency, "rows": rows}


def table(result: dict) -> str:
    """The machine, the calibrated efficiency and a markdown table of predicted against measured steps."""
    m = result["machine"]
    lines = [f"machine, per rank ({RANKS} ranks, 1 thread each): matmul {m['flops'] / 1e9:.1f} GFLOP/s, gloo "
             f"all-reduce {m['bus_bytes_per_s'] / 1e9:.2f} GB/s bus bandwidth and {m['latency_s'] * 1e6:.0f} us "
             f"latency idle, memory {m['memory_bytes_per_s'] / 1e9:.1f} GB/s; calibrated: compute efficiency "
             f"{result['efficiency']:.3f}, {result['latency_s'] * 1e6:.0f} us per collective inside a step", "",
             "| configuration | measured step (s) | predicted (s) | error | predicted compute / TP / PP / bubble / "
             "DP exposed (s) | measured in collectives (s) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e = r["estimate"]
        parts = " / ".join(f"{e[k]:.3f}" for k in ("compute_s", "tp_comm_s", "pp_message_s", "pipeline_bubble_s",
                                                  "dp_exposed_s"))
        name = r["case"] + (" (calibration)" if r["calibration"] else "")
        lines.append(f"| {name} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | {100 * r['error']:+.1f}% | "
                     f"{parts} | {r['measured_blocked_s']:.3f} |")
    held_out = [abs(r["error"]) for r in result["rows"] if not r["calibration"]]
    lines += ["", f"held-out configurations: mean |error| {100 * statistics.mean(held_out):.1f}%, worst "
              f"{100 * max(held_out):.1f}%"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (default 4)")
    parser.add_argument("--json", action="store_true", help="print the measurements and estimates as JSON")
    args = parser.parse_args()
    result = compare(args.warmup, args.steps)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
