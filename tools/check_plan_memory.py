#!/usr/bin/env python3
"""The planner's memory per rank against measurement: real Trainer steps on gloo CPU ranks.

For each configuration, every rank builds the real `Trainer` inside torch's profiler (memory profiling on), runs
one step (so AdamW's moments exist), then a second one. Measured on each rank:
    model states  the bytes of its parameters, gradients, master weights and optimizer states, read from the
                  tensors (engine.training.memory.model_state_bytes: what run_info.json and W&B report);
    peak          the most bytes torch's CPU allocator held at once during the second step, counted from before
                  the Trainer was built (every allocation and free the profiler saw): on CPU the same quantity
                  as torch.cuda.max_memory_allocated on a GPU.
Predicted: engine.training.memory.estimate_memory, the function behind tools/plan.py and train.dry_run, for the
rank's pipeline stage. error = predicted / measured - 1, per rank; the table shows each configuration's worst.

    python tools/check_plan_memory.py            # the table of docs/planning.md (~1 minute on 2 cores)
    python tools/check_plan_memory.py --json     # one object per configuration and rank
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine.config import Config, ModelConfig, fill_defaults, validate  # noqa: E402
from engine.parallel import comm  # noqa: E402
from engine.parallel.state import init_parallel  # noqa: E402
from engine.training.memory import estimate_memory, model_state_bytes  # noqa: E402
from engine.training.step_time import bytes_per_step  # noqa: E402
from engine.training.trainer import Trainer  # noqa: E402
from tools.bench_pipeline import write_shard  # noqa: E402
from tools.bench_tp import free_port  # noqa: E402

RANKS = 4
VOCAB = 1000
# (name, overrides of the base configuration below); every one on RANKS ranks.
CASES: list[tuple[str, dict]] = [
    ("dp4, ZeRO 0", {"parallel.dp": 4}),
    ("dp4, ZeRO 1", {"parallel.dp": 4, "parallel.zero_stage": 1}),
    ("dp4, ZeRO 2", {"parallel.dp": 4, "parallel.zero_stage": 2}),
    ("dp4, ZeRO 3", {"parallel.dp": 4, "parallel.zero_stage": 3}),
    ("dp4, full recompute", {"parallel.dp": 4, "model.recompute": "full"}),
    ("tp2 x dp2, selective recompute", {"parallel.tp": 2, "parallel.dp": 2, "model.recompute": "selective"}),
    ("tp2 + SP x dp2, full recompute", {"parallel.tp": 2, "parallel.dp": 2, "parallel.sequence_parallel": True,
                                        "model.recompute": "full"}),
    ("tp4 + SP, GPT-2", {"parallel.tp": 4, "parallel.sequence_parallel": True, "model.arch": "gpt2"}),
    ("pp2 x dp2, 1F1B", {"parallel.pp": 2, "parallel.dp": 2, "parallel.pipeline_schedule": "1f1b"}),
    ("pp2 x dp2, GPipe", {"parallel.pp": 2, "parallel.dp": 2, "parallel.pipeline_schedule": "gpipe"}),
    ("pp4, interleaved 1F1B (2 chunks)", {"parallel.pp": 4, "parallel.pipeline_schedule": "interleaved_1f1b",
                                          "parallel.virtual_stages": 2, "model.num_layers": 8}),
    ("tp2 + SP x pp2, 1F1B, GPT-2", {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True,
                                     "model.arch": "gpt2"}),
    ("dp4, ZeRO 1, bf16 autocast", {"parallel.dp": 4, "parallel.zero_stage": 1, "train.precision": "bf16"}),
]


# One GPU, bf16 unless named: (name, conf/model preset, its vocabulary, sequence length, overrides).
GPT2, LLAMA = ("gpt2_124m", 50257, 1024), ("llama_1b", 32000, 2048)
GPU_CASES: list[tuple[str, str, int, int, dict]] = [
    ("GPT-2 124M, seq 1024, micro 8", *GPT2, {"train.micro_batch_size": 8}),
    ("GPT-2 124M, fp32", *GPT2, {"train.micro_batch_size": 8, "train.precision": "fp32"}),
    ("GPT-2 124M, full recompute", *GPT2, {"train.micro_batch_size": 8, "model.recompute": "full"}),
    ("GPT-2 124M, Triton kernels", *GPT2, {"train.micro_batch_size": 8, "kernels.backend": "triton"}),
    ("Llama 1.1B, seq 2048, micro 2", *LLAMA, {"train.micro_batch_size": 2}),
    ("Llama 1.1B, selective recompute", *LLAMA, {"train.micro_batch_size": 2, "model.recompute": "selective"}),
    ("Llama 1.1B, full recompute, micro 4", *LLAMA, {"train.micro_batch_size": 4, "model.recompute": "full"}),
]


def base_config(tmp: str) -> Config:
    """A 4-layer Llama (hidden 128, 4 heads, 2 KV heads), seq 128, micro-batch 4, global batch 32, fp32, two steps,
    on the shard in `tmp`."""
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.arch, m.name, m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads = "llama", "check", 4, 128, 4, 2
    m.vocab_size, m.max_seq_len = VOCAB, 128
    cfg.data.prefix, cfg.data.split, cfg.data.cache_dir = f"{tmp}/shard", "98,2,0", f"{tmp}/cache"
    cfg.data.tokenizer = "byte"  # only checkpoints read it; none are written
    t.steps, t.seq_len, t.global_batch_size, t.micro_batch_size = 2, 128, 32, 4
    t.eval_interval, t.save_interval, t.log_interval = 0, 0, 1
    cfg.logging.console = False
    return cfg


def apply(cfg: Config, overrides: dict, world: int) -> Config:
    """`overrides` ({"section.key": value}) set on `cfg`, completed and validated for `world` ranks."""
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    fill_defaults(cfg, world)
    validate(cfg, world)
    return cfg


def case_config(overrides: dict, tmp: str) -> Config:
    """A CASES configuration: the base one with `overrides`, on RANKS ranks."""
    cfg = base_config(tmp)
    if overrides.get("model.arch") == "gpt2":
        cfg.model.num_kv_heads = cfg.model.num_heads
    return apply(cfg, overrides, RANKS)


def gpu_case_config(preset: str, vocab: int, seq: int, overrides: dict, tmp: str) -> Config:
    """A GPU_CASES configuration: conf/model/<preset>.yaml's shape (read as plain YAML: the GPU image may lack Hydra)
    at sequence length `seq` in bf16, two micro-batches a step, on one GPU, with `overrides`."""
    import yaml

    cfg = base_config(tmp)
    cfg.model = ModelConfig()  # the schema's defaults for what the preset leaves out, as Hydra composes it
    for name, value in yaml.safe_load((REPO / "conf" / "model" / f"{preset}.yaml").read_text()).items():
        setattr(cfg.model, name, value)
    t = cfg.train
    cfg.model.vocab_size, cfg.model.max_seq_len = vocab, seq
    t.seq_len, t.precision, t.device = seq, "bf16", "cuda"
    t.global_batch_size = 2 * overrides.get("train.micro_batch_size", t.micro_batch_size)  # accumulation runs
    return apply(cfg, overrides, 1)


def allocations(prof: profile) -> list[tuple[int, int, int]]:
    """(time in ns, address, bytes allocated (+) or freed (-)) of every CPU allocation the profiler recorded."""
    from torch._C._profiler import _EventType  # the profiler's own event tree: allocations with their sizes

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(events)


def peak_held(events: list[tuple[int, int, int]], start: int, end: int) -> int:
    """The most bytes live at once between `start` and `end`. Live = allocated and not yet freed, by address: gloo
    frees some tensors on its own threads, which the profiler does not see, so an address allocated again is taken
    as freed first."""
    live: dict[int, int] = {}
    held = peak = 0
    for when, ptr, size in events:
        held -= live.pop(ptr, 0)
        if size > 0:
            live[ptr] = size
            held += size
        if start <= when <= end:
            peak = max(peak, held)
    return peak


@contextlib.contextmanager
def count_traffic() -> Iterator[dict[str, dict[str, int]]]:
    """Payload bytes this rank hands to torch.distributed inside the block, by mesh group and operation, counted as
    engine.training.step_time does: the whole tensor (an all-gather's output, a reduce-scatter's input, each
    pipeline message sent). Every collective passes engine.parallel.comm's record, so its `begin` sees them all."""
    counts: dict[str, dict[str, int]] = {}
    begin, batch = comm.LOG.begin, dist.batch_isend_irecv

    def add(group: str, op: str, nbytes: int) -> None:
        counts.setdefault(group, {}).setdefault(op, 0)
        counts[group][op] += nbytes

    def counted_begin(op, group, tensor, depth=2):
        call = begin(op, group, tensor, depth + 1)
        if tensor is not None and not op.startswith("send/recv"):
            whole = len(call.ranks) if op == "all_gather" else 1  # all-gathers record their input
            add(call.group, op, tensor.numel() * tensor.element_size() * whole)
        return call

    def counted_batch(ops):
        for op in ops:
            if op.op is dist.isend:
                add("pp", "send", op.tensor.numel() * op.tensor.element_size())
        return batch(ops)

    comm.LOG.begin, dist.batch_isend_irecv = counted_begin, counted_batch
    try:
        yield counts
    finally:
        comm.LOG.begin, dist.batch_isend_irecv = begin, batch


def measure(cfg: Config, run_dir: str) -> dict:
    """This rank's measured model-state bytes, peak allocated bytes and communicated bytes during its second step."""
    p = cfg.parallel
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = init_parallel(p.tp, p.pp, p.dp, torch.device("cpu"), backend="gloo")
        trainer = Trainer(cfg, state, run_dir)
        trainer.train_step()
        dist.barrier()
        start = time.time_ns()
        with count_traffic() as traffic:
            trainer.train_step()
        end = time.time_ns()
        states = sum(model_state_bytes(trainer.grad_syncs, trainer.optimizer).values())
    peak = peak_held(allocations(prof), start, end)
    del trainer
    return {"pp_rank": state.pp_rank, "model_state": states, "peak": peak, "traffic": traffic}


def measure_cuda(cfg: Config, run_dir: str) -> dict:
    """One GPU: model-state bytes and torch.cuda.max_memory_allocated during the second step."""
    import kernels

    kernels.configure(cfg.kernels.backend, cfg.kernels.attention)
    device = torch.device("cuda")
    trainer = Trainer(cfg, init_parallel(1, 1, 1, device), run_dir)
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.train_step()
    torch.cuda.synchronize()
    out = {"pp_rank": 0, "model_state": sum(model_state_bytes(trainer.grad_syncs, trainer.optimizer).values()),
           "peak": torch.cuda.max_memory_allocated()}
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return out


def compare_cuda() -> list[dict]:
    """GPU_CASES on this process's GPU, predicted against measured."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(f"{tmp}/shard", 50257, 2_000_000, seed=0)
        for i, (name, preset, vocab, seq, overrides) in enumerate(GPU_CASES):
            cfg = gpu_case_config(preset, vocab, seq, overrides, tmp)
            rows.append(row(name, 0, measure_cuda(cfg, f"{tmp}/run{i}"), estimate_memory(cfg)))
    return rows


def row(name: str, rank: int, got: dict, plan: list[dict], traffic: list[dict] | None = None) -> dict:
    """One rank's prediction and measurement, and their relative errors; with `traffic` (step_time.bytes_per_step)
    also its communicated bytes by group and operation, predicted and measured."""
    want = plan[got["pp_rank"]]
    predicted = {"model_state": want["model_state_bytes"][want["zero_stage"]], "peak": want["total_bytes"]}
    out = {"case": name, "rank": rank, "pp_rank": got["pp_rank"],
           **{key: {"predicted": predicted[key], "measured": got[key], "error": predicted[key] / got[key] - 1}
              for key in predicted}}
    if traffic is not None:
        out["traffic"] = {"predicted": traffic[got["pp_rank"]], "measured": got["traffic"]}
    return out


def worker(rank: int, port: int, shard_dir: str, results: dict) -> None:
    """One rank: every configuration in turn (one process group, new mesh groups per configuration)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=RANKS, timeout=timedelta(seconds=300))
    out = {}
    for i, (name, overrides) in enumerate(CASES):
        run_dir = f"{shard_dir}/run{i}-{rank}"
        out[name] = measure(case_config(overrides, shard_dir), run_dir)
    results[rank] = out
    dist.barrier()
    dist.destroy_process_group()


def compare() -> list[dict]:
    """Every configuration and rank: predicted and measured model-state and peak bytes, and their errors."""
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(f"{tmp}/shard", VOCAB, 400_000, seed=0)
        results = mp.Manager().dict()
        mp.start_processes(worker, args=(free_port(), tmp, results), nprocs=RANKS, start_method="spawn")
        measured = {r: results[r] for r in range(RANKS)}
    configs = {name: case_config(overrides, "/nonexistent") for name, overrides in CASES}
    return [row(name, rank, measured[rank][name], estimate_memory(configs[name]), bytes_per_step(configs[name]))
            for name in configs for rank in range(RANKS)]


def per_stage(rows: list[dict]) -> list[dict]:
    """Per configuration and pipeline stage, its rank with the lowest measured peak. A stage's ranks do the same
    work, so their true peaks are equal; what differs is what the profiler missed, and missing a free (gloo frees
    some collective buffers on its own threads) can only add to a measured peak."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["case"], r["pp_rank"])
        if key not in best or r["peak"]["measured"] < best[key]["peak"]["measured"]:
            best[key] = r
    return list(best.values())


def table(rows: list[dict]) -> str:
    """A markdown table: per configuration, its worst pipeline stage for each quantity (`per_stage`)."""
    rows = per_stage(rows)
    names = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| configuration | model states predicted / measured (MiB) | error | peak predicted / measured (MiB) "
             "| error |", "|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["case"] == name]
        cells = []
        for key in ("model_state", "peak"):
            worst = max(mine, key=lambda r: abs(r[key]["error"]))[key]
            cells += [f"{worst['predicted'] / 2**20:.2f} / {worst['measured'] / 2**20:.2f}",
                      f"{100 * worst['error']:+.1f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print every configuration and rank as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: the configurations on 4 gloo ranks; cuda: real model shapes on this GPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the CPU table needs none: --device cpu)")
        return 0
    rows = compare() if args.device == "cpu" else compare_cuda()
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
