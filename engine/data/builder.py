"""From `data.prefix` and `data.split` to the train/valid/test datasets a run reads."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from engine.data.blended_dataset import BlendedDataset, blend_index, normalise_weights
from engine.data.gpt_dataset import SPLIT_NAMES, GPTDataset, sample_index_bytes, split_documents
from engine.data.index_cache import available_host_memory, default_cache_dir
from engine.data.indexed_dataset import IndexedDataset, ShardFormatError, idx_path


def parse_prefix(prefix: str | Sequence) -> list[tuple[float, str]]:
    """`data.prefix`: one shard prefix, or a flat list `[weight, prefix, weight, prefix, ...]`."""
    if isinstance(prefix, str | os.PathLike):
        return [(1.0, os.fspath(prefix))]
    items = list(prefix)
    if len(items) == 1:
        return [(1.0, os.fspath(items[0]))]
    if len(items) % 2:
        raise ValueError(f"data.prefix={items}: a blend is a list of weight, prefix pairs")
    pairs = []
    for w, p in zip(items[::2], items[1::2], strict=True):
        try:
            pairs.append((float(w), os.fspath(p)))
        except (TypeError, ValueError):
            raise ValueError(f"data.prefix: {w!r} should be a weight (a blend is weight, prefix, ...)") from None
    normalise_weights([w for w, _ in pairs])
    return pairs


def open_shard(prefix: str) -> IndexedDataset:
    """Open a shard, pointing out numbered shards when the bare prefix has none."""
    if not os.path.exists(idx_path(prefix)) and os.path.exists(idx_path(f"{prefix}_00000")):
        raise ShardFormatError(
            f"{prefix}.idx does not exist but {prefix}_00000.idx does: merge the numbered shards with "
            f"tools/merge_shards.py, or list them in data.prefix as a blend"
        )
    return IndexedDataset(prefix)


def index_bytes(shards: Sequence[IndexedDataset], weights: Sequence[float], split: str, seq_len: int,
                num_samples: dict[str, int]) -> int:
    """The memory building every split's sample index (and blend index) would take, before building any."""
    shares = normalise_weights(list(weights)) if len(shards) > 1 else [1.0]
    total = 0
    for name in SPLIT_NAMES:
        n = num_samples.get(name, 0)
        if n <= 0:
            continue
        for shard, share in zip(shards, shares, strict=True):
            lo, hi = split_documents(shard.num_documents, split)[name]
            first, last = int(shard.doc_index[lo]), int(shard.doc_index[hi])
            tokens = int(shard.sizes[first:last].sum(dtype=np.int64))
            total += sample_index_bytes(last - first, tokens, seq_len, max(1, math.ceil(n * share)))
        if len(shards) > 1:
            total += n * 9  # the blend's dataset (uint8) and sample (int64) indices
    return total


def check_index_memory(shards: Sequence[IndexedDataset], weights: Sequence[float], split: str, seq_len: int,
                       num_samples: dict[str, int]) -> None:
    """ValueError, before anything is built, when the sample indices would not fit in the host's free memory."""
    need, free = index_bytes(shards, weights, split, seq_len, num_samples), available_host_memory()
    if need > free:
        counts = ", ".join(f"{n:,} {name}" for name, n in num_samples.items() if n > 0)
        raise ValueError(f"the sample indices for {counts} samples of {seq_len:,} tokens would take "
                         f"{need / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} GiB of memory free: lower "
                         "train.steps, train.global_batch_size or train.seq_len")


def build_datasets(
    prefix: str | Sequence,
    split: str,
    seq_len: int,
    num_samples: dict[str, int],
    seed: int,
    cache_dir: str | None = None,
) -> dict[str, GPTDataset | BlendedDataset | None]:
    """One dataset per split with samples asked for (None where the split holds no documents)."""
    blend = parse_prefix(prefix)
    shards = [open_shard(p) for _, p in blend]
    weights = [w for w, _ in blend]
    check_index_memory(shards, weights, split, seq_len, num_samples)
    out: dict[str, GPTDataset | BlendedDataset | None] = {}
    for name in SPLIT_NAMES:
        n = num_samples.get(name, 0)
        if n <= 0:
            continue
        ranges = [split_documents(s.num_documents, split)[name] for s in shards]
        if any(hi <= lo for lo, hi in ranges):
            empty = [s.prefix for s, (lo, hi) in zip(shards, ranges, strict=True) if hi <= lo]
            if name == "train":
                raise ValueError(f"data.split={split!r} leaves no training documents in {', '.join(empty)}")
            warnings.warn(f"data.split={split!r} gives the {name} split no documents in {', '.join(empty)}; "
                          f"{name} is skipped", stacklevel=2)
            out[name] = None
            continue
        cache = cache_dir or default_cache_dir(shards[0].prefix)
        if len(shards) == 1:
            out[name] = GPTDataset(shards[0], ranges[0], seq_len, n, seed, cache, name)
            continue
        index = blend_index(weights, n, cache)
        counts = [int((index["dataset_index"] == d).sum()) for d in range(len(shards))]
        parts = [GPTDataset(s, r, seq_len, max(c, 1), seed, cache, name)
                 for s, r, c in zip(shards, ranges, counts, strict=True)]
        out[name] = BlendedDataset(parts, weights, n, cache)
    return out
