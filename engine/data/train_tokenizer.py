"""Train a byte-level BPE tokenizer with Hugging Face `tokenizers` on any corpus the preprocessor reads."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.data.progress import format_bytes
from engine.data.sources import TXT_SPLITS, InputError, document_texts, expand_inputs, read_batches
from engine.data.tokenizer import DEFAULT_EOD_TOKENS


def _count(n: int, noun: str) -> str:
    """"1 file", "3 files"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _to_stderr(line: str) -> None:
    """train_tokenizer's default log."""
    print(line, file=sys.stderr)


@dataclass
class ReadStats:
    """What `iter_texts` has read so far."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents' text
    skipped: int = 0  # records (or a damaged file's remainder) left out, as the preprocessor would skip them

    @property
    def skipped_note(self) -> str:
        """E.g. "2 records skipped", or "" when nothing was."""
        return f"{_count(self.skipped, 'record')} skipped" if self.skipped else ""

    def describe(self) -> str:
        """E.g. "3 files, 12,345 documents (4.2 MB of text; 2 records skipped)"."""
        note = f"; {self.skipped_note}" if self.skipped else ""
        return (f"{_count(self.files, 'file')}, {_count(self.documents, 'document')} "
                f"({format_bytes(self.text_bytes)} of text{note})")


def iter_texts(inputs: Sequence[str], keys: Sequence[str], txt_split: str = "file",
               stats: ReadStats | None = None) -> Iterator[str]:
    """Every document text of the inputs, read as the preprocessor reads them; `stats`, if given, counts them."""
    stats = ReadStats() if stats is None else stats
    for path in expand_inputs(inputs):
        stats.files += 1
        for batch in read_batches(path, keys, txt_split=txt_split):
            texts, skips = document_texts(batch, keys, txt_split)
            stats.skipped += len(skips) + len(batch.skips)
            for k in keys:
                for t, _ in texts[k]:
                    stats.documents += 1
                    stats.text_bytes += len(t.encode("utf-8"))
                    yield t


def train_tokenizer(
    inputs: Sequence[str],
    output: str,
    vocab_size: int = 8192,
    json_keys: Sequence[str] = ("text",),
    special_tokens: Sequence[str] = (DEFAULT_EOD_TOKENS[0],),
    min_frequency: int = 2,
    txt_split: str = "file",
    log: Callable[[str], None] = _to_stderr,
) -> Path:
    """Train, save and `log` a line on `tokenizer.json` (`output`: it or its directory); InputError if no documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t0 = time.perf_counter()

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    stats = ReadStats()
    tok.train_from_iterator(iter_texts(inputs, json_keys, txt_split, stats), trainer=trainer)
    if not stats.documents:
        note = f" ({stats.skipped_note})" if stats.skipped else ""
        raise InputError(f"no documents in {_count(stats.files, 'file')}{note}; nothing to train a tokenizer on")
    out = Path(output)
    if out.suffix != ".json":
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    vocab = tok.get_vocab_size()
    # A small corpus can run out of merges before the requested size.
    short = f" (of {vocab_size:,} requested: no more merges to learn)" if vocab < vocab_size else ""
    log(f"read {stats.describe()}; vocabulary {vocab:,}{short}, byte-level BPE trained in "
        f"{time.perf_counter() - t0:.1f} s -> {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/train_tokenizer.py."""
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) on .jsonl/.txt/.parquet inputs, "
        "optionally compressed; writes a tokenizer.json that preprocess_data.py --tokenizer accepts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    p.add_argument("--output", required=True, help="tokenizer.json path, or a directory to write it into")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="fields holding the text")
    p.add_argument("--special-tokens", nargs="+", default=[DEFAULT_EOD_TOKENS[0]], metavar="TOKEN",
                   help="special tokens, given the first ids; the first is the end-of-document token")
    p.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    p.add_argument("--txt-split", choices=TXT_SPLITS, default="file", help="for .txt: one document per file or line")
    args = p.parse_args(argv)
    if args.vocab_size < 256 + len(args.special_tokens):
        p.error(f"--vocab-size must be at least {256 + len(args.special_tokens)} (256 bytes + special tokens)")
    try:
        train_tokenizer(args.input, args.output, args.vocab_size, args.json_keys, args.special_tokens,
                        args.min_frequency, args.txt_split)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
