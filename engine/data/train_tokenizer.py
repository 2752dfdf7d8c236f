"""Train a byte-level BPE tokenizer with Hugging Face `tokenizers` on any corpus the preprocessor reads."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine.data.sources import TXT_SPLITS, document_texts, expand_inputs, read_batches
from engine.data.tokenizer import DEFAULT_EOD_TOKENS


def iter_texts(inputs: Sequence[str], keys: Sequence[str], txt_split: str = "file") -> Iterator[str]:
    """Every document text of the inputs, read the same way the preprocessor reads them (bad records left out)."""
    for path in expand_inputs(inputs):
        for batch in read_batches(path, keys, txt_split=txt_split):
            texts, _ = document_texts(batch, keys, txt_split)
            for k in keys:
                yield from (t for t, _ in texts[k])


def train_tokenizer(
    inputs: Sequence[str],
    output: str,
    vocab_size: int = 8192,
    json_keys: Sequence[str] = ("text",),
    special_tokens: Sequence[str] = (DEFAULT_EOD_TOKENS[0],),
    min_frequency: int = 2,
    txt_split: str = "file",
) -> Path:
    """Train and save `tokenizer.json`; `output` is the file or a directory to hold it. Returns the file path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    tok.train_from_iterator(iter_texts(inputs, json_keys, txt_split), trainer=trainer)
    out = Path(output)
    if out.suffix != ".json":
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
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
    t0 = time.perf_counter()
    path = train_tokenizer(args.input, args.output, args.vocab_size, args.json_keys, args.special_tokens,
                           args.min_frequency, args.txt_split)
    print(f"trained a {args.vocab_size}-token byte-level BPE in {time.perf_counter() - t0:.1f} s -> {path}",
          file=sys.stderr)
    return 0
