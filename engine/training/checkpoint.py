"""Checkpoints: sharded, atomic, resumable, and safe to load whatever their origin.

Layout under `run_dir/checkpoints/`:

    latest                                  the newest complete step directory's name (replaced atomically)
    step_00000100/
        meta.json                           step, samples consumed, loss scaler, layout, W&B
                                            run id, the resolved config, and every file's size
        manifest.json                       every other file's size and SHA-256 (written last, once every
                                            rank's files are durable: engine.training.integrity)
        model-pp00-tp00.safetensors         parameters of one (pipeline stage, tensor rank)
        tokenizer.json                      the run's tokenizer (absent for the built-in byte tokenizer)
        optimizer-pp00-tp00.safetensors     AdamW moments and step counts of the same parameters, by name
        rng-rank00000.safetensors           each rank's torch generator states (CPU and CUDA)

    under ZeRO (parallel.zero_stage >= 1), instead of the model and optimizer files, every data-parallel rank's own:
        model-pp00-tp00-dp00.safetensors    its shard's fp32 master weights, as flat pieces of the parameters
        optimizer-pp00-tp00-dp00.safetensors  the AdamW moments of the same elements

A step is written into `.tmp-step_...` by every rank, then renamed when whole; `latest` changes last, so a crash
mid-save leaves the previous checkpoint and `latest` as they were. A resume checks the checkpoint it takes (sizes
always, checksums with `train.verify_checkpoint`) and, with `train.resume_fallback`, falls back to the newest
intact one before it. Tensors go through safetensors and everything
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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.parallel import comm
from engine.parallel.layers import is_tied_copy
from engine.parallel.mappings import tp_rank, tp_size
from engine.parallel.state import ParallelState
from engine.parallel.zero import ZeroOptimizer
from engine.training.integrity import (
    MANIFEST,
    check_sizes,
    checksum_problems,
    file_record,
    fsync_path,
    honour_umask,
    read_json,
    read_manifest,
    write_manifest,
)
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
# meta.json fields no checkpoint is readable without, and those a resumed run reads besides (bool is no int here).
META_FIELDS = {"format": int, "step": int, "tp": int, "pp": int, "dp": int}
OPTIONAL_META_FIELDS = {"world_size": int, "zero_stage": int, "tp_layout": dict, "files": dict}
RESUME_FIELDS = {"consumed_samples": int, "skipped_steps": int, "config": dict}


@dataclass(frozen=True)
class Retention:
    """Which step directories a save leaves (train.keep_last, train.keep_every); `verify` is the resume's check
    (train.verify_checkpoint), which the checkpoint kept for a fallback must pass too."""

    keep_last: int = 2
    keep_every: int = 0
    verify: bool = False

    @classmethod
    def of(cls, train) -> Retention:
        """The retention a TrainConfig asks for."""
        return cls(train.keep_last, train.keep_every, train.verify_checkpoint)


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    """`step_00000100` for step 100."""
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The step directory `latest` names (not yet checked: `read_meta` does that), or None before the first save."""
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    if pointer.is_symlink():  # we write a file; a link may lead anywhere
        raise CheckpointError(f"{pointer}: a symbolic link (to {os.readlink(pointer)}), not the file a save writes; "
                              "refusing to follow it")
    name = pointer.read_text().strip()
    if not STEP_DIR.match(name):  # never follow a path read from a file
        raise CheckpointError(f"{pointer}: names {name!r}, not a step directory of {root}")
    step = root / name
    if step.is_symlink() and step.resolve().parent != root.resolve():
        raise CheckpointError(f"{pointer}: names {name}, a symbolic link to {step.resolve()}, outside {root}; "
                              "refusing to follow it")
    return step


def find_resume_checkpoint(run_dir: str | os.PathLike, state: ParallelState, verify: bool = False,
                           fallback: bool = False) -> Path | None:
    """The checkpoint a resume starts from: the one `latest` names, checked on every rank (`check_checkpoint`).

    If it is damaged: a CheckpointError naming the file, or with `fallback` the newest intact checkpoint older than
    it, with a loud warning. None when the run has no checkpoint. Every rank returns (or raises) the same.
    """
    named = latest_checkpoint(run_dir)
    if named is None:
        return None
    root = checkpoints_dir(run_dir)
    older = sorted((d for d in root.iterdir() if STEP_DIR.match(d.name) and d.name < named.name), reverse=True)
    problems = []
    for candidate in [named, *(older if fallback else [])]:
        problem = check_checkpoint(candidate, state, verify, RESUME_FIELDS)
        if problem is None:
            if problems and state.rank == 0:
                print(f"WARNING: {'; '.join(problems)}\nWARNING: resuming from {candidate}, the newest intact "
                      "checkpoint (train.resume_fallback=true); the steps after it are trained again",
                      file=sys.stderr)
            return candidate
        problems.append(problem)
        if not fallback:
            raise CheckpointError(f"{problem}. Set train.resume_fallback=true to resume from the newest intact "
                                  "checkpoint before it instead")
    raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(problems)}")


def check_checkpoint(path: Path, state: ParallelState, verify: bool, fields: dict[str, type] | None = None
                     ) -> str | None:
    """What is wrong with the checkpoint at `path` on any rank, or None; the same on every rank.

    Missing or resized files, malformed metadata (and missing `fields`), weights saved non-finite, this rank's
    random state unreadable; with `verify`, a file whose SHA-256 differs from the manifest (each rank re-hashing
    its share).
    """
    try:
        meta = read_meta(path, fields)
        same_layout = (meta["tp"], meta["pp"], meta["dp"]) == (state.tp, state.pp, state.dp)
        problems = _content_problems(path, meta, [f"rng-rank{state.rank:05d}.safetensors"] if same_layout else [],
                                     slice(state.rank, None, state.world_size) if verify else None)
    except CheckpointError as e:
        problems = [str(e)]
    if state.world_size > 1:
        every: list[list[str]] = [[] for _ in range(state.world_size)]
        comm.all_gather_object(every, problems)
        problems = sorted({p for rank in every for p in rank})
    return "; ".join(problems) or None


def _content_problems(path: Path, meta: dict, rng_files: list[str], hashed: slice | None) -> list[str]:
    """What a resume would find wrong inside the checkpoint at `path` (its `meta` read and checked): weights saved
    non-finite, the random states `rng_files` unreadable (CheckpointError), and with `hashed` (the manifest's
    files, sorted, that this process re-hashes) files whose SHA-256 differs from the manifest."""
    problems = [f"{path / 'meta.json'}: saved with non-finite (NaN or Inf) weights"] \
        if meta.get("finite_weights") is False else []
    for name in rng_files:
        read_rng_state(path / name)
    records = read_manifest(path) if hashed is not None else None
    if records is not None:
        problems += checksum_problems(path, records, sorted(records)[hashed])
    return problems


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory as given, or a run directory's (or its checkpoints directory's) latest checkpoint."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    for run_dir in (p, p.parent):
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            return latest
    raise CheckpointError(f"{p}: not a checkpoint (no meta.json) and no checkpoints/latest under it")


def _shard_tag(state: ParallelState) -> str:
    c = state.coords()
    return f"pp{c.pp:02d}-tp{c.tp:02d}"


def _barrier(state: ParallelState, group: dist.ProcessGroup | None = None) -> None:
    if state.world_size > 1:
        comm.barrier(group=group)


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
    weights = {} if zero else {name: _host_copy(p) for name, p in _saved_parameters(model).items()}
    states, pieces = {}, {}
    for group in _optimizer_targets(optimizer):
        for t, p, shape, span in group:
            if is_tied_copy(p):
                continue
            name = names[id(p)]
            where = [span[0] if span else 0, list(shape)]
            if zero:
                weights[name], pieces[name] = _host_copy(t), where
            for key, value in optimizer.state.get(t, {}).items():
                if not isinstance(value, torch.Tensor):  # DeepSpeedCPUAdam's step count, a Python int
                    value = torch.tensor(float(value))  # saved as torch's AdamW keeps it, so either reads it
                states[f"{name}.{key}"] = _host_copy(value)
                pieces[f"{name}.{key}"] = where if value.ndim else [0, []]
    return weights, states, pieces


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that training may not change under a save in flight: pinned (and copied without
    waiting) from a GPU, cloned on the CPU. Also whole: ZeRO's tensors are views of flat buffers, which safetensors
    refuses to write as separate tensors."""
    t = t.detach()
    if t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    return t.clone(memory_format=torch.contiguous_format)


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


@dataclass
class Snapshot:
    """One rank's part of a checkpoint, copied to host memory: what `write_checkpoint` puts on disk."""

    step: int
    tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]]  # file name -> (tensors, metadata)
    meta: dict  # rank 0's meta.json fields (others: empty)
    tokenizer_file: str | os.PathLike | None = None  # rank 0: copied in as tokenizer.json


def snapshot_checkpoint(step: int, state: ParallelState, model: torch.nn.Module, optimizer, meta: dict,
                        tokenizer_file: str | os.PathLike | None = None) -> Snapshot:
    """Copy this rank's share of step `step` to host memory (every rank calls this: the layout is gathered).

    `tokenizer_file`, a Hugging Face tokenizer.json, is copied in as `tokenizer.json` so generation and export need
    nothing but the checkpoint; `meta` says which tokenizer to use (`"tokenizer": "byte"` or `"tokenizer.json"`).
    """
    tag = _shard_tag(state)
    layout = tp_layout(model)
    if state.pp > 1:  # each stage knows its own parameters' layout; rank 0 records them all
        stages: list[dict] = [{} for _ in range(state.pp)]
        comm.all_gather_object(stages, layout, group=state.pp_group)
        layout = {name: how for stage in stages for name, how in stage.items()}
    zero = isinstance(optimizer, ZeroOptimizer)
    files, weights = {}, {}
    if zero or state.dp_rank == 0:
        weights, states, pieces = _saved_tensors(model, optimizer)
        if zero:  # each DP rank its own shard; the metadata says where each piece goes
            tag = f"{tag}-dp{state.dp_rank:02d}"
        for kind, tensors in (("model", weights), ("optimizer", states)):
            where = {key: pieces[key] for key in tensors} if zero else None
            files[f"{kind}-{tag}.safetensors"] = (tensors, {ZERO_METADATA: json.dumps(where)} if zero else None)
    files[f"rng-rank{state.rank:05d}.safetensors"] = (_rng_tensors(), None)
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)  # the pinned host copies have landed
    finite = _all_finite(weights.values(), state)
    if state.rank != 0:
        return Snapshot(step, files, {})
    meta = {"format": ZERO_FORMAT_VERSION if zero else FORMAT_VERSION, "step": step, "world_size": state.world_size,
            "tp": state.tp, "pp": state.pp, "dp": state.dp, **meta, "tp_layout": layout, "finite_weights": finite,
            "zero_stage": optimizer.chunks[0].stage if zero else 0, "manifest": MANIFEST}
    return Snapshot(step, files, meta, tokenizer_file)


def _all_finite(tensors, state: ParallelState) -> bool:
    """Whether every rank's `tensors` hold only finite values (every rank calls this)."""
    finite = torch.tensor([all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())],
                          dtype=torch.int32, device=state.device)
    if state.world_size > 1:
        comm.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: ParallelState, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict, retention: Retention = Retention(),
                    tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Write step `step` (every rank calls this); returns the published step directory."""
    snapshot = snapshot_checkpoint(step, state, model, optimizer, meta, tokenizer_file)
    return write_checkpoint(run_dir, snapshot, state, retention)


def write_checkpoint(run_dir: str | os.PathLike, snapshot: Snapshot, state: ParallelState,
                     retention: Retention = Retention(), group: dist.ProcessGroup | None = None,
                     fail_after_files: Callable[[], None] | None = None) -> Path:
    """Put every rank's snapshot on disk as one step directory, published atomically (every rank calls this).

    Each rank writes, fsyncs and hashes its own files; rank 0 gathers those records into the manifest, renames the
    directory and moves `latest`. `group` carries the coordination (None: the world; an asynchronous save uses its
    own, so that it never interleaves with training's collectives).
    """
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(snapshot.step)
    tmp = root / f".tmp-{final.name}"
    if state.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # a crashed earlier attempt at this step
        tmp.mkdir(parents=True)
    _barrier(state, group)
    records, error = {}, None
    try:
        for name, (tensors, metadata) in snapshot.tensors.items():
            save_file(tensors, tmp / name, metadata=metadata)
            honour_umask(tmp / name)
            records[name] = file_record(tmp / name)
        if snapshot.tokenizer_file is not None:
            shutil.copyfile(snapshot.tokenizer_file, tmp / "tokenizer.json")  # a checkpoint is usable on its own
            records["tokenizer.json"] = file_record(tmp / "tokenizer.json")
    except OSError as e:  # disk full, permissions: reported to rank 0 below, so that no rank waits on this one
        error = f"rank {state.rank}: {e}"
    if fail_after_files is not None:
        fail_after_files()  # tests: a crash in the middle of a save
    every = [(records, error)]
    if state.world_size > 1:  # the manifest is written once every rank's files are durable
        every = [None] * state.world_size if state.rank == 0 else None
        comm.gather_object((records, error), every, dst=0, group=group)
    if state.rank == 0:
        errors = [e for _, e in every if e is not None]
        try:
            if not errors:
                _publish(root, tmp, final, snapshot.meta, {k: v for r, _ in every for k, v in r.items()}, retention)
        except OSError as e:
            errors.append(f"rank 0: {e}")
        error = f"saving {final} failed: {'; '.join(errors)}" if errors else None
    if state.world_size > 1:  # every rank hears the outcome rather than waiting forever
        box = [error]
        comm.broadcast_object_list(box, src=0, group=group)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return final


def _publish(root: Path, tmp: Path, final: Path, meta: dict, records: dict[str, dict], retention: Retention) -> None:
    """Rank 0: write meta.json, then the manifest over every file, rename the directory, then move `latest`."""
    # The sizes in meta.json are for readers from before manifests; the manifest is what completes a step.
    meta = {**meta, "files": {name: r["bytes"] for name, r in sorted(records.items())}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    records = {**records, "meta.json": file_record(tmp / "meta.json")}
    write_manifest(tmp, records)
    fsync_path(tmp)  # the entries, before any name points at them: a power cut cannot leave empty files
    if final.exists():  # re-saving a step (a resumed run reaching it again)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    fsync_path(pointer)
    os.replace(pointer, root / "latest")
    fsync_path(root)
    prune(root, retention, fresh=final)


def prune(root: Path, retention: Retention, fresh: Path | None = None) -> None:
    """Delete step directories beyond the newest `keep_last`, except multiples of `keep_every`, `latest`, and the
    two a resume needs when newer ones are damaged or were saved non-finite: the newest that a fallback resume
    would take (intact, finite weights) and the newest also saved with a finite loss. `fresh`, just written and
    hashed, needs no re-hashing."""
    steps = sorted(int(m.group(1)) for d in root.iterdir() if (m := STEP_DIR.match(d.name)))
    latest = (root / "latest").read_text().strip()
    keep = set(steps[-retention.keep_last:]) if retention.keep_last > 0 else set(steps)
    if retention.keep_every > 0:
        keep |= {s for s in steps if s % retention.keep_every == 0}
    if retention.keep_last > 0:
        keep |= _fallback_steps(root, steps, retention.verify, fresh)
    for s in steps:
        if s not in keep and step_dir_name(s) != latest:
            shutil.rmtree(root / step_dir_name(s))


def _fallback_steps(root: Path, steps: list[int], verify: bool, fresh: Path | None) -> set[int]:
    """The newest step a fallback resume would take, and the newest good one (finite loss too), newest first.

    Judged as `check_checkpoint` judges it, for any rank: every rank's random state, every file re-hashed under
    `verify`; `fresh`, whose files were just written and hashed, only by its metadata.
    """
    resumable = good = None
    for s in reversed(steps):
        path = root / step_dir_name(s)
        try:
            meta = read_meta(path, RESUME_FIELDS)
            rng_files = [] if path == fresh else sorted(f.name for f in path.glob("rng-rank*.safetensors"))
            if _content_problems(path, meta, rng_files, slice(None) if verify and path != fresh else None):
                continue
        except CheckpointError:
            continue
        resumable = s if resumable is None else resumable
        if meta.get("finite_loss") is not False:
            good = s
            break
    return {s for s in (resumable, good) if s is not None}


def read_meta(path: Path, fields: dict[str, type] | None = None) -> dict:
    """meta.json of a step directory, its fields checked (the readable layout's, and `fields`), with the manifest's
    files (or, before manifests, meta.json's) checked present and of their recorded sizes."""
    records = read_manifest(path)
    if records is not None:
        check_sizes(path, {"meta.json": records["meta.json"]["bytes"]} if "meta.json" in records else {})
    meta_file = path / "meta.json"
    try:
        meta = read_json(meta_file)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file}: missing; {path} is not a complete checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: holds a JSON {type(meta).__name__}, not an object; the checkpoint is "
                              "damaged")
    _check_fields(meta, meta_file, records is None, fields or {})
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{meta_file}: checkpoint format {meta.get('format')}, this version reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    if records is None and meta.get("manifest"):
        raise CheckpointError(f"{path / MANIFEST}: missing; {path} is not a complete checkpoint (its save did not "
                              "finish)")
    check_sizes(path, {n: r["bytes"] for n, r in records.items()} if records is not None else meta["files"])
    return meta


def _check_fields(meta: dict, meta_file: Path, without_manifest: bool, fields: dict[str, type]) -> None:
    """CheckpointError naming every field of meta.json that is missing or of the wrong type."""
    required = {**META_FIELDS, **fields, **({"files": dict} if without_manifest else {})}
    problems = [f"no {name!r}" for name in required if name not in meta]
    for name, kind in {**OPTIONAL_META_FIELDS, **required}.items():
        value = meta.get(name)
        if name in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            problems.append(f"{name!r} is {json.dumps(value)[:40]}, not {'an integer' if kind is int else 'an object'}")
    if not problems:
        negative = [name for name in ("step", "tp", "pp", "dp") if meta[name] < (0 if name == "step" else 1)]
        problems = [f"{name!r} is {meta[name]}, below {0 if name == 'step' else 1}" for name in negative]
    if problems:
        raise CheckpointError(f"{meta_file}: malformed ({'; '.join(problems)}); the checkpoint is damaged")


def read_rng_state(path: Path) -> dict[str, torch.Tensor]:
    """One rank's saved random states, checked to be what torch's generators take."""
    rng_state = _load_tensors(path)
    cpu = rng_state.get("cpu")
    expected = torch.get_rng_state()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != expected.shape:
        raise CheckpointError(f"{path}: not a saved random state (its 'cpu' entry should be {expected.numel()} bytes "
                              f"of torch.uint8); the checkpoint is damaged")
    cuda = rng_state.get("cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 2):
        raise CheckpointError(f"{path}: its 'cuda' random states are not rows of torch.uint8; the checkpoint is "
                              "damaged")
    return rng_state


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
        rng_state = read_rng_state(path / f"rng-rank{state.rank:05d}.safetensors")
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
