"""Training samples of `seq_len + 1` tokens cut from a shard's documents, crossing document boundaries.

The sample stream is defined epoch by epoch, independent of how many samples a run asks for:
  * epoch e visits the split's documents in a permutation drawn from (seed, e);
  * the epochs are concatenated into one endless token stream, and sample k is tokens [k*L, (k+1)*L] of it
    (L = seq_len; consecutive samples share one token, the last input being the next sample's first);
  * the samples that start inside epoch e are shuffled among themselves with a generator drawn from (seed, e).
So a run that asks for more samples sees the same first ones, and resuming at any sample continues the same stream.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from engine.data.index_cache import cached_arrays, default_cache_dir, stderr_log
from engine.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str | Sequence[float]) -> tuple[float, float, float]:
    """'969,30,1' or '0.98/0.01/0.01' (or a sequence) -> normalised train/valid/test fractions."""
    if isinstance(split, str):
        try:
            weights = [float(p) for p in split.replace("/", ",").split(",")]
        except ValueError:
            raise ValueError(f"data.split={split!r}: expected numbers like '98,1,1'") from None
    else:
        weights = [float(x) for x in split]
    if not 1 <= len(weights) <= 3 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.split={split!r}: give 1-3 non-negative weights for train,valid,test, e.g. '98,1,1'")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return tuple(w / total for w in weights)  # type: ignore[return-value]


def split_documents(num_documents: int, split: str | Sequence[float]) -> dict[str, tuple[int, int]]:
    """Contiguous document ranges [start, end) for train, valid and test."""
    fractions = parse_split(split)
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + f)
    edges = [round(b * num_documents) for b in bounds]
    edges[-1] = num_documents
    return {name: (edges[i], edges[i + 1]) for i, name in enumerate(SPLIT_NAMES)}


def _rng(seed: int, *stream: int) -> np.random.RandomState:
    # The legacy RandomState interface is frozen by numpy, so the permutations never change under a user's feet.
    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence([seed, *stream])))


def epochs_needed(num_samples: int, tokens_per_epoch: int, seq_len: int) -> int:
    """Fewest whole epochs whose samples (those starting inside them) number at least `num_samples`."""
    # Samples starting inside the first E epochs: ceil(E * T / L).
    epochs = max(1, math.ceil(num_samples * seq_len / tokens_per_epoch))
    while epochs > 1 and math.ceil((epochs - 1) * tokens_per_epoch / seq_len) >= num_samples:
        epochs -= 1
    return epochs


def sample_index_bytes(num_sequences: int, tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """The peak memory `build_sample_index` takes for these sizes (its arrays and temporaries), computed first."""
    if tokens_per_epoch <= 0 or num_samples <= 0:
        return 0
    epochs = epochs_needed(num_samples, tokens_per_epoch, seq_len)
    orders = (epochs + math.ceil((seq_len + 1) / tokens_per_epoch)) * num_sequences
    samples = math.ceil(epochs * tokens_per_epoch / seq_len) + 1
    # per document-order entry: the int64 permutation, its int32 copy, the gathered sizes and their cumsum; per
    # sample: starts, positions, offsets, the stacked pair, the shuffle and its concatenation
    return orders * 28 + samples * 56


def build_sample_index(
    sizes: np.ndarray, seq_len: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Document order, sample starts and sample shuffle for `num_samples` samples over sequences of `sizes`.

    `doc_order[p]` is a position into `sizes`; `sample_index[k] = (p, offset)` is where sample k starts, and
    sample k runs to sample k+1's start inclusive; `shuffle_index[i]` is the sample served as item i.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    tokens_per_epoch = int(sizes.sum())
    if tokens_per_epoch == 0:
        raise ValueError("cannot build samples from documents holding no tokens")
    epochs = epochs_needed(num_samples, tokens_per_epoch, seq_len)
    # Document orders reach past the sampled epochs: the last sample's tokens may lie in the next epoch(s).
    order_epochs = epochs + math.ceil((seq_len + 1) / tokens_per_epoch)
    doc_order = np.concatenate([_rng(seed, 0, e).permutation(len(sizes)) for e in range(order_epochs)])
    doc_order = doc_order.astype(np.int32 if len(sizes) < 2**31 else np.int64)
    cum = np.zeros(len(doc_order) + 1, dtype=np.int64)
    np.cumsum(sizes[doc_order], out=cum[1:])
    samples_in_epochs = math.ceil(epochs * tokens_per_epoch / seq_len)
    starts = np.arange(samples_in_epochs + 1, dtype=np.int64) * seq_len
    pos = np.searchsorted(cum, starts, side="right") - 1
    sample_index = np.stack([pos, starts - cum[pos]], axis=1)
    shuffle_parts = []
    for e in range(epochs):
        lo = math.ceil(e * tokens_per_epoch / seq_len)
        hi = math.ceil((e + 1) * tokens_per_epoch / seq_len)
        shuffle_parts.append(lo + _rng(seed, 1, e).permutation(hi - lo))
    shuffle_index = np.concatenate(shuffle_parts)[:num_samples]
    return {"doc_order": doc_order, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset:
    """`num_samples` training samples of `seq_len + 1` tokens from documents [start, end) of a shard."""

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: tuple[int, int],
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str | os.PathLike | None = None,
        name: str = "train",
        log=stderr_log,
    ):
        start, end = documents
        if not 0 <= start < end <= indexed.num_documents:
            raise ValueError(f"{name} split of {indexed.prefix}: document range {documents} is empty or outside "
                             f"the shard's {indexed.num_documents} documents")
        if seq_len < 1 or num_samples < 0:
            raise ValueError(f"seq_len must be positive and num_samples non-negative (got {seq_len}, {num_samples})")
        self.indexed, self.seq_len, self.num_samples, self.name = indexed, seq_len, num_samples, name
        # Sequences of the split (one per document in our shards; Megatron shards may hold several per document).
        first, last = int(indexed.doc_index[start]), int(indexed.doc_index[end])
        self.first_sequence = first
        sizes = indexed.sizes[first:last]
        self.tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        if self.tokens_per_epoch <= seq_len:
            warnings.warn(f"{name} split of {indexed.prefix} holds {self.tokens_per_epoch} tokens, fewer than one "
                          f"sample of {seq_len + 1}: every sample repeats it", stacklevel=2)
        description = {
            "shard": os.path.realpath(indexed.prefix), "documents": [start, end], "seq_len": seq_len,
            "num_samples": num_samples, "seed": seed,
            # The split's document lengths themselves: a shard rewritten in place must not reuse a stale index.
            "sizes": hashlib.blake2b(np.ascontiguousarray(sizes).tobytes(), digest_size=16).hexdigest(),
        }
        arrays = cached_arrays(
            cache_dir or default_cache_dir(indexed.prefix), f"gpt-{name}", description,
            ("doc_order", "sample_index", "shuffle_index"),
            lambda: build_sample_index(sizes, seq_len, num_samples, seed), log,
        )
        self.doc_order = arrays["doc_order"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i: `seq_len + 1` token ids (int64)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} ({self.num_samples} samples)")
        k = int(self.shuffle_index[i])
        (p0, off0), (p1, off1) = self.sample_index[k], self.sample_index[k + 1]
        seq = self.first_sequence
        if p0 == p1:
            return self.indexed.get(seq + int(self.doc_order[p0]), int(off0), int(off1 - off0 + 1)).astype(np.int64)
        parts = [self.indexed.get(seq + int(self.doc_order[p0]), int(off0))]
        parts += [self.indexed.get(seq + int(self.doc_order[p])) for p in range(p0 + 1, p1)]
        parts.append(self.indexed.get(seq + int(self.doc_order[p1]), 0, int(off1) + 1))
        return np.concatenate(parts).astype(np.int64)
