"""Checkpoints: sharded, atomic, resumable, and safe to load whatever their origin.

Layout under `run_dir/checkpoints/`:

    latest                                  the newest complete step directory's name (replaced atomically)
    step_00000100/
        meta.json                           step, samples consumed, loss scaler, layout, W&B
                                            run id, the resolved config, and every file's size (written last)
        model-pp00-tp00.safetensors         parameters of one (pipeline stage, tensor rank)
        tokenizer.json                      the run's tokenizer (absent for the built-in byte tokenizer)
        optimizer-pp00-tp00.safetensors     AdamW moments and step counts of the same parameters, by name
        rng-rank00000.safetensors           each rank's torch generator states (CPU and CUDA)

    under ZeRO (parallel.zero_stage >= 1), instead of the model and optimizer files, every data-parallel rank's own:
        model-pp00-tp00-dp00.safetensors    its shard's fp32 master weights, as flat pieces of the parameters
        optimizer-pp00-tp00-dp00.safetensors  the AdamW moments of the same elements

A step is written into `.tmp-step_...` by every rank, then renamed when whole; `latest` changes last, so a crash
mid-save leaves the previous checkpoint and `latest` as they were. Tensors go through safetensors and everything
else through JSON: loading never unpickles anything. Data-parallel replicas hold the same model and optimizer,
so only data-parallel rank 0 writes those; under ZeRO each rank writes its shard and nothing is gathered. A run may
resume in another layout (TP, PP, DP size, ZeRO stage): the weights and optimizer moments are read into this run's
split (`engine.training.reshard`), and the sample stream does not depend on the data-parallel size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.parallel.layers import is_tied_copy
from engine.parallel.mappings import tp_rank, tp_size
from engine.parallel.state import ParallelState
from engine.parallel.zero import ZeroOptimizer
from engine.training.reshard import (
    ZERO_METADATA,
    CheckpointError,
    CheckpointTensors,
    TensorSource,
    checkpoint_name,
    copy_parameters,
    local_part,
    matching_parameters,
    read_whole,
    tp_layout,
)

# 2: pipeline stages' files (names global, a tied embedding's copy not saved), no optimizer_groups in meta.json.
# 1 (before pipelines) reads the same way. 3: ZeRO's per-DP-rank files (only ZeRO runs write it, so that a
# replicated run's checkpoints stay readable by versions that know 2).
FORMAT_VERSION = 2
ZERO_FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    """`step_00000100` for step 100."""
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The step directory `latest` names, or None when the run has no checkpoint yet.

    If `latest` names a missing or damaged step (deleted by hand, a disk problem), the newest complete one is used
    instead, with a warning.
    """
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    try:
        read_meta(path)
        return path
    except CheckpointError as e:
        problem = e
    candidates = sorted((d for d in root.iterdir() if STEP_DIR.match(d.name)), reverse=True)
    for candidate in candidates:
        try:
            read_meta(candidate)
        except CheckpointError:
            continue
        print(f"warning: {pointer} names an unusable checkpoint ({problem}); using {candidate.name}, the newest "
              "complete one", file=sys.stderr)
        return candidate
    raise CheckpointError(f"{pointer}: {problem}; and no other complete checkpoint in {root}")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory as given, or a run directory's (or its checkpoints directory's) latest checkpoint."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    for run_dir in (p, p.parent):
        if (checkpoints_dir(run_dir) / "latest").exists():
            latest = latest_checkpoint(run_dir)
            if latest is not None:
                return latest
    raise CheckpointError(f"{p}: not a checkpoint (no meta.json) and no checkpoints/latest under it")


def _shard_tag(state: ParallelState) -> str:
    c = state.coords()
    return f"pp{c.pp:02d}-tp{c.tp:02d}"


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1:
        dist.barrier()


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter id -> saved name, tied parameters under their first name (a tied embedding's copy as itself)."""
    return {id(p): checkpoint_name(name, p) for name, p in model.named_parameters()}


def _saved_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What this rank writes: its parameters by name, less a tied embedding's copy (the first stage writes it)."""
    return {name: p for name, p in model.named_parameters() if not is_tied_copy(p)}


Span = tuple[int, int] | None  # (flat start, length) of a parameter a tensor holds; None: all of it


def _optimizer_targets(optimizer) -> list[list[tuple[torch.Tensor, torch.nn.Parameter, torch.Size, Span]]]:
    """Per parameter group, each optimizer tensor with the model parameter it stands for, that parameter's shape
    and the part of it the tensor holds (a ZeRO master piece holds a flat span; a parameter, all of itself)."""
    if isinstance(optimizer, ZeroOptimizer):
        pieces = [[(t, optimizer.piece(t)) for t in g["params"]] for g in optimizer.param_groups]
        return [[(t, pc.param, pc.shape, (pc.start, pc.length)) for t, pc in group] for group in pieces]
    return [[(p, p, p.shape, None) for p in g["params"]] for g in optimizer.param_groups]


def _saved_tensors(model: torch.nn.Module, optimizer) -> tuple[dict, dict, dict]:
    """What this rank writes: parameters by name, optimizer state as `{name.field: tensor}`, and for ZeRO's pieces
    each one's [flat start, whole shape] in its parameter (`engine.training.reshard.DataParallelShards`).

    Hyper-parameters are not saved: the run's config sets them (engine.training.trainer.Trainer.resume).
    """
    names = _param_names(model)
    zero = isinstance(optimizer, ZeroOptimizer)
    # Clones: ZeRO's tensors are views of flat buffers, which safetensors refuses to write as separate tensors.
    weights = {} if zero else {name: p.detach().cpu().contiguous() for name, p in _saved_parameters(model).items()}
    states, pieces = {}, {}
    for group in _optimizer_targets(optimizer):
        for t, p, shape, span in group:
            if is_tied_copy(p):
                continue
            name = names[id(p)]
            where = [span[0] if span else 0, list(shape)]
            if zero:
                weights[name], pieces[name] = t.detach().cpu().clone(), where
            for key, value in optimizer.state.get(t, {}).items():
                if not isinstance(value, torch.Tensor):  # DeepSpeedCPUAdam's step count, a Python int
                    value = torch.tensor(float(value))  # saved as torch's AdamW keeps it, so either reads it
                states[f"{name}.{key}"] = value.detach().cpu().clone()
                pieces[f"{name}.{key}"] = where if value.ndim else [0, []]
    return weights, states, pieces


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: ParallelState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    keep_last: int = 2,
    keep_every: int = 0,
    tokenizer_file: str | os.PathLike | None = None,
    fail_after_files: Callable[[], None] | None = None,
) -> Path:
    """Write step `step` (every rank calls this); returns the published step directory.

    `tokenizer_file`, a Hugging Face tokenizer.json, is copied in as `tokenizer.json` so generation and export need
    nothing but the checkpoint; `meta` says which tokenizer to use (`"tokenizer": "byte"` or `"tokenizer.json"`).
    """
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if state.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # a crashed earlier attempt at this step
        tmp.mkdir(parents=True)
    _barrier(state)
    tag = _shard_tag(state)
    layout = tp_layout(model)
    if state.pp > 1:  # each stage knows its own parameters' layout; rank 0 records them all
        stages: list[dict] = [{} for _ in range(state.pp)]
        dist.all_gather_object(stages, layout, group=state.pp_group)
        layout = {name: how for stage in stages for name, how in stage.items()}
    zero = isinstance(optimizer, ZeroOptimizer)
    if zero or state.dp_rank == 0:
        weights, states, pieces = _saved_tensors(model, optimizer)
        if zero:  # each DP rank its own shard; the metadata says where each piece goes
            tag = f"{tag}-dp{state.dp_rank:02d}"
        for kind, tensors in (("model", weights), ("optimizer", states)):
            where = {key: pieces[key] for key in tensors} if zero else None
            save_file(tensors, tmp / f"{kind}-{tag}.safetensors",
                      metadata={ZERO_METADATA: json.dumps(where)} if zero else None)
    if state.rank == 0:
        meta = {**meta, "tp_layout": layout, "zero_stage": optimizer.chunks[0].stage if zero else 0}
    save_file(_rng_tensors(), tmp / f"rng-rank{state.rank:05d}.safetensors")
    if state.rank == 0 and tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")  # a checkpoint is usable on its own
    if fail_after_files is not None:
        fail_after_files()  # tests: a crash in the middle of a save
    _barrier(state)
    error = None
    if state.rank == 0:
        try:
            _publish(root, tmp, final, state, step, meta, keep_last, keep_every)
        except OSError as e:  # disk full, permissions: every rank must hear of it rather than wait forever
            error = f"saving {final} failed: {e}"
    if state.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return final


def _publish(root: Path, tmp: Path, final: Path, state: ParallelState, step: int, meta: dict, keep_last: int,
             keep_every: int) -> None:
    """Rank 0: write meta.json, make everything durable, rename the directory, then move `latest`."""
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    full = {"format": ZERO_FORMAT_VERSION if meta.get("zero_stage") else FORMAT_VERSION, "step": step,
            "world_size": state.world_size, "tp": state.tp, "pp": state.pp, "dp": state.dp, "files": files, **meta}
    (tmp / "meta.json").write_text(json.dumps(full, indent=1, sort_keys=True))
    for f in tmp.iterdir():  # on disk before any name points at them, so a power cut cannot leave empty files
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # re-saving a step (a resumed run reaching it again)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    _fsync(pointer)
    os.replace(pointer, root / "latest")
    _fsync(root)
    prune(root, keep_last, keep_every)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep_every: int) -> None:
    """Delete step directories beyond the newest `keep_last`, except multiples of `keep_every` and `latest`."""
    steps = sorted(int(m.group(1)) for d in root.iterdir() if (m := STEP_DIR.match(d.name)))
    latest = (root / "latest").read_text().strip()
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in steps:
        if s not in keep and step_dir_name(s) != latest:
            shutil.rmtree(root / step_dir_name(s))


def read_meta(path: Path) -> dict:
    """meta.json of a step directory, with every listed file checked present and of its recorded size."""
    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file}: missing; {path} is not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e}); the checkpoint is damaged") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{meta_file}: checkpoint format {meta.get('format')}, this version reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    for name, size in meta["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, but {size} were written; the file is truncated "
                                  "or was replaced")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None


def checkpoint_weights(path: str | os.PathLike) -> CheckpointTensors:
    """The parameters of a checkpoint (a step directory, or a run's latest), saved in any TP x PP layout, as whole
    tensors read a slice at a time."""
    step = resolve_checkpoint(path)
    return CheckpointTensors(step, "model", read_meta(step))


def load_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters as one unsplit, unpadded model, whatever layout saved them."""
    return read_whole(checkpoint_weights(path))


def load_model_weights(path: Path, model: torch.nn.Module, group: dist.ProcessGroup | None = None,
                       expected: set[str] | None = None) -> None:
    """Copy a checkpoint's parameters, saved in any TP x PP layout, into `model` (split over TP `group`; some
    pipeline stages of a model whose names are `expected`)."""
    copy_parameters(model, checkpoint_weights(path), group, expected)


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """A transformers model directory (config.json, no meta.json of ours)."""
    p = Path(path)
    return (p / "config.json").exists() and not (p / "meta.json").exists()


def load_weights(source: TensorSource, model: torch.nn.Module, optimizer, group: dist.ProcessGroup | None = None,
                 expected: set[str] | None = None) -> None:
    """`source`'s weights into this run (split over TP `group`; `expected` as for `copy_parameters`): into the
    parameters, or under ZeRO into the fp32 master shards, from which the parameters are then gathered."""
    if not isinstance(optimizer, ZeroOptimizer):
        copy_parameters(model, source, group, expected)
        return
    names = {id(p): name for name, p in matching_parameters(model, source, expected).items()}
    with torch.no_grad():
        for targets in _optimizer_targets(optimizer):
            for t, p, shape, span in targets:
                t.copy_(_read_part(source, names[id(p)], p, shape, span, tp_rank(group), tp_size(group)))
    for chunk in optimizer.chunks:
        chunk.gather_params()


def _read_part(source: TensorSource, key: str, p: torch.nn.Parameter, shape: torch.Size, span: Span, rank: int,
               world: int) -> torch.Tensor:
    """This TP rank's part of `key` for parameter `p` (of `shape`), or its flat `span` of that part."""
    if not source.shape(key):  # a scalar (a step count)
        return source.read(key)
    part = local_part(source, key, p, rank, world, shape)
    return part if span is None else part.reshape(-1)[span[0] : span[0] + span[1]]


def load_checkpoint(path: Path, state: ParallelState, model: torch.nn.Module, optimizer,
                    expected: set[str] | None = None) -> dict:
    """Restore model, optimizer and this rank's RNG from step directory `path`, saved in any TP/PP/DP layout and
    ZeRO stage.

    Weights and optimizer moments are resharded to this run's layout (`engine.training.reshard`); `expected` is
    the whole model's parameter names when `model` is some of its pipeline stages. The random states come back
    only in the saving layout: rank r of another layout is not rank r of this one.
    """
    meta = read_meta(path)
    load_weights(CheckpointTensors(path, "model", meta), model, optimizer, state.tp_group, expected)
    _load_optimizer(CheckpointTensors(path, "optimizer", meta), model, optimizer, state.tp_group, expected)
    if (meta["tp"], meta["pp"], meta["dp"]) == (state.tp, state.pp, state.dp):
        rng_state = _load_tensors(path / f"rng-rank{state.rank:05d}.safetensors")
        torch.set_rng_state(rng_state["cpu"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng_state["cuda"]))
    elif state.rank == 0:
        print(f"warning: the checkpoint was saved as {layout_name(meta['tp'], meta['pp'], meta['dp'])}, this run is "
              f"{layout_name(state.tp, state.pp, state.dp)}: weights and optimizer state are resharded, random "
              "states start fresh", file=sys.stderr)
    return meta


def layout_name(tp: int, pp: int, dp: int) -> str:
    """`tp 2 x pp 1 x dp 4`."""
    return f"tp {tp} x pp {pp} x dp {dp}"


def _load_optimizer(source: TensorSource, model: torch.nn.Module, optimizer, group: dist.ProcessGroup | None,
                    expected: set[str] | None) -> None:
    """AdamW moments by parameter name into this run's parameter groups (which the config decides), whole or as
    ZeRO shard pieces."""
    names = _param_names(model)
    known = set(names.values())
    fields: dict[str, list[str]] = {}  # "param.name.exp_avg" -> fields["param.name"] = [..., "exp_avg"]
    for key in source.names():
        name, field = key.rsplit(".", 1)
        if name not in known:
            if expected is not None and name in expected:
                continue  # a parameter of a stage held by another rank
            raise CheckpointError(f"{source.where}: optimizer state for {name}, which this model does not have")
        fields.setdefault(name, []).append(field)
    rank, world = tp_rank(group), tp_size(group)
    state_dict = {"state": {}, "param_groups": []}
    index = 0
    for g, targets in zip(optimizer.param_groups, _optimizer_targets(optimizer), strict=True):
        ids = []
        for _, p, shape, span in targets:
            name = names[id(p)]
            if name in fields:
                state_dict["state"][index] = {f: _read_part(source, f"{name}.{f}", p, shape, span, rank, world)
                                              for f in fields[name]}
            ids.append(index)
            index += 1
        state_dict["param_groups"].append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict(state_dict)
