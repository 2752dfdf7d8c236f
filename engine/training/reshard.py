"""Checkpoint tensors read into any tensor-parallel x pipeline layout, each rank reading only its own part.

A checkpoint holds one parameter file (`model-ppXX-tpYY`) and one optimizer file per (pipeline stage,
tensor-parallel rank). Names are global (`blocks.7.attn.q.weight` on whichever stage held layer 7), so a name
lives in one stage's files, and `meta.json` says how each split parameter was laid out (`tp_layout`: the dimension
it was split along, and whether its rows are a padded vocabulary). Through that layout a family of files is one
unsplit, unpadded tensor per name (`CheckpointTensors`). A parameter of the run that loads it wants its own part
of that tensor: the slice of its split dimension for its TP rank, with zero rows where this run's vocabulary
padding falls (`local_part`), wherever its stage is now. Only the overlapping slices of the overlapping files are
read (safetensors slices are memory-mapped reads), so a rank's host memory holds its own part whatever layout wrote
the checkpoint and whatever layout reads it: TP 2 x PP 2 resumes as TP 4 or PP 4, TP 8 is exported as one model,
and a single-device checkpoint starts a 3D run.

Under ZeRO each data-parallel rank writes its own files (`model-ppXX-tpYY-dpZZ`), holding the flat pieces of its
shard: fp32 master weights, and the AdamW moments of the same elements. `DataParallelShards` joins a (stage, TP
rank)'s DP files back into what that TP rank's single file would have held, so everything above - and so resuming
with another DP size or ZeRO stage, `init_from`, generation and export - reads them the same way. A tensor is then
assembled whole (one TP rank's part of it) before it is sliced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from engine.parallel.layers import is_tied_copy
from engine.parallel.mappings import tp_rank, tp_size


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, truncated or does not fit the model."""


class TensorSource(Protocol):
    """Named tensors seen whole (unsplit, unpadded), readable a slice at a time."""

    where: str  # for messages: the checkpoint or directory the tensors come from

    def names(self) -> list[str]:
        """Every tensor's name."""

    def shape(self, key: str) -> tuple[int, ...]:
        """The whole tensor's shape."""

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or its [start, stop) along `dim` (stop clipped to its size)."""


class FullTensors:
    """Whole tensors already in memory (a Hugging Face model's weights, converted to our names)."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str):
        self.tensors, self.where = tensors, where

    def names(self) -> list[str]:
        """Every tensor's name."""
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape."""
        return tuple(self.tensors[key].shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, stop) along `dim`."""
        t = self.tensors[key]
        if dim is None:
            return t
        start = min(start, t.shape[dim])  # a rank whose part is all vocabulary padding reads nothing
        return t.narrow(dim, start, min(t.shape[dim] if stop is None else stop, t.shape[dim]) - start)


ZERO_METADATA = "weft_zero_pieces"  # safetensors metadata key: {tensor name: [flat start, whole shape]}


class _Assembled:
    """One tensor of a TP rank, joined from its data-parallel pieces (safe_open's slice interface)."""

    def __init__(self, shards: DataParallelShards, key: str):
        self.shards, self.key = shards, key

    def get_shape(self) -> list[int]:
        """The joined tensor's shape (from the metadata; nothing read)."""
        return list(self.shards.pieces[self.key][0][2])

    def __getitem__(self, index) -> torch.Tensor:
        shape = self.get_shape()
        pieces = self.shards.pieces[self.key]
        if not shape:  # a scalar (a step count): the same in every file that holds it
            return pieces[0][0].get_tensor(self.key)
        numel, parts, covered = torch.Size(shape).numel(), [], 0
        for f, start, _ in sorted(pieces, key=lambda piece: piece[1]):
            if start != covered:
                break
            parts.append(f.get_tensor(self.key))
            covered += parts[-1].numel()
        if covered != numel:
            raise CheckpointError(f"{self.shards.where}: the data-parallel pieces of {self.key} cover {covered} of "
                                  f"its {numel} elements; a dp file is missing or damaged")
        return torch.cat(parts).view(shape)[index]


class DataParallelShards:
    """One (stage, TP rank)'s ZeRO files, one per DP rank, seen as the single file a replicated run writes."""

    def __init__(self, paths: list[Path]):
        self.where = str(paths[0].parent)
        self.pieces: dict[str, list[tuple]] = {}  # name -> [(open file, flat start, whole shape)]
        for path in paths:
            try:
                f = safe_open(path, framework="pt")
                layout = json.loads((f.metadata() or {})[ZERO_METADATA])
            except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: cannot be read as a ZeRO shard file ({e})") from None
            for key, (start, shape) in layout.items():
                self.pieces.setdefault(key, []).append((f, start, shape))

    def keys(self) -> list[str]:
        """Every tensor's name."""
        return list(self.pieces)

    def get_slice(self, key: str) -> _Assembled:
        """`key`, joined lazily."""
        if key not in self.pieces:
            raise KeyError(key)
        return _Assembled(self, key)


def open_tensor_file(step_dir: Path, kind: str, stage: int, tp: int, meta: dict):
    """A (stage, TP rank)'s `kind` file, or its ZeRO data-parallel files joined (`DataParallelShards`)."""
    name = f"{kind}-pp{stage:02d}-tp{tp:02d}"
    if meta.get("zero_stage", 0):
        return DataParallelShards([step_dir / f"{name}-dp{d:02d}.safetensors" for d in range(meta["dp"])])
    path = step_dir / f"{name}.safetensors"
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None


class CheckpointTensors:
    """The `kind` files (`model` or `optimizer`) of one checkpoint step, whatever TP x PP layout wrote them, as whole
    tensors.

    Each pipeline stage's files hold its own parameters (global names, so a name lives in exactly one stage's
    files); each tensor-parallel rank's file of a stage holds the same names. Optimizer tensors are named
    `<parameter>.<field>` (AdamW's `exp_avg`, `exp_avg_sq`, `step`): a field of its parameter's shape is laid out
    like the parameter, a scalar is the same in every file.
    """

    def __init__(self, step_dir: Path, kind: str, meta: dict):
        self.where = str(step_dir)
        # [pipeline stage][tensor-parallel rank]
        self.files = [[open_tensor_file(step_dir, kind, s, t, meta) for t in range(meta.get("tp", 1))]
                      for s in range(meta.get("pp", 1))]
        # safe_open handles list their names with keys() (they are not mappings)
        self.stage_of = {key: s for s, stage in enumerate(self.files) for key in stage[0].keys()}  # noqa: SIM118
        self.layout = meta.get("tp_layout", {})  # absent: written before tensor parallelism, unsplit and unpadded
        self.parameter_of = (lambda key: key) if kind == "model" else (lambda key: key.rsplit(".", 1)[0])

    def names(self) -> list[str]:
        """Every tensor's name, over every stage's files."""
        return list(self.stage_of)

    def _slice(self, t: int, key: str):
        """Tensor-parallel file `t`'s lazily read view of `key` (in the stage's files that hold it)."""
        try:
            return self.files[self.stage_of[key]][t].get_slice(key)
        except (SafetensorError, KeyError) as e:
            raise CheckpointError(f"{self.where}: {key} cannot be read from its tensor-parallel file {t} ({e}); "
                                  "the checkpoint is damaged") from None

    @property
    def tp(self) -> int:
        """Tensor-parallel files per stage."""
        return len(self.files[0])

    def _split(self, key: str) -> tuple[int | None, int | None, list[int]]:
        """The split dimension (None: replicated), the real vocabulary rows (None: no padding), file 0's shape."""
        shape = self._slice(0, key).get_shape()
        if not shape:  # a scalar (an optimizer step count)
            return None, None, shape
        how = self.layout.get(self.parameter_of(key), {})
        return how.get("dim"), how.get("vocab") or None, shape

    def shape(self, key: str) -> tuple[int, ...]:
        """The whole tensor's shape: the files' parts joined along the split dimension, padding rows dropped."""
        dim, rows, shape = self._split(key)
        if dim is not None:
            shape[dim] = sum(self._slice(t, key).get_shape()[dim] for t in range(self.tp))
        if rows is not None:
            shape[0] = rows
        return tuple(shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or its [start, stop) along `dim`, reading only the overlapping rows of each file."""
        split, _, file_shape = self._split(key)
        whole = self.shape(key)
        if not whole:
            return self._slice(0, key)[...]
        want = [[0, n] for n in whole]  # the wanted range of every dimension, in whole-tensor coordinates
        if dim is not None:
            want[dim] = [start, min(whole[dim] if stop is None else stop, whole[dim])]
        pieces, offset = [], 0
        for t in range(self.tp if split is not None else 1):
            index = []
            for d, (lo, hi) in enumerate(want):
                if d == split:  # this file holds [offset, offset + its size) of the split dimension
                    lo, hi = min(max(lo - offset, 0), file_shape[d]), min(max(hi - offset, 0), file_shape[d])
                index.append(slice(lo, max(lo, hi)))
            pieces.append(self._slice(t, key)[tuple(index)])
            offset += file_shape[split] if split is not None else 0
        return torch.cat(pieces, dim=split) if len(pieces) > 1 else pieces[0]


def tp_layout(model: torch.nn.Module) -> dict[str, dict]:
    """How each saved split or padded parameter is laid out: {name: {"dim": split dim or None, "vocab": padded
    rows}} (a tied embedding's copy is not saved, so not listed)."""
    return {name: {"dim": getattr(p, "tp_dim", None), "vocab": getattr(p, "tp_vocab", False)}
            for name, p in model.named_parameters()
            if (hasattr(p, "tp_dim") or getattr(p, "tp_vocab", False)) and not is_tied_copy(p)}


def local_part(source: TensorSource, key: str, p: torch.nn.Parameter, rank: int, world: int,
               shape: torch.Size | None = None) -> torch.Tensor:
    """TP rank `rank` of `world`'s part of whole tensor `key` for parameter `p` (or a state of p's shape), padded
    like `p`; `shape` is p's when p itself is empty (ZeRO stage 3)."""
    dim, rows = getattr(p, "tp_dim", None), getattr(p, "tp_vocab", None)
    shape = p.shape if shape is None else shape
    whole = list(shape)
    if dim is not None:
        whole[dim] *= world
    if rows is not None:
        whole[0] = rows  # never pad real tokens' rows with zeros: a vocabulary of another size is an error
    there = source.shape(key)
    if rows is not None and there and there[0] != rows:
        raise CheckpointError(f"{source.where}: {key} has {there[0]} vocabulary rows there, the model {rows} "
                              "(model.vocab_size)")
    if there != tuple(whole):
        raise CheckpointError(f"{source.where}: {key} is {there} there (unsplit, unpadded), but {tuple(whole)} in "
                              "this model; is the model configuration the one the weights were saved with?")
    if dim is None:
        part = source.read(key)
    else:
        n = shape[dim]
        part = source.read(key, dim, rank * n, (rank + 1) * n)
    if part.shape[0] < shape[0]:  # this rank's share of the vocabulary padding: zero rows
        part = torch.cat([part, part.new_zeros(shape[0] - part.shape[0], *part.shape[1:])])
    return part


def checkpoint_name(name: str, p: torch.nn.Parameter) -> str:
    """The name `p` is saved under: its own, except a last stage's copy of a tied embedding (`tok_emb.weight`)."""
    return "tok_emb.weight" if is_tied_copy(p) else name


def copy_parameters(model: torch.nn.Module, source: TensorSource, group: dist.ProcessGroup | None = None,
                    expected: set[str] | None = None) -> None:
    """Copy each parameter's part of `source` into `model` (split over TP `group`); every name and shape must match.

    `model` may be some pipeline stages of the model: `expected`, the whole model's parameter names, then says
    which of `source`'s names belong to stages held elsewhere (default: the model's own names, all of them).
    """
    params = matching_parameters(model, source, expected)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(local_part(source, name, p, tp_rank(group), tp_size(group)))


def matching_parameters(model: torch.nn.Module, source: TensorSource,
                        expected: set[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """`model`'s parameters by saved name, once `source` is checked to hold each of them and nothing else than
    `expected` (default: the model's own names)."""
    params = {checkpoint_name(n, p): p for n, p in model.named_parameters()}
    keys = set(source.names())
    missing, unexpected = sorted(set(params) - keys), sorted(keys - (expected or set(params)))
    if missing or unexpected:
        raise CheckpointError(f"{source.where}: parameters do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); is the model configuration the one the weights were "
                              "saved with?")
    return params


def read_whole(source: TensorSource) -> dict[str, torch.Tensor]:
    """Every tensor of `source`, whole: one unsplit, unpadded model."""
    return {key: source.read(key) for key in source.names()}
