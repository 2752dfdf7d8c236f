"""Checkpoint tensors read into any tensor-parallel layout, each rank reading only its own part.

A checkpoint holds one parameter file (`model-ppXX-tpYY`) and one optimizer file per tensor-parallel rank, and its
`meta.json` says how each split parameter was laid out (`tp_layout`: the dimension it was split along, and whether
its rows are a padded vocabulary). Through that layout a family of files is one unsplit, unpadded tensor per name
(`CheckpointTensors`). A parameter of the run that loads it wants its own part of that tensor: the slice of its
split dimension for its TP rank, with zero rows where this run's vocabulary padding falls (`local_part`). Only the
overlapping slices of the overlapping files are read (safetensors slices are memory-mapped reads), so a rank's host
memory holds its own part whatever layout wrote the checkpoint and whatever layout reads it: TP 2 resumes as TP 4,
TP 8 is exported as one model, and a single-device checkpoint starts a TP run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

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


class CheckpointTensors:
    """The `kind` files (`model` or `optimizer`) of one checkpoint step, whatever TP size wrote them, as whole tensors.

    Optimizer tensors are named `<parameter>.<field>` (AdamW's `exp_avg`, `exp_avg_sq`, `step`): a field of its
    parameter's shape is laid out like the parameter, a scalar is the same in every file.
    """

    def __init__(self, step_dir: Path, kind: str, meta: dict):
        self.where = str(step_dir)
        if meta.get("pp", 1) != 1:
            raise CheckpointError(f"{step_dir}: saved with pp={meta['pp']}; only pp=1 checkpoints can be read yet")
        self.files = []
        for t in range(meta.get("tp", 1)):
            path = step_dir / f"{kind}-pp00-tp{t:02d}.safetensors"
            try:
                self.files.append(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        self.layout = meta.get("tp_layout", {})  # absent: written before tensor parallelism, unsplit and unpadded
        self.parameter_of = (lambda key: key) if kind == "model" else (lambda key: key.rsplit(".", 1)[0])

    def names(self) -> list[str]:
        """Every tensor's name (each file holds the same names)."""
        return list(self.files[0].keys())

    def _slice(self, t: int, key: str):
        """File `t`'s lazily read view of `key`."""
        try:
            return self.files[t].get_slice(key)
        except (SafetensorError, KeyError) as e:
            raise CheckpointError(f"{self.where}: {key} cannot be read from its tensor-parallel file {t} ({e}); "
                                  "the checkpoint is damaged") from None

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
            shape[dim] = sum(self._slice(t, key).get_shape()[dim] for t in range(len(self.files)))
        if rows is not None:
            shape[0] = rows
        return tuple(shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or its [start, stop) along `dim`, reading only the overlapping rows of each file."""
        split, _, file_shape = self._split(key)
        whole = self.shape(key)
        if not whole:
            return self.files[0].get_tensor(key)
        want = [[0, n] for n in whole]  # the wanted range of every dimension, in whole-tensor coordinates
        if dim is not None:
            want[dim] = [start, min(whole[dim] if stop is None else stop, whole[dim])]
        pieces, offset = [], 0
        for t in range(len(self.files) if split is not None else 1):
            index = []
            for d, (lo, hi) in enumerate(want):
                if d == split:  # this file holds [offset, offset + its size) of the split dimension
                    lo, hi = min(max(lo - offset, 0), file_shape[d]), min(max(hi - offset, 0), file_shape[d])
                index.append(slice(lo, max(lo, hi)))
            pieces.append(self._slice(t, key)[tuple(index)])
            offset += file_shape[split] if split is not None else 0
        return torch.cat(pieces, dim=split) if len(pieces) > 1 else pieces[0]


def tp_layout(model: torch.nn.Module) -> dict[str, dict]:
    """How each split or padded parameter is laid out: {name: {"dim": split dim or None, "vocab": padded rows}}."""
    return {name: {"dim": getattr(p, "tp_dim", None), "vocab": getattr(p, "tp_vocab", False)}
            for name, p in model.named_parameters() if hasattr(p, "tp_dim") or getattr(p, "tp_vocab", False)}


def local_part(source: TensorSource, key: str, p: torch.nn.Parameter, rank: int, world: int) -> torch.Tensor:
    """TP rank `rank` of `world`'s part of whole tensor `key` for parameter `p` (or a state of p's shape), padded
    like `p`."""
    dim, rows = getattr(p, "tp_dim", None), getattr(p, "tp_vocab", None)
    whole = list(p.shape)
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
        n = p.shape[dim]
        part = source.read(key, dim, rank * n, (rank + 1) * n)
    if part.shape[0] < p.shape[0]:  # this rank's share of the vocabulary padding: zero rows
        part = torch.cat([part, part.new_zeros(p.shape[0] - part.shape[0], *part.shape[1:])])
    return part


def copy_parameters(model: torch.nn.Module, source: TensorSource, group: dist.ProcessGroup | None = None) -> None:
    """Copy each parameter's part of `source` into `model` (split over TP `group`); every name and shape must match."""
    params = dict(model.named_parameters())
    keys = set(source.names())
    missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source.where}: parameters do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); is the model configuration the one the weights were "
                              "saved with?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(local_part(source, name, p, tp_rank(group), tp_size(group)))


def read_whole(source: TensorSource) -> dict[str, torch.Tensor]:
    """Every tensor of `source`, whole: one unsplit, unpadded model."""
    return {key: source.read(key) for key in source.names()}
