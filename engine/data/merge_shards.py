"""Concatenate token shards (for example the numbered shards of one preprocessing run, or a job array's outputs)."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Sequence

from engine.data.indexed_dataset import ShardFormatError, bin_path, idx_path, merge_shards, unique_prefixes
from engine.data.progress import format_bytes


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Prefixes from prefixes, .bin/.idx paths and globs (sorted), in the order given."""
    paths: list[str] = []
    for pat in patterns:
        if glob.has_magic(pat):
            found = sorted(glob.glob(pat))
            if not found:
                raise ShardFormatError(f"{pat}: pattern matches no shard file")
            paths.extend(found)
        else:
            paths.append(pat)
    return unique_prefixes(paths)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/merge_shards.py."""
    p = argparse.ArgumentParser(
        prog="merge_shards.py",
        description="Concatenate token shards of one dtype into a single PREFIX.bin/.idx, in the order given "
        "(globs are sorted). Document boundaries are kept.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX", help="shard prefixes, files or globs")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    try:
        prefixes = expand_shards(args.input)
        if args.output_prefix in prefixes:
            raise ShardFormatError(f"{args.output_prefix} is both an input and the output")
        outputs = (bin_path(args.output_prefix), idx_path(args.output_prefix))
        if not args.overwrite and any(os.path.exists(f) for f in outputs):
            raise ShardFormatError(f"{args.output_prefix}.bin/.idx exists; pass --overwrite")
        t0 = time.perf_counter()
        out = merge_shards(prefixes, args.output_prefix)
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(prefixes)} shards into {args.output_prefix}: {out.num_documents:,} documents, "
          f"{out.num_tokens:,} tokens ({format_bytes(out.num_tokens * out.dtype.itemsize)}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
