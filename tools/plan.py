#!/usr/bin/env python3
"""Plan a layout before spending the cluster-week: will it fit, how fast will it go, and which layout is fastest.

The model and layout are the trainer's own overrides, so a plan and a run read the same words; the cluster is a
preset (--cluster h100|h200|a100: 8-GPU SXM nodes) or flags. Memory is the trainer's dry-run estimate
(engine.training.memory: the same function, checked against measurement in docs/planning.md); the step time is
engine.training.step_time (compute at a stated efficiency, communication from its bytes and the links'
bandwidth, the pipeline schedule simulated, the share hidden by overlap stated), calibrated on a measured CPU run
(tools/check_plan_time.py).

    python tools/plan.py model=llama_1b train=pretrain_1b model.vocab_size=32000 parallel.tp=8 --nodes 4
    python tools/plan.py model=llama_1b train=pretrain_1b model.vocab_size=32000 --nodes 4 --search
    python tools/plan.py model=llama_7b model.vocab_size=32000 train.seq_len=4096 train.global_batch_size=1024 \\
        train.precision=bf16 --nodes 16 --search
    python tools/plan.py --budget 50000 --cluster h100 model=llama_1b model.vocab_size=32000
    python tools/plan.py model=llama_1b ... --json            # one object (memory_per_gpu_bytes: a contract)

--search varies the layout keys not given on the command line: parallel.tp (powers of two within a node),
parallel.pp (divisors of the layers) with 1f1b or interleaved_1f1b (GPipe has 1F1B's bubble and more memory),
parallel.zero_stage, model.recompute, train.micro_batch_size and parallel.sequence_parallel (where tp > 1);
parallel.dp fills the cluster. Exit codes: 0, or 2 for an invalid configuration or cluster, or a search with no
valid layout (every problem listed).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import Config, ConfigError, fill_defaults, format_errors, override_problems, validate  # noqa: E402
from engine.model.flops import count_parameters, flops_per_token  # noqa: E402
from engine.training.memory import GIB, estimate_memory  # noqa: E402
from engine.training.metrics import PEAK_TFLOPS  # noqa: E402
from engine.training.step_time import Cluster, estimate_step_time  # noqa: E402

# 8-GPU SXM nodes: the device's name in engine.training.metrics.PEAK_TFLOPS (its dense peaks), the memory torch
# reports, NVLink's per-GPU bandwidth each way, one GPU's share of the node's network (one 400 Gb/s NIC per GPU on
# H100/H200 nodes, 200 Gb/s on A100 ones), and HBM bandwidth. GB/s.
PRESETS = {
    "h100": {"device": "H100 80GB HBM3", "label": "H100 SXM 80GB", "gpu_memory_gib": 79.6, "intra_node_gbps": 450.0,
             "inter_node_gbps": 50.0, "hbm_gbps": 3350.0},
    "h200": {"device": "H200", "label": "H200 SXM 141GB", "gpu_memory_gib": 139.8, "intra_node_gbps": 450.0,
             "inter_node_gbps": 50.0, "hbm_gbps": 4800.0},
    "a100": {"device": "A100", "label": "A100 SXM 80GB", "gpu_memory_gib": 79.2, "intra_node_gbps": 300.0,
             "inter_node_gbps": 25.0, "hbm_gbps": 2039.0},
}
# What a GPU holds beyond the estimate: the CUDA context, NCCL's buffers, the caching allocator's fragmentation.
MEMORY_MARGIN = 0.10
# Chinchilla's compute-optimal law (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"),
# approach 3: a fitted loss L(N, D) = E + A / N^alpha + B / D^beta over parameters N and training tokens D,
# minimised under C = 6 N D. The constants are Besiroglu et al.'s (2024, "Chinchilla Scaling: A Replication
# Attempt") re-fit of the paper's data: the paper's own (E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28) imply
# 70-100 tokens per parameter at these budgets, against its approaches 1 and 2 and its 70B model on 1.4T tokens
# (about 20); the re-fit agrees with those.
CHINCHILLA = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
LAYOUT_KEYS = ("parallel.tp", "parallel.pp", "parallel.dp", "parallel.virtual_stages", "parallel.pipeline_schedule",
               "parallel.zero_stage", "parallel.sequence_parallel", "model.recompute", "train.micro_batch_size")


class PlanError(Exception):
    """A configuration or cluster the planner cannot plan for; its problems, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__(format_errors(problems))
        self.problems = problems


def compose(overrides: list[str]) -> Config:
    """The trainer's configuration for `overrides`, composed by Hydra from conf/ as `python -m engine.train` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from engine.train import CONF_DIR, model_vocab_size, to_config

    problems = override_problems(overrides, CONF_DIR)
    if problems:
        raise PlanError(problems)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            config = to_config(hydra_compose(config_name="config", overrides=overrides))
        config.model.vocab_size = model_vocab_size(config)
    except ConfigError as e:
        raise PlanError(e.problems) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise PlanError([str(e).splitlines()[0]]) from None
    config.train.device = "cuda"  # plan for the cluster's GPUs, whatever machine plans (fused AdamW, no host)
    return config


def build_cluster(args: argparse.Namespace, precision: str) -> tuple[Cluster, str]:
    """The cluster of --cluster and the flags overriding it, and a one-line description."""
    preset = PRESETS[args.cluster]
    if args.peak_tflops is None and (preset["device"], precision) not in PEAK_TFLOPS:
        raise PlanError([f"train.precision={precision!r}: no peak is known for it on {preset['label']} (fp32, "
                         "bf16 or fp16), or give --peak-tflops"])
    peak = args.peak_tflops if args.peak_tflops is not None else PEAK_TFLOPS[(preset["device"], precision)]
    values = {"gpus_per_node": args.gpus_per_node}
    for key in ("gpu_memory_gib", "intra_node_gbps", "inter_node_gbps", "hbm_gbps"):  # a flag given wins
        values[key] = getattr(args, key) if getattr(args, key) is not None else preset[key]
    problems = [f"--{k.replace('_', '-')}={v} must be positive" for k, v in
                {**values, "nodes": args.nodes, "peak_tflops": peak, "efficiency": args.efficiency,
                 "comm_efficiency": args.comm_efficiency}.items() if not v > 0]
    problems += [f"--{k.replace('_', '-')}={v} must be at most 1" for k, v in
                 {"efficiency": args.efficiency, "comm_efficiency": args.comm_efficiency}.items() if v > 1]
    if problems:
        raise PlanError(problems)
    cluster = Cluster(name=preset["label"], nodes=args.nodes, peak_tflops=peak, efficiency=args.efficiency,
                      comm_efficiency=args.comm_efficiency, **values)
    label = (f"{cluster.nodes} x {cluster.gpus_per_node} {preset['label']} = {cluster.world} GPUs; per GPU "
             f"{cluster.gpu_memory_gib:g} GiB, {peak:g} TFLOP/s dense {precision} (at {args.efficiency:.0%} "
             f"efficiency), NVLink {cluster.intra_node_gbps:g} GB/s, network {cluster.inter_node_gbps:g} GB/s "
             f"({8 * cluster.inter_node_gbps:g} Gb/s), collectives at {args.comm_efficiency:.0%} of link rate")
    return cluster, label


def layout_overrides(cfg: Config) -> str:
    """The layout keys of `cfg` as the trainer's overrides."""
    p, t = cfg.parallel, cfg.train
    words = [f"parallel.tp={p.tp}", f"parallel.pp={p.pp}", f"parallel.dp={p.dp}"]
    if p.tp > 1:
        words.append(f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}")
    if p.pp > 1:
        words.append(f"parallel.pipeline_schedule={p.pipeline_schedule}")
        if p.virtual_stages > 1:
            words.append(f"parallel.virtual_stages={p.virtual_stages}")
    words += [f"parallel.zero_stage={p.zero_stage}", f"model.recompute={cfg.model.recompute}",
              f"train.micro_batch_size={t.micro_batch_size}"]
    if p.optimizer_offload != "none":
        words.append(f"parallel.optimizer_offload={p.optimizer_offload}")
    return " ".join(words)


def plan(cfg: Config, cluster: Cluster) -> dict:
    """Memory per GPU, whether it fits, the step-time estimate, tokens/s and MFU for one valid configuration."""
    rows = estimate_memory(cfg)
    worst = max(rows, key=lambda r: r["total_bytes"])
    usable = cluster.gpu_memory_gib * (1 - MEMORY_MARGIN) * GIB
    memory = {"model_state": worst["model_state_bytes"][worst["zero_stage"]],
              "parameters": worst["parameters_bytes"], "gradients": worst["gradients_bytes"],
              "optimizer": worst["optimizer_bytes"], "activations": worst["activations_bytes"],
              "working": worst["working_bytes"], "host": worst["host_bytes"], "total": worst["total_bytes"]}
    fits = memory["total"] <= usable
    where = "" if cfg.parallel.pp == 1 else f" on pipeline rank {worst['pp_rank']}"
    return {"overrides": layout_overrides(cfg), "memory_per_gpu_bytes": memory,
            "memory_per_pipeline_rank_bytes": [r["total_bytes"] for r in rows], "usable_memory_bytes": usable,
            "fits": fits, "reason": None if fits else (f"needs {memory['total'] / GIB:.1f} GiB{where}, more than the "
                                                       f"{usable / GIB:.1f} GiB usable"),
            **estimate_step_time(cfg, cluster)}


def report(cfg: Config, cluster: Cluster, label: str, result: dict) -> list[str]:
    """The dry run's lines, then the fit and the step-time estimate, for people."""
    from engine.train import dry_run_lines

    s, total = result, result["step_s"]
    usable = result["usable_memory_bytes"] / GIB

    def share(seconds: float) -> str:
        return f"{seconds:8.3f} s  {seconds / total:6.1%}"

    hidden = 1 - s["dp_exposed_s"] / s["dp_traffic_s"] if s["dp_traffic_s"] else 1.0
    return [
        *dry_run_lines(cfg),
        f"cluster: {label}",
        f"fits: {'yes' if s['fits'] else 'NO'}: {s['memory_per_gpu_bytes']['total'] / GIB:.1f} GiB per GPU at the "
        f"peak, of {usable:.1f} GiB usable ({cluster.gpu_memory_gib:g} GiB less {MEMORY_MARGIN:.0%} for the CUDA "
        "context, NCCL buffers and fragmentation)",
        f"step time (estimate): {total:.3f} s; where it goes, on the pipeline rank that finishes last:",
        f"  compute          {share(s['compute_s'])}   (model FLOPs and recomputation at {cluster.efficiency:.0%} of "
        "peak)",
        f"  TP comm          {share(s['tp_comm_s'])}   (never overlapped: each collective sits between two matmuls)",
        f"  PP messages      {share(s['pp_message_s'])}",
        f"  pipeline bubble  {share(s['pipeline_bubble_s'])}   (simulated from the schedule's own action order)",
        f"  DP/ZeRO comm     {share(s['dp_exposed_s'])}   exposed, of {s['dp_traffic_s']:.3f} s of traffic "
        f"({hidden:.0%} hidden behind computation)",
        f"  optimizer        {share(s['optimizer_s'])}",
        f"throughput: {s['tokens_per_s']:,.0f} tokens/s ({s['tokens_per_s'] / cluster.world:,.0f} per GPU), MFU "
        f"{s['mfu']:.1%}",
        f"as overrides: {s['overrides']}"]


def search_space(base: Config, cluster: Cluster, fixed: set[str]) -> list[Config]:
    """Every layout of the search (module docstring) for `base` on `cluster`, keys in `fixed` kept."""
    m, p, t = base.model, base.parallel, base.train
    world = cluster.world

    def choose(key: str, options: list) -> list:
        section, name = key.split(".")
        return [getattr(getattr(base, section), name)] if key in fixed else options

    def schedules(pp: int) -> list[tuple[str, int]]:
        if pp == 1:
            return [("1f1b", 1)]
        options = [("1f1b", 1)] + [("interleaved_1f1b", v) for v in (2, 4) if not m.num_layers % (pp * v)]
        if "parallel.pipeline_schedule" in fixed:  # held: that schedule, over the chunk counts it takes
            options = [o for o in options if o[0] == p.pipeline_schedule] or [(p.pipeline_schedule, 1)]
        if "parallel.virtual_stages" in fixed:
            options = [("interleaved_1f1b" if p.virtual_stages > 1 else o[0], p.virtual_stages) for o in options]
        return list(dict.fromkeys(options))

    out = []
    for tp in choose("parallel.tp", [tp for tp in (1, 2, 4, 8, 16) if tp <= cluster.gpus_per_node]):
        for pp in choose("parallel.pp", [pp for pp in range(1, m.num_layers + 1) if not m.num_layers % pp]):
            if world % (tp * pp) or ("parallel.dp" in fixed and tp * pp * p.dp != world):
                continue
            dp = world // (tp * pp)
            for (schedule, virtual), zero, recompute, micro, sp in itertools.product(
                    schedules(pp), choose("parallel.zero_stage", [0, 1, 2, 3] if dp > 1 else [0]),
                    choose("model.recompute", ["none", "selective", "full"]),
                    choose("train.micro_batch_size", [1, 2, 4, 8, 16]),
                    choose("parallel.sequence_parallel", [True, False] if tp > 1 else [False])):
                if t.global_batch_size % (micro * dp):
                    continue
                cfg = copy.deepcopy(base)
                q = cfg.parallel
                q.tp, q.pp, q.dp, q.pipeline_schedule, q.virtual_stages = tp, pp, dp, schedule, virtual
                q.zero_stage, q.sequence_parallel = zero, sp
                cfg.model.recompute, cfg.train.micro_batch_size = recompute, micro
                out.append(cfg)
    return out


def search(base: Config, cluster: Cluster, fixed: set[str]) -> dict:
    """Every valid layout planned: the ones that fit ranked by tokens/s, the others apart with their reason."""
    from tqdm import tqdm

    fitting, not_fitting, invalid = [], [], {}
    layouts = search_space(base, cluster, fixed)
    for cfg in tqdm(layouts, desc="planning layouts", unit=" layouts", disable=not sys.stderr.isatty(), leave=False):
        try:
            validate(cfg, cluster.world)
        except ConfigError as e:
            invalid.setdefault(e.problems[0], 0)
            invalid[e.problems[0]] += 1
            continue
        result = plan(cfg, cluster)
        (fitting if result["fits"] else not_fitting).append(result)
    fitting.sort(key=lambda r: -r["tokens_per_s"])
    not_fitting.sort(key=lambda r: -r["tokens_per_s"])
    return {"fits": fitting, "does_not_fit": not_fitting, "invalid": invalid}


def search_report(found: dict, top: int, label: str) -> list[str]:
    """The ranked layouts, the fastest ones that do not fit and why, and what the trainer would refuse."""
    lines = [f"cluster: {label}",
             f"{len(found['fits'])} layout{'s' * (len(found['fits']) != 1)} fit, {len(found['does_not_fit'])} do not, "
             f"{sum(found['invalid'].values())} the trainer would refuse"]

    def row(i: int, r: dict) -> str:
        mem = r["memory_per_gpu_bytes"]["total"] / GIB
        bubble = r["pipeline_bubble_s"] / r["step_s"]
        comm = (r["tp_comm_s"] + r["dp_exposed_s"] + r["pp_message_s"]) / r["step_s"]
        return (f"{i:>3} {r['tokens_per_s']:>12,.0f} {r['mfu']:>6.1%} {r['step_s']:>8.3f} {mem:>7.1f} "
                f"{bubble:>7.1%} {comm:>6.1%}  {r['overrides']}")

    head = f"{'#':>3} {'tokens/s':>12} {'MFU':>6} {'step s':>8} {'GiB':>7} {'bubble':>7} {'comm':>6}  layout"
    lines += ["", f"fastest that fit (of {len(found['fits'])}):", head]
    lines += [row(i + 1, r) for i, r in enumerate(found["fits"][:top])]
    if found["does_not_fit"]:
        lines += ["", f"faster, or as fast, but do not fit (of {len(found['does_not_fit'])}):"]
        best = found["fits"][0]["tokens_per_s"] if found["fits"] else 0.0
        faster = [r for r in found["does_not_fit"] if r["tokens_per_s"] >= best][:top]
        lines += [f"  {r['tokens_per_s']:>12,.0f} tokens/s: {r['reason']}: {r['overrides']}" for r in faster]
        if not faster:
            lines.append("  none: every faster layout fits")
    if found["invalid"]:
        lines += ["", "refused by the trainer's validation (count, first reason):"]
        lines += [f"  {n:>5}  {reason}" for reason, n in sorted(found["invalid"].items(), key=lambda kv: -kv[1])]
    lines.append("(comm = exposed TP, PP and DP/ZeRO communication; GiB = the peak on the fullest GPU)")
    return lines


def compute_optimal(gpu_hours: float, cluster: Cluster, mfu: float) -> dict:
    """Chinchilla's compute-optimal parameters and tokens for `gpu_hours` at `mfu` of the cluster's peak."""
    c = CHINCHILLA
    compute = gpu_hours * 3600 * cluster.peak_tflops * 1e12 * mfu
    a, b = c["beta"] / (c["alpha"] + c["beta"]), c["alpha"] / (c["alpha"] + c["beta"])
    g = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / (c["alpha"] + c["beta"]))
    n, d = g * (compute / 6) ** a, (compute / 6) ** b / g
    return {"compute_flops": compute, "parameters": n, "tokens": d,
            "loss": c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"], "tokens_per_parameter": d / n}


def llama_shape(parameters: float, vocab: int) -> dict:
    """A Llama shape (untied, no GQA, head size 128, hidden about 128 x layers as Llama 2 7B/13B have it, in whole
    multiples of 8 heads from 2048 on, so tensor parallelism up to 8 divides them) whose parameter count is nearest
    `parameters`."""
    best = None
    for layers in range(2, 161):
        step = 1024 if 128 * layers >= 2048 else 256
        hidden = max(256, step * round(128 * layers / step))
        ffn = 256 * math.ceil(8 * hidden / 3 / 256)
        n = layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + 2 * vocab * hidden + hidden
        if best is None or abs(n - parameters) < abs(best["parameters"] - parameters):
            best = {"num_layers": layers, "hidden_size": hidden, "num_heads": hidden // 128,
                    "num_kv_heads": hidden // 128, "ffn_hidden_size": ffn, "parameters": n}
    return best


def budget_report(gpu_hours: float, cluster: Cluster, mfu: float, cfg: Config) -> tuple[dict, list[str]]:
    """--budget: the compute-optimal size and tokens, a shape near it, and its steps at this run's batch."""
    opt = compute_optimal(gpu_hours, cluster, mfu)
    shape = llama_shape(opt["parameters"], cfg.model.vocab_size)
    t = cfg.train
    steps = math.ceil(opt["tokens"] / (t.global_batch_size * t.seq_len))
    c = CHINCHILLA
    overrides = (f"model=llama_1b model.name=llama_{shape['parameters'] / 1e9:.1f}b model.num_layers="
                 f"{shape['num_layers']} model.hidden_size={shape['hidden_size']} model.num_heads="
                 f"{shape['num_heads']} model.num_kv_heads={shape['num_kv_heads']} model.ffn_hidden_size="
                 f"{shape['ffn_hidden_size']} model.vocab_size={cfg.model.vocab_size} train.steps={steps} "
                 f"train.seq_len={t.seq_len} train.global_batch_size={t.global_batch_size} "
                 f"train.precision={t.precision}")
    lines = [f"budget: {gpu_hours:,.0f} GPU-hours on {cluster.name} at {mfu:.0%} MFU of {cluster.peak_tflops:g} "
             f"TFLOP/s ({t.precision}) = {opt['compute_flops']:.3g} training FLOPs",
             f"compute-optimal by Chinchilla (Hoffmann et al. 2022), approach 3 as re-fitted by Besiroglu et al. "
             f"2024: L(N, D) = {c['E']} + {c['A']} / N^{c['alpha']} + {c['B']} / D^{c['beta']}, C = 6 N D:",
             f"  {opt['parameters'] / 1e9:.2f}B parameters, {opt['tokens'] / 1e9:.1f}B tokens "
             f"({opt['tokens_per_parameter']:.1f} tokens per parameter), fitted loss {opt['loss']:.2f} (MassiveText "
             "and the paper's tokenizer: compare sizes, not losses)",
             f"  a Llama shape near it ({shape['parameters'] / 1e9:.2f}B): {shape['num_layers']} layers, hidden "
             f"{shape['hidden_size']}, {shape['num_heads']} heads, ffn {shape['ffn_hidden_size']}; "
             f"{steps:,} steps of {t.global_batch_size} x {t.seq_len} tokens",
             f"  as overrides: {overrides}",
             "  then plan its layout: python tools/plan.py <those overrides> --search"]
    return {**opt, "shape": shape, "steps": steps, "overrides": overrides}, lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: the trainer's overrides, before or after the flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*",
                        help="the trainer's overrides: model=..., parallel.*, train.* (model.vocab_size, or a "
                             "data.tokenizer on disk to read it from)")
    parser.add_argument("--cluster", choices=sorted(PRESETS), default="h100", help="node preset (default h100)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory, GiB (default: the preset's)")
    parser.add_argument("--peak-tflops", type=float,
                        help="dense peak TFLOP/s per GPU at train.precision (default: the preset's)")
    parser.add_argument("--intra-node-gbps", type=float, help="NVLink GB/s per GPU and direction (default: preset)")
    parser.add_argument("--inter-node-gbps", type=float,
                        help="network GB/s (bytes, not bits) per GPU and direction (default: preset; 50 = 400 Gb/s)")
    parser.add_argument("--hbm-gbps", type=float, help="GPU memory bandwidth, GB/s (default: the preset's)")
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="achieved / peak FLOP/s of the model's computation (default 0.5)")
    parser.add_argument("--comm-efficiency", type=float, default=0.8,
                        help="achieved / nominal bandwidth of collectives (default 0.8)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--search", action="store_true", help="rank every valid layout by estimated tokens/s")
    parser.add_argument("--top", type=int, default=12, help="--search: layouts shown (default 12)")
    mode.add_argument("--budget", type=float, metavar="GPU_HOURS",
                      help="suggest a compute-optimal model size and token count for this many GPU-hours")
    parser.add_argument("--mfu", type=float, default=0.4, help="--budget: the MFU the budget buys (default 0.4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_intermixed_args(argv)  # overrides before and after the flags


def main(argv: list[str] | None = None) -> int:
    """Plan, search or budget; print text or JSON. Returns the exit code: 0, or 2 for a plan it cannot make."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.top < 1:
            raise PlanError([f"--top={args.top} must be at least 1"])
        cfg = compose(args.overrides)
        cluster, label = build_cluster(args, cfg.train.precision)
        fill_defaults(cfg, cluster.world, cfg.model.vocab_size)
        if args.budget is not None:
            if not args.budget > 0 or not 0 < args.mfu <= 1:
                raise PlanError([f"--budget={args.budget} must be positive and --mfu={args.mfu} in (0, 1]"])
            out, lines = budget_report(args.budget, cluster, args.mfu, cfg)
        elif args.search:
            fixed = {a.split("=", 1)[0].lstrip("+") for a in args.overrides if "=" in a} & set(LAYOUT_KEYS)
            found = search(cfg, cluster, fixed)
            if not found["fits"] and not found["does_not_fit"]:
                reasons = list(found["invalid"]) or [
                    f"no layout of the search fits {cluster.world} GPUs with the keys held "
                    f"({', '.join(sorted(fixed)) or 'none'}) and train.global_batch_size={cfg.train.global_batch_size}"]
                raise PlanError(["no valid layout to rank; the trainer would refuse every one:", *reasons])
            out = {"model": model_summary(cfg), "cluster": asdict(cluster), **found}
            lines = [*model_lines(cfg), *search_report(found, args.top, label)]
        else:
            try:
                validate(cfg, cluster.world)
            except ConfigError as e:
                raise PlanError(e.problems) from None
            result = plan(cfg, cluster)
            out = {"model": model_summary(cfg), "cluster": asdict(cluster), **result}
            lines = report(cfg, cluster, label, result)
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(out, indent=1) if args.json else "\n".join(lines))
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        sys.stderr.close()
    return 0


def model_summary(cfg: Config) -> dict:
    """The model's name, parameters and training FLOPs per token."""
    return {"name": cfg.model.name, "parameters": count_parameters(cfg.model),
            "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len), "seq_len": cfg.train.seq_len,
            "global_batch_size": cfg.train.global_batch_size, "precision": cfg.train.precision}


def model_lines(cfg: Config) -> list[str]:
    """The model and batch --search plans for."""
    s = model_summary(cfg)
    return [f"model {s['name']}: {s['parameters']:,} parameters, {s['flops_per_token']:.4g} FLOPs per token at "
            f"seq_len {s['seq_len']}; global batch {s['global_batch_size']} x {s['seq_len']} tokens, {s['precision']}"]


if __name__ == "__main__":
    sys.exit(main())
