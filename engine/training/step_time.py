"""A step-time model for the planner (tools/plan.py): compute at a stated efficiency, plus the communication our
parallel layers issue, from its bytes and the links' bandwidth, minus what overlaps.

Communication is counted from the code, collective by collective, per micro-batch and per step on each rank
(`transfers`); tests/test_plan_memory.py holds the counts against the bytes the real Trainer hands to
torch.distributed. A transfer's payload is the whole tensor: the one all-reduced, the all-gather's output, the
reduce-scatter's input, the message sent. On the wire each rank moves, for a group of n (ring algorithms):

    all-reduce  2 (n - 1) / n x payload     all-gather, reduce-scatter  (n - 1) / n x payload     send  payload

at the group's bandwidth: NVLink when the group's ranks share a node (tensor parallelism innermost, then data, then
pipeline: engine.parallel.state), else the network's per-GPU share; plus a latency per collective.

    tensor parallel  per layer and micro-batch: 2 all-reduces forward (attention and MLP outputs) and 2 backward
                     (their inputs' gradients), of b·s·h values; under SP an all-gather and a reduce-scatter each
                     instead, the same bytes. Full recomputation repeats the forward's in backward, but for the MLP's
                     exit (torch's checkpoint stops before it). The embedding and the head
                     add one each way, the vocabulary-parallel loss three (b·s,)-sized all-reduces. Never hidden:
                     our layers wait for each one before the next matmul.
    pipeline         per micro-batch and stage boundary, the activation forward and its gradient back, b·s·h
                     values (b·s·h / t under SP); the exchange blocks, so a message costs both sides its time.
                     The bubble comes from running each rank's own schedule (engine.training.schedule) as a
                     dependency graph of forward and backward actions of the modelled durations (`simulate`).
    data parallel    ZeRO 0: all-reduce of the gradients once per step, launched bucket by bucket during the last
                     micro-batch's backward; ZeRO 1: a reduce-scatter there instead, and an all-gather of the
                     updated parameters after the optimizer; ZeRO 2: the reduce-scatter every micro-batch, hidden
                     behind that micro-batch's backward (and the next one's forward, where the forward's own
                     traffic leaves room), the all-gather after the optimizer as 1; ZeRO 3: the reduce-scatter as
                     2, no gather after the step, but all-gathers of the parameters before each part's forward and
                     again for its backward, prefetched one part ahead. What the overlapped computation cannot
                     cover is exposed, and at least the last bucket (or the first part's gather) always is; on a
                     cluster without overlap (a CPU, whose cores run gloo too) all of it is.

Compute: the model FLOPs of engine.model.flops, with the causal attention's skipped half left out (a fused kernel
skips it) and recomputation's extra forward added, at `efficiency` x the device's dense peak. The optimizer step is
memory-bound: AdamW reads and writes the parameters' fp32 copies, gradients and two moments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.config import Config, micro_batches_per_step
from engine.model.flops import attention_flops_per_token, flops_per_token, matmul_weights_per_layer
from engine.parallel.layers import padded_vocab_size, vocab_parallel_loss
from engine.parallel.pipeline import rank_stages, stage_layers
from engine.training.memory import chunk_parameters, value_sizes
from engine.training.schedule import schedule_actions

F32 = 4
# AdamW's bytes of memory traffic per updated parameter: fp32 parameter, gradient and two moments read, parameter
# and moments written (7 x 4), plus the 16-bit gradient read and parameter written beside fp32 master weights.
OPTIMIZER_BYTES = {False: 28, True: 32}


@dataclass(frozen=True)
class Cluster:
    """The machines a plan runs on: per GPU, its memory, dense peak, links' bandwidths and the efficiencies the
    estimate assumes. Bandwidths are GB/s (10^9 bytes) per GPU and direction."""

    name: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    peak_tflops: float  # dense, at the run's precision
    intra_node_gbps: float  # NVLink (or the host, on CPU)
    inter_node_gbps: float  # the network: one GPU's share of its node's NICs
    hbm_gbps: float  # device memory bandwidth (the optimizer step)
    host_gbps: float = 20.0  # host memory bandwidth per GPU (an offloaded optimizer steps there)
    pcie_gbps: float = 25.0  # host <-> device copies of an offloaded optimizer's gradients and parameters
    efficiency: float = 0.5  # achieved / peak FLOP/s of the model's computation
    comm_efficiency: float = 0.8  # achieved / nominal bandwidth of collectives
    latency_us: float = 10.0  # per collective inside a node; twice that across nodes
    # Whether asynchronous collectives run beside the computation: on GPUs NCCL's kernels take a few SMs and the
    # copy engines; on a CPU gloo's threads need the very cores that compute, so nothing is hidden.
    overlap: bool = True

    @property
    def world(self) -> int:
        """GPUs in the cluster."""
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Transfer:
    """One collective or message of a rank, `count` times per step."""

    group: str  # tp | pp | dp | embedding
    op: str  # all_reduce | all_gather | reduce_scatter | send
    payload: float  # bytes of the whole tensor
    count: int
    phase: str  # forward | backward | step (after the pipeline: reductions, the optimizer's gathers)
    stage: int | None = None  # the pipeline stage it belongs to (None: the rank's, whole step)

    def wire_bytes(self, n: int) -> float:
        """Bytes one rank moves for one of them in a group of `n` (ring algorithms)."""
        if self.op == "send":
            return self.payload
        share = (n - 1) / n if n > 1 else 0.0
        return (2 * share if self.op == "all_reduce" else share) * self.payload


def group_sizes(cfg: Config) -> dict[str, int]:
    """Ranks in each kind of group."""
    p = cfg.parallel
    return {"tp": p.tp, "dp": p.dp or 1, "pp": p.pp, "embedding": 2}


def _group_span(cfg: Config, group: str) -> int:
    """Consecutive global ranks one group of this kind spans (tp innermost, pp outermost)."""
    p = cfg.parallel
    return {"tp": p.tp, "dp": p.tp * (p.dp or 1), "pp": p.tp * (p.dp or 1) * p.pp,
            "embedding": p.tp * (p.dp or 1) * p.pp}[group]


def _grad_reduce_bytes(cfg: Config) -> int:
    """Bytes per gradient value on the data-parallel wire: fp32 without ZeRO, else parallel.grad_reduce_dtype's."""
    p = cfg.parallel
    return F32 if p.zero_stage == 0 or p.grad_reduce_dtype == "fp32" else 2


def _zero_shards(cfg: Config) -> int:
    """How many pieces ZeRO cuts a rank's gradients and optimizer states into (1 without ZeRO)."""
    return (cfg.parallel.dp or 1) if cfg.parallel.zero_stage else 1


def _tp_layer_transfers(cfg: Config, stage: int, layers: int) -> list[Transfer]:
    """Tensor-parallel collectives of `layers` layers of one stage, per micro-batch."""
    p = cfg.parallel
    if p.tp == 1 or layers == 0:
        return []
    residual, mm = value_sizes(cfg)
    values = cfg.train.seq_len * cfg.train.micro_batch_size * cfg.model.hidden_size
    enter, leave = values * residual, values * mm  # a region's input (the norm's output) and its partial sums
    # Full recomputation runs each layer's forward again, in backward, but torch's checkpoint stops once the last
    # tensor backward needs is rebuilt (the MLP's down-projection input): the MLP's exit is not recomputed.
    again = cfg.model.recompute == "full"
    if p.sequence_parallel:  # enter: all-gather forward, reduce-scatter back; leave: reduce-scatter forward, back
        out = [Transfer("tp", "all_gather", enter, 2 * layers, "forward", stage),
               Transfer("tp", "reduce_scatter", leave, 2 * layers, "forward", stage),
               Transfer("tp", "reduce_scatter", enter, 2 * layers, "backward", stage),
               Transfer("tp", "all_gather", leave, 2 * layers, "backward", stage)]
        recomputed = [Transfer("tp", "all_gather", enter, 2 * layers, "backward", stage),
                      Transfer("tp", "reduce_scatter", leave, layers, "backward", stage)]
    else:
        out = [Transfer("tp", "all_reduce", leave, 2 * layers, "forward", stage),
               Transfer("tp", "all_reduce", enter, 2 * layers, "backward", stage)]
        recomputed = [Transfer("tp", "all_reduce", leave, layers, "backward", stage)]
    return out + (recomputed if again else [])


def _tp_partial_transfers(cfg: Config, stage: int, layers: int, stages: int) -> list[Transfer]:
    """The step's sum over the TP group of replicated parameters' partial gradients (engine.parallel.grads): under
    SP the norms, row-parallel biases and GPT-2's positions (each rank saw its sequence chunk); K/V projections
    replicated over more ranks than heads (each rank's query heads used them)."""
    p, m = cfg.parallel, cfg.model
    if p.tp == 1:
        return []
    h, gpt2 = m.hidden_size, m.arch == "gpt2"
    values = 0
    if p.sequence_parallel:
        norm = 2 * h if gpt2 else h
        values += layers * (2 * norm + (2 * h if gpt2 else 0)) + (norm if stage == stages - 1 else 0)
        values += m.max_seq_len * h if gpt2 and stage == 0 else 0
    if m.num_kv_heads % p.tp:
        kv = m.num_kv_heads * (h // m.num_heads)
        values += layers * 2 * (h * kv + (kv if gpt2 else 0))
    if not values:
        return []
    # ZeRO completes them on the gradient shards
    return [Transfer("tp", "all_reduce", -(-values // _zero_shards(cfg)) * F32, 1, "step", stage)]


def _tp_ends_transfers(cfg: Config, stage: int, stages: int) -> list[Transfer]:
    """Tensor-parallel collectives of the embedding (first stage) and the head and loss (last), per micro-batch."""
    p, m = cfg.parallel, cfg.model
    if p.tp == 1:
        return []
    residual, _ = value_sizes(cfg)
    rows = cfg.train.seq_len * cfg.train.micro_batch_size
    values = rows * m.hidden_size * residual
    out = []
    if stage == 0:  # the embedding's partial lookups leave the TP region
        out += ([Transfer("tp", "reduce_scatter", values, 1, "forward", stage),
                 Transfer("tp", "all_gather", values, 1, "backward", stage)] if p.sequence_parallel else
                [Transfer("tp", "all_reduce", values, 1, "forward", stage)])
    if stage == stages - 1:  # the head's input enters one
        out += ([Transfer("tp", "all_gather", values, 1, "forward", stage),
                 Transfer("tp", "reduce_scatter", values, 1, "backward", stage)] if p.sequence_parallel else
                [Transfer("tp", "all_reduce", values, 1, "backward", stage)])
        if vocab_parallel_loss(m.vocab_size, p.tp, m.make_vocab_size_divisible_by):
            out.append(Transfer("tp", "all_reduce", rows * F32, 3, "forward", stage))  # max, sum, target logit
    return out


def _pp_transfers(cfg: Config, stage: int, stages: int) -> list[Transfer]:
    """Pipeline messages one stage sends per micro-batch: its activation on, its input's gradient back."""
    p = cfg.parallel
    residual, _ = value_sizes(cfg)
    rows = cfg.train.seq_len * cfg.train.micro_batch_size
    chunk = rows // p.tp if p.sequence_parallel and p.tp > 1 else rows
    values = chunk * cfg.model.hidden_size * residual
    return ([Transfer("pp", "send", values, 1, "forward", stage)] if stage < stages - 1 else []) + \
        ([Transfer("pp", "send", values, 1, "backward", stage)] if stage > 0 else [])


def _dp_transfers(cfg: Config, pp_rank: int) -> list[Transfer]:
    """Data-parallel (ZeRO) and tied-embedding collectives of one pipeline rank's model chunks, per step."""
    p, m = cfg.parallel, cfg.model
    micro = micro_batches_per_step(cfg)
    stages = p.pp * p.virtual_stages
    out = []
    residual, _ = value_sizes(cfg)
    for stage in rank_stages(pp_rank, p.pp, p.virtual_stages):
        params = chunk_parameters(cfg, stage)
        if (p.dp or 1) > 1:
            grads = params * _grad_reduce_bytes(cfg)
            if p.zero_stage == 0:
                out.append(Transfer("dp", "all_reduce", grads, 1, "backward", stage))
            elif p.zero_stage == 1:
                out.append(Transfer("dp", "reduce_scatter", grads, 1, "backward", stage))
            else:
                out.append(Transfer("dp", "reduce_scatter", grads, micro, "backward", stage))
            if p.zero_stage in (1, 2):
                out.append(Transfer("dp", "all_gather", params * residual, 1, "step", stage))
            if p.zero_stage == 3:
                out += [Transfer("dp", "all_gather", params * residual, micro, "forward", stage),
                        Transfer("dp", "all_gather", params * residual, micro, "backward", stage)]
        tied_copy = m.tie_embeddings and p.pp > 1 and stage in (0, stages - 1)
        if tied_copy:  # the first and last stage sum their copies' gradients (under ZeRO: the shards)
            vocab = padded_vocab_size(m.vocab_size, p.tp, m.make_vocab_size_divisible_by) // p.tp
            out.append(Transfer("embedding", "all_reduce", -(-vocab * m.hidden_size // _zero_shards(cfg)) * F32, 1,
                                "step", stage))
    return out


def transfers(cfg: Config) -> list[list[Transfer]]:
    """Per pipeline rank, every collective and message it takes part in during one training step (scalars, such
    as the loss and the gradient norm, left out)."""
    p = cfg.parallel
    stages = p.pp * p.virtual_stages
    layers = stage_layers(cfg.model.num_layers, stages, p.pipeline_layers)
    micro = micro_batches_per_step(cfg)
    out = []
    for r in range(p.pp):
        mine = []
        for stage in rank_stages(r, p.pp, p.virtual_stages):
            per_micro = (_tp_layer_transfers(cfg, stage, len(layers[stage])) + _tp_ends_transfers(cfg, stage, stages)
                         + _pp_transfers(cfg, stage, stages))
            mine += [replace(t, count=t.count * micro) for t in per_micro]
            mine += _tp_partial_transfers(cfg, stage, len(layers[stage]), stages)
        out.append(mine + _dp_transfers(cfg, r))
    return out


def bytes_per_step(cfg: Config) -> list[dict[str, dict[str, float]]]:
    """Per pipeline rank, the payload bytes per step by group and operation (`transfers` summed)."""
    out = []
    for mine in transfers(cfg):
        total: dict[str, dict[str, float]] = {}
        for t in mine:
            total.setdefault(t.group, {}).setdefault(t.op, 0.0)
            total[t.group][t.op] += t.payload * t.count
        out.append(total)
    return out


def transfer_seconds(cfg: Config, cluster: Cluster, t: Transfer, count: int | None = None) -> float:
    """Seconds `count` (default: all) of transfer `t` take on `cluster`'s links."""
    n = group_sizes(cfg)[t.group]
    inside = _group_span(cfg, t.group) <= cluster.gpus_per_node
    gbps = cluster.intra_node_gbps if inside else cluster.inter_node_gbps
    latency = cluster.latency_us * 1e-6 * (1 if inside else 2)
    count = t.count if count is None else count
    return count * (latency + t.wire_bytes(n) / (gbps * 1e9 * cluster.comm_efficiency))


def _stage_flops(cfg: Config, stage: int, layers: int, stages: int) -> tuple[float, float]:
    """(forward, backward) FLOPs one tensor-parallel rank of `stage` executes per micro-batch: matmuls at 2 FLOPs
    per weight and token forward, 4 backward; causal attention at half of flops_per_token's full-square count;
    the head on the last stage; recomputation's second forward in backward."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    tokens = t.seq_len * t.micro_batch_size
    attention = attention_flops_per_token(m, t.seq_len) / 2 / 3  # forward, causal half
    layer_fwd = (2 * matmul_weights_per_layer(m) + attention) * tokens / p.tp
    fwd = layers * layer_fwd
    bwd = 2 * fwd
    if m.recompute == "full":  # the forward again, up to the MLP's down projection (see _tp_layer_transfers)
        bwd += fwd - layers * 2 * m.hidden_size * m.ffn_hidden_size * tokens / p.tp
    elif m.recompute == "selective":
        bwd += layers * attention * tokens / p.tp
    if stage == stages - 1:
        head = 2 * padded_vocab_size(m.vocab_size, p.tp, m.make_vocab_size_divisible_by) / p.tp * m.hidden_size
        fwd, bwd = fwd + head * tokens, bwd + 2 * head * tokens
    return fwd, bwd


def simulate(cfg: Config, forward_s: list[float], backward_s: list[float], message_s: float) -> dict:
    """Run every pipeline rank's schedule (engine.training.schedule) as a dependency graph: a forward of stage s
    waits for stage s - 1's forward of that micro-batch and its message; a backward for stage s + 1's backward
    (the last stage: its own forward); each rank runs its actions in order, one at a time, and a message costs its
    sender `message_s` too (the exchange blocks). Returns, per rank, when it finishes, and the seconds it spends
    computing and sending."""
    p = cfg.parallel
    stages = p.pp * p.virtual_stages
    actions = [schedule_actions(p.pipeline_schedule, micro_batches_per_step(cfg), p.pp, r, p.virtual_stages)
               for r in range(p.pp)]
    done: dict[tuple[str, int, int], float] = {}
    position, free = [0] * p.pp, [0.0] * p.pp
    busy, sending = [0.0] * p.pp, [0.0] * p.pp
    progressed = True
    while progressed:
        progressed = False
        for r in range(p.pp):
            while position[r] < len(actions[r]):
                a = actions[r][position[r]]
                s = a.chunk * p.pp + r
                if a.kind == "F":
                    need = ("F", a.micro, s - 1) if s > 0 else None
                    length, sends = forward_s[s], s < stages - 1
                else:
                    need = ("B", a.micro, s + 1) if s < stages - 1 else ("F", a.micro, s)
                    length, sends = backward_s[s], s > 0
                if need is not None and need not in done:
                    break  # waits for another rank
                start = max(free[r], done[need] if need is not None else 0.0)
                message = message_s if sends else 0.0
                free[r] = start + length + message
                busy[r] += length
                sending[r] += message
                done[(a.kind, a.micro, s)] = free[r]
                position[r] += 1
                progressed = True
    if any(position[r] < len(actions[r]) for r in range(p.pp)):
        raise RuntimeError("pipeline schedule simulation deadlocked")  # a schedule whose dependencies cycle
    return {"finish_s": free, "busy_s": busy, "sending_s": sending}


def _exposed(total: float, window: float, floor: float, overlap: bool = True) -> float:
    """What of `total` seconds of asynchronous communication is not hidden behind `window` seconds of compute;
    at least `floor` (the part launched after the compute ends); all of it without `overlap`."""
    return max(total - window, min(floor, total)) if overlap else total


def estimate_step_time(cfg: Config, cluster: Cluster) -> dict:
    """Seconds per training step on `cluster` and where they go, tokens per second and MFU (the module docstring
    has the model). The parts are those of the pipeline rank that finishes its schedule last, then of the rank
    whose optimizer step (with the collectives around it) takes longest; they add up to `step_s`, the bubble being
    that rank's waiting."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    stages = p.pp * p.virtual_stages
    layers = stage_layers(m.num_layers, stages, p.pipeline_layers)
    micro = micro_batches_per_step(cfg)
    rate = cluster.peak_tflops * 1e12 * cluster.efficiency
    flops = [_stage_flops(cfg, s, len(layers[s]), stages) for s in range(stages)]
    forward_s, backward_s = [f / rate for f, _ in flops], [b / rate for _, b in flops]
    per_rank = transfers(cfg)
    zeros = [0.0] * p.pp
    message_s, tp_in, tp_step, dp_in, dp_step, dp_traffic, after = 0.0, *([*zeros] for _ in range(6))
    for r, mine in enumerate(per_rank):
        for tr in mine:
            if tr.group == "tp" and tr.phase == "step":
                tp_step[r] += transfer_seconds(cfg, cluster, tr)
            elif tr.group == "tp":  # never overlapped: on the stage's critical path
                one = transfer_seconds(cfg, cluster, tr, tr.count // micro)
                (forward_s if tr.phase == "forward" else backward_s)[tr.stage] += one
                tp_in[r] += one * micro
            elif tr.group == "pp":
                message_s = max(message_s, transfer_seconds(cfg, cluster, tr, 1))
    window_f, window_b = list(forward_s), list(backward_s)  # compute and TP: what DP traffic can hide behind
    grad_bytes = _grad_reduce_bytes(cfg)
    for r, mine in enumerate(per_rank):
        for s in rank_stages(r, p.pp, p.virtual_stages):
            params = chunk_parameters(cfg, s)
            # The share of the gradients in the bucket that fills last: reduced only once backward has ended.
            last_share = min(1.0, p.bucket_size_mb * 2**20 / max(params * grad_bytes, 1))
            one = {"forward": 0.0, "backward": 0.0}  # ZeRO 2/3's traffic per micro-batch
            for tr in mine:
                if tr.group not in ("dp", "embedding") or tr.stage != s:
                    continue
                seconds = transfer_seconds(cfg, cluster, tr)
                if tr.phase == "step":  # after the optimizer (gathers) or before it (tied embedding sums)
                    dp_step[r] += seconds
                    continue
                dp_traffic[r] += seconds
                if p.zero_stage >= 2:  # every micro-batch, inside the schedule
                    one[tr.phase] += seconds / micro
                else:  # once per step, during the chunk's last backward
                    exposed = _exposed(seconds, window_b[s], seconds * last_share, cluster.overlap)
                    after[r] += exposed
                    dp_in[r] += exposed
            # Stage 3 gathers a part ahead of its forward (the first part's cannot be); the backward's traffic
            # runs behind that backward and, but on the last micro-batch, the forward time the next one's
            # gathers leave free.
            fwd, bwd = one["forward"], one["backward"]
            exposed_f = _exposed(fwd, window_f[s], fwd / (len(layers[s]) + 2), cluster.overlap)
            spare = max(0.0, window_f[s] - fwd)
            exposed_b = ((micro - 1) * _exposed(bwd, window_b[s] + spare, bwd * last_share, cluster.overlap)
                         + _exposed(bwd, window_b[s], bwd * last_share, cluster.overlap)) / micro
            forward_s[s] += exposed_f
            backward_s[s] += exposed_b
            dp_in[r] += (exposed_f + exposed_b) * micro
    sim = simulate(cfg, forward_s, backward_s, message_s)
    ends = [sim["finish_s"][r] + after[r] for r in range(p.pp)]
    optimizer_s = [_optimizer_seconds(cfg, cluster, r) for r in range(p.pp)]
    tails = [optimizer_s[r] + tp_step[r] + dp_step[r] for r in range(p.pp)]
    last = max(range(p.pp), key=lambda r: ends[r])  # the rank the step waits for, then the slowest tail
    tail = max(range(p.pp), key=lambda r: tails[r])
    step_s = ends[last] + tails[tail]
    compute_s = sum(sum(flops[s]) for s in rank_stages(last, p.pp, p.virtual_stages)) * micro / rate
    pipeline_bubble_s = ends[last] - compute_s - tp_in[last] - sim["sending_s"][last] - dp_in[last]
    tokens_per_s = t.global_batch_size * t.seq_len / step_s
    world = p.tp * p.pp * (p.dp or 1)
    return {"step_s": step_s, "compute_s": compute_s, "tp_comm_s": tp_in[last] + tp_step[tail],
            "pp_message_s": sim["sending_s"][last], "pipeline_bubble_s": max(0.0, pipeline_bubble_s),
            "dp_traffic_s": dp_traffic[last] + dp_step[tail], "dp_exposed_s": dp_in[last] + dp_step[tail],
            "optimizer_s": optimizer_s[tail], "tokens_per_s": tokens_per_s,
            "mfu": flops_per_token(m, t.seq_len) * tokens_per_s / (world * cluster.peak_tflops * 1e12)}


def _optimizer_seconds(cfg: Config, cluster: Cluster, pp_rank: int) -> float:
    """AdamW over the parameters this rank updates, memory-bound: on the GPU, or for an offloaded optimizer on the
    host, plus the copies of gradients down and parameters up."""
    p = cfg.parallel
    params = sum(chunk_parameters(cfg, s) for s in rank_stages(pp_rank, p.pp, p.virtual_stages))
    shard = params / _zero_shards(cfg)
    residual, _ = value_sizes(cfg)  # the model's parameters: 16-bit under ZeRO with bf16/fp16, beside fp32 masters
    traffic = shard * OPTIMIZER_BYTES[residual != F32]
    if p.optimizer_offload == "cpu":
        copies = shard * (residual + F32)
        return traffic / (cluster.host_gbps * 1e9) + copies / (cluster.pcie_gbps * 1e9)
    return traffic / (cluster.hbm_gbps * 1e9)
