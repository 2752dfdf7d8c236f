"""Look inside token shards: counts, a document-length histogram, and any document decoded back to text."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from engine.data.indexed_dataset import IndexedDataset, ShardFormatError, unique_prefixes
from engine.data.progress import format_bytes
from engine.data.tokenizer import TokenizerError, load_tokenizer


def length_histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Power-of-two buckets of document lengths, drawn as bars."""
    if len(lengths) == 0:
        return ["  (no documents)"]
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    peak = counts.max()
    lines = []
    for b, n in enumerate(counts):
        if n:
            lo, hi = 2**b, 2 ** (b + 1) - 1
            bar = "#" * max(1, round(width * n / peak))
            lines.append(f"  {lo:>9,}-{hi:<9,} {n:>10,}  {bar}")
    return lines


def document_lengths(ds: IndexedDataset) -> np.ndarray:
    """Tokens per document (a document may span several sequences in Megatron-written shards)."""
    per_seq = np.concatenate([[0], np.cumsum(ds.sizes, dtype=np.int64)])
    return per_seq[ds.doc_index[1:]] - per_seq[ds.doc_index[:-1]]


def verified_line(ds: IndexedDataset) -> str:
    """What `IndexedDataset` (on open) and `verify()` together established about a shard, in one line."""
    return (
        f"verified {ds.prefix}: {ds.num_documents:,} documents, {len(ds):,} sequences, {ds.num_tokens:,} tokens "
        f"in a {ds.num_tokens * ds.dtype.itemsize:,}-byte .bin; every size, pointer and document-index entry "
        f"consistent (header and .idx length valid, sizes non-negative, each sequence starting where the one "
        f"before ends, the last ending at the end of the .bin, document index non-decreasing from 0 to "
        f"{len(ds):,}); token ids not checked"
    )


def describe(prefixes: Sequence[str], verify: bool = False) -> tuple[list[IndexedDataset], str]:
    """Open every shard and return the report text."""
    shards, lines, all_lengths = [], [], []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        if verify:
            ds.verify()
        shards.append(ds)
        lengths = document_lengths(ds)
        all_lengths.append(lengths)
        lines.append(
            f"{prefix}: {ds.num_documents:,} documents, {len(ds):,} sequences, {ds.num_tokens:,} tokens "
            f"({ds.dtype}, {format_bytes(ds.num_tokens * ds.dtype.itemsize)})"
        )
        if verify:
            lines.append(verified_line(ds))
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64)
    if len(shards) > 1:
        lines.append(f"total: {len(lengths):,} documents, {int(lengths.sum()):,} tokens in {len(shards)} shards")
    if len(lengths):
        lines.append(
            f"document length (tokens): min {lengths.min():,}, median {int(np.median(lengths)):,}, "
            f"mean {lengths.mean():,.1f}, max {lengths.max():,}"
        )
    lines.append("length histogram (tokens: documents):")
    lines.extend(length_histogram(lengths))
    return shards, "\n".join(lines)


def unigram_entropy(shards: Sequence[IndexedDataset]) -> float:
    """Entropy of the token unigram distribution over the shards, in nats per token (reads every token)."""
    counts = [np.bincount(s.all_tokens()) for s in shards if s.num_tokens]
    if not counts:
        return 0.0
    size = max(len(c) for c in counts)
    total = sum(np.pad(c, (0, size - len(c))) for c in counts)
    p = total[total > 0] / total.sum()
    return float(-(p * np.log(p)).sum())


def document_tokens(shards: Sequence[IndexedDataset], n: int) -> np.ndarray:
    """Document n, counting across the shards in order."""
    total = sum(s.num_documents for s in shards)
    if not 0 <= n < total:
        raise IndexError(f"document {n} out of range: the shards hold {total:,} documents")
    for s in shards:
        if n < s.num_documents:
            seqs = range(int(s.doc_index[n]), int(s.doc_index[n + 1]))
            return np.concatenate([s[i] for i in seqs]) if len(seqs) else np.zeros(0, s.dtype)
        n -= s.num_documents
    raise AssertionError("unreachable")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/inspect_shards.py."""
    p = argparse.ArgumentParser(
        prog="inspect_shards.py",
        description="Print document/token counts and a length histogram for token shards, and decode documents.",
    )
    p.add_argument("shards", nargs="+", help="shard prefixes, or their .bin/.idx files (globs welcome)")
    p.add_argument("--decode", type=int, nargs="*", default=[], metavar="N",
                   help="print document N (counted across the shards in order) decoded to text")
    p.add_argument("--tokenizer", default="byte", metavar="PATH|byte", help="tokenizer used to write the shards")
    p.add_argument("--ids", action="store_true", help="with --decode, also print the token ids")
    p.add_argument("--verify", action="store_true",
                   help="check every size, pointer and document-index entry of the .idx (reads the whole index, "
                   "not the tokens) and say what was verified")
    p.add_argument("--entropy", action="store_true",
                   help="also print the token unigram entropy (nats/token; reads every token): the loss a model "
                   "that ignores context would reach")
    args = p.parse_args(argv)
    try:
        shards, report = describe(unique_prefixes(args.shards), args.verify)
        print(report)
        if args.entropy:
            print(f"unigram entropy: {unigram_entropy(shards):.4f} nats/token")
        if args.decode:
            tok = load_tokenizer(args.tokenizer, fast_backend=False)
            for n in args.decode:
                ids = document_tokens(shards, n)
                print(f"\n--- document {n}: {len(ids):,} tokens ---")
                if args.ids:
                    print(ids.tolist())
                print(tok.decode(ids))
    except (ShardFormatError, TokenizerError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
