#!/usr/bin/env python3
"""Resuming in another tensor-parallel layout: each rank's load time and peak host memory; prints numbers only.

A checkpoint (weights and AdamW moments) is written by `--save-tp` gloo ranks. Each `--load-tp` size then reads
the weights alone in two ways: as every loader here reads them (`engine.training.reshard`: each rank reads only the
rows of its own part) and, for comparison, merged into the whole model first and then split (what a reader without
slicing holds); then a whole resume (weights, AdamW moments, RNG). Peak memory is the rise of the process's resident
set (VmHWM) during each load, file pages included.

    python tools/bench_reshard.py                                    # gpt2_124m, saved by TP 2, read by TP 1, 2, 4
    python tools/bench_reshard.py --model gpt2_350m --save-tp 4 --load-tp 1 8
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine.config import ConfigError, validate  # noqa: E402
from engine.parallel.state import ParallelState, init_parallel  # noqa: E402
from engine.training.checkpoint import (  # noqa: E402
    Retention,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from engine.training.reshard import CheckpointTensors, FullTensors, copy_parameters, read_whole  # noqa: E402
from tools.bench_checkpoint import build as build_checkpointed  # noqa: E402
from tools.bench_checkpoint import preset_config  # noqa: E402
from tools.bench_tp import free_port  # noqa: E402

VOCAB = 50257  # GPT-2's, unpadded: the padding then differs between TP sizes


def memory_kib() -> tuple[int, int]:
    """(peak, current) resident set of this process."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS"))


def build(name: str, tp: int) -> tuple[ParallelState, torch.nn.Module, torch.optim.Optimizer]:
    """This rank's part of the model (GPT-2's unpadded vocabulary), with an AdamW whose moments exist."""
    state = init_parallel(tp, 1, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model, optimizer = build_checkpointed(name, tp, state.tp_group, VOCAB)
    optimizer.zero_grad(set_to_none=True)
    return state, model, optimizer


def worker(rank: int, tp: int, port: int, args: argparse.Namespace, run_dir: str, save: bool, results: dict) -> None:
    """One rank: save the checkpoint, or load it both ways and record time and peak memory."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if tp > 1:
        dist.init_process_group("gloo", rank=rank, world_size=tp, timeout=timedelta(seconds=600))
    state, model, optimizer = build(args.model, tp)
    if save:
        save_checkpoint(run_dir, 1, state, model, optimizer, {"config": {}}, Retention(keep_last=1))
    else:
        path = latest_checkpoint(run_dir)
        meta = read_meta(path)
        loads = {  # weights only, each rank reading its rows / the whole model merged, then split; a full resume
            "sliced": lambda: copy_parameters(model, CheckpointTensors(path, "model", meta), state.tp_group),
            "merged": lambda: copy_parameters(
                model, FullTensors(read_whole(CheckpointTensors(path, "model", meta)), str(path)), state.tp_group),
            "resume": lambda: load_checkpoint(path, state, model, optimizer),
        }
        row = {"own_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
        for how, load in loads.items():
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident set
            _, before = memory_kib()
            t0 = time.perf_counter()
            load()
            row[f"{how}_s"] = time.perf_counter() - t0
            row[f"{how}_mib"] = (memory_kib()[0] - before) / 1024
        results[rank] = row
    if tp > 1:
        dist.destroy_process_group()


def main() -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2_124m", help="a conf/model preset (default: gpt2_124m)")
    p.add_argument("--save-tp", type=int, default=2, help="TP size that writes the checkpoint (default: 2)")
    p.add_argument("--load-tp", type=int, nargs="+", default=[1, 2, 4], help="TP sizes that read it (default: 1 2 4)")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    args = p.parse_args()
    if not (REPO / "conf" / "model" / f"{args.model}.yaml").exists():
        p.error(f"--model {args.model}: no conf/model/{args.model}.yaml")
    for tp in (args.save_tp, *args.load_tp):
        try:
            validate(preset_config(args.model, tp, VOCAB), tp)
        except ConfigError as e:
            p.error(f"TP {tp} with --model {args.model}: {e}")
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        mp.start_processes(worker, args=(args.save_tp, free_port(), args, run_dir, True, results),
                           nprocs=args.save_tp, start_method="spawn")
        print(f"# {args.model} saved by TP {args.save_tp}, {time.strftime('%Y-%m-%d')}, CPU, torch "
              f"{torch.__version__}. Per rank: its weights' size; seconds and peak memory rise (MiB) to read the "
              "weights sliced (as we do) and merged-then-split; and a whole resume (weights, AdamW moments, RNG)")
        print(f"{'load TP':>7s} {'rank':>4s} {'weights MiB':>11s} {'sliced s':>9s} {'MiB':>6s} {'merged s':>9s} "
              f"{'MiB':>6s} {'resume s':>9s} {'MiB':>6s}")
        for tp in args.load_tp:
            results.clear()
            mp.start_processes(worker, args=(tp, free_port(), args, run_dir, False, results), nprocs=tp,
                               start_method="spawn")
            for rank in sorted(results.keys()):
                r = results[rank]
                print(f"{tp:7d} {rank:4d} {r['own_mib']:11.0f} "
                      + " ".join(f"{r[f'{how}_s']:9.2f} {r[f'{how}_mib']:6.0f}" for how in ("sliced", "merged",
                                                                                            "resume")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
