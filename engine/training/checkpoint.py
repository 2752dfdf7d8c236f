"""Checkpoints: sharded, atomic, resumable, and safe to load whatever their origin.

Layout under `run_dir/checkpoints/`:

    latest                                  the newest complete step directory's name (replaced atomically)
    step_00000100/
        meta.json                           step, samples consumed, optimizer hyper-parameters, loss scaler, W&B
                                            run id, the resolved config, and every file's size (written last)
        model-pp00-tp00.safetensors         parameters of one (pipeline stage, tensor rank)
        tokenizer.json                      the run's tokenizer (absent for the built-in byte tokenizer)
        optimizer-pp00-tp00.safetensors     AdamW moments and step counts of the same parameters, by name
        rng-rank00000.safetensors           each rank's torch generator states (CPU and CUDA)

A step is written into `.tmp-step_...` by every rank, then renamed when whole; `latest` changes last, so a crash
mid-save leaves the previous checkpoint and `latest` as they were. Tensors go through safetensors and everything
else through JSON: loading never unpickles anything. Data-parallel replicas hold the same model and optimizer,
so only data-parallel rank 0 writes those, and a run may resume with another data-parallel size.
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

from engine.parallel.state import ParallelState

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, truncated or does not fit the model."""


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
    """Parameter id -> name, tied parameters under their first name."""
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """The optimizer's state as `{param_name.key: tensor}` and its groups' hyper-parameters with parameter names."""
    names = _param_names(model)
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    return tensors, groups


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
    if state.dp_rank == 0:
        save_file({name: p.detach().cpu().contiguous() for name, p in model.named_parameters()},
                  tmp / f"model-{tag}.safetensors")
        tensors, groups = _optimizer_tensors(model, optimizer)
        save_file(tensors, tmp / f"optimizer-{tag}.safetensors")
        if state.rank == 0:
            meta = {**meta, "optimizer_groups": groups, "tp_layout": tp_layout(model)}
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
    full = {"format": FORMAT_VERSION, "step": step, "world_size": state.world_size,
            "tp": state.tp, "pp": state.pp, "dp": state.dp, "files": files, **meta}
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
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: checkpoint format {meta.get('format')}, expected {FORMAT_VERSION}")
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


def tp_layout(model: torch.nn.Module) -> dict[str, dict]:
    """How each split or padded parameter is laid out: {name: {"dim": split dim or None, "vocab": padded rows}}."""
    return {name: {"dim": getattr(p, "tp_dim", None), "vocab": getattr(p, "tp_vocab", False)}
            for name, p in model.named_parameters() if hasattr(p, "tp_dim") or getattr(p, "tp_vocab", False)}


def load_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters as one unsplit, unpadded model, whatever tensor-parallel layout saved them."""
    meta = read_meta(path)
    if meta.get("pp", 1) != 1:
        raise CheckpointError(f"{path}: saved with pp={meta['pp']}; only pp=1 checkpoints can be merged yet")
    shards = [_load_tensors(path / f"model-pp00-tp{t:02d}.safetensors") for t in range(meta.get("tp", 1))]
    layout = meta.get("tp_layout", {})  # absent: written before tensor parallelism, unsplit and unpadded
    vocab = meta.get("config", {}).get("model", {}).get("vocab_size")
    full = {}
    for name, tensor in shards[0].items():
        how = layout.get(name, {})
        if how.get("dim") is not None:
            tensor = torch.cat([shard[name] for shard in shards], dim=how["dim"])
        full[name] = tensor[:vocab] if how.get("vocab") else tensor
    return full


def load_model_weights(path: Path, model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Copy a checkpoint's parameters into `model` (split over TP `group`), checking every name and shape.

    A checkpoint of this very layout is read shard by shard; any other is merged whole and split again (every
    rank then reads every shard: host memory for the whole model, per rank).
    """
    meta = read_meta(path)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    own = path / f"model-pp00-tp{rank:02d}.safetensors"
    if meta.get("tp", 1) == world and meta.get("pp", 1) == 1 and own.exists():
        tensors = _load_tensors(own)
        params = dict(model.named_parameters())
        if tensors.keys() == params.keys() and all(tensors[n].shape == p.shape for n, p in params.items()):
            copy_weights(model, tensors, str(path), source_is_full=False)
            return
    copy_weights(model, load_full_weights(path), str(path), group)


def _local_part(full: torch.Tensor, p: torch.nn.Parameter, name: str, group: dist.ProcessGroup | None,
                source: str) -> torch.Tensor:
    """This rank's part of an unsplit, unpadded tensor for parameter `p`: padded with zero rows, then sliced."""
    world = dist.get_world_size(group) if group is not None else 1
    vocab = getattr(p, "tp_vocab", None)
    if vocab is not None:
        if full.shape[0] != vocab:  # never pad real tokens' rows with zeros
            raise CheckpointError(f"{source}: {name} has {full.shape[0]} vocabulary rows there, the model "
                                  f"{vocab} (model.vocab_size)")
        full = torch.cat([full, full.new_zeros(p.shape[0] * world - vocab, *full.shape[1:])])
    if hasattr(p, "tp_dim"):
        full = full.chunk(world, dim=p.tp_dim)[dist.get_rank(group)]
    return full


def copy_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                 group: dist.ProcessGroup | None = None, source_is_full: bool = True) -> None:
    """Copy `tensors` (by our parameter names) into `model`; every name and shape must match.

    source_is_full: the tensors are the whole model, unsplit and unpadded, and each rank takes its part for TP
    `group`; otherwise they are this rank's own shards already (a checkpoint of the same layout).
    """
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source}: parameters do not match the model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); is the model configuration the one the weights were saved with?")
    with torch.no_grad():
        for name, p in params.items():
            local = _local_part(tensors[name], p, name, group, source) if source_is_full else tensors[name]
            if local.shape != p.shape:
                hint = (" (vocabulary padding: is model.make_vocab_size_divisible_by the checkpoint's?)"
                        if hasattr(p, "tp_vocab") else "")
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)} there, which does "
                                      f"not give this rank's {tuple(p.shape)}{hint}")
            p.copy_(local)


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """A transformers model directory (config.json, no meta.json of ours)."""
    p = Path(path)
    return (p / "config.json").exists() and not (p / "meta.json").exists()


def load_checkpoint(path: Path, state: ParallelState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from step directory `path`; returns its metadata."""
    meta = read_meta(path)
    if (meta["tp"], meta["pp"]) != (state.tp, state.pp):
        raise CheckpointError(f"{path}: saved with tp={meta['tp']}, pp={meta['pp']}; this run has tp={state.tp}, "
                              f"pp={state.pp}. Resuming needs the same layout (optimizer state is split like the "
                              "weights); train.init_from takes the weights alone into any layout")
    tag = _shard_tag(state)
    copy_weights(model, _load_tensors(path / f"model-{tag}.safetensors"), str(path), source_is_full=False)
    _load_optimizer(path / f"optimizer-{tag}.safetensors", meta["optimizer_groups"], model, optimizer)
    rng = path / f"rng-rank{state.rank:05d}.safetensors"
    if meta["world_size"] == state.world_size:
        rng_state = _load_tensors(rng)
        torch.set_rng_state(rng_state["cpu"])
        if "cuda" in rng_state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng_state["cuda"]))
    elif state.rank == 0:  # another layout: rank r of this run is not rank r of that one
        print(f"warning: the checkpoint was saved by {meta['world_size']} ranks, this run has {state.world_size}: "
              "random states start fresh", file=sys.stderr)
    return meta


def _load_optimizer(path: Path, groups: list[dict], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors = _load_tensors(path)
    names = _param_names(model)
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if current != [g["params"] for g in groups]:
        raise CheckpointError(f"{path}: the optimizer's parameter groups differ from the checkpoint's")
    by_param: dict[str, dict[str, torch.Tensor]] = {}  # "param.name.exp_avg" -> by_param["param.name"]["exp_avg"]
    for key, t in tensors.items():
        name, field = key.rsplit(".", 1)
        by_param.setdefault(name, {})[field] = t
    state_dict = {"state": {}, "param_groups": []}
    index = 0
    for group in groups:
        ids = []
        for name in group["params"]:
            if name in by_param:
                state_dict["state"][index] = by_param[name]
            ids.append(index)
            index += 1
        hyper = {k: tuple(v) if k == "betas" else v for k, v in group.items() if k != "params"}
        state_dict["param_groups"].append({**hyper, "params": ids})
    optimizer.load_state_dict(state_dict)
