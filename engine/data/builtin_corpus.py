"""The built-in corpus: the Python standard library's own source files, real text every machine has offline."""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from engine.data.progress import format_bytes, parse_size


def stdlib_sources() -> list[Path]:
    """Every `.py` file of this interpreter's standard library, installed packages left out, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        (f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts),
        key=lambda f: f.relative_to(root).as_posix(),
    )


def build_corpus(output: str | os.PathLike, max_bytes: int | None = None) -> tuple[int, int]:
    """Write the stdlib sources as jsonl (`text`, `path`), one document per file; returns (documents, bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    docs = nbytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in stdlib_sources():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a handful of test fixtures are deliberately not UTF-8
            if not text:
                continue
            size = len(text.encode("utf-8"))
            if max_bytes is not None and nbytes + size > max_bytes and docs:
                break
            f.write(json.dumps({"text": text, "path": path.relative_to(root).as_posix()}, ensure_ascii=False))
            f.write("\n")
            docs += 1
            nbytes += size
    os.replace(tmp, out)
    return docs, nbytes


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/build_corpus.py."""
    p = argparse.ArgumentParser(
        prog="build_corpus.py",
        description="Write the built-in corpus (this Python's standard-library sources, ~30 MB, no network) as "
        "jsonl with one document per file under the key 'text'.",
    )
    p.add_argument("--output", required=True, help="the .jsonl file to write")
    p.add_argument("--max-size", type=parse_size, default=None, metavar="SIZE",
                   help="stop before the corpus text exceeds SIZE (e.g. 5MB); default: every file")
    args = p.parse_args(argv)
    docs, nbytes = build_corpus(args.output, args.max_size)
    print(f"wrote {docs:,} documents, {format_bytes(nbytes)} of text to {args.output}", file=sys.stderr)
    return 0
