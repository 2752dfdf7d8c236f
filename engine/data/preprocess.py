"""Corpus -> token shards. `python tools/preprocess_data.py --help` explains the command line.

The main process reads files into batches of raw records; workers parse, tokenize and append the end-of-document
id; the main process writes the results strictly in input order, so the shards are byte-identical whatever the
number of workers. Every record that does not become a document is counted by reason and never dropped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.data.indexed_dataset import (
    TMP_SUFFIX,
    IndexedDatasetBuilder,
    bin_path,
    discard_shard,
    idx_path,
    publish_shard,
    token_dtype,
)
from engine.data.progress import Progress, format_bytes, parse_size
from engine.data.sources import (
    MAX_MESSAGES_PER_REASON,
    TXT_SPLITS,
    Batch,
    InputError,
    Skip,
    document_texts,
    find_inputs,
    read_batches,
    short_list,
)
from engine.data.tokenizer import TokenizerError, load_tokenizer, self_check_on


class StrictModeError(RuntimeError):
    """--strict met a record it would otherwise have skipped."""


@dataclass
class Encoded:
    """A batch after tokenization: per output key, every document's ids (EOD included) back to back."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    skips: list[Skip]
    records: int
    nbytes: int


# ----------------------------------------------------------------------------------------------- worker side
_TOKENIZER = None
_SETTINGS: dict = {}


def init_worker(tokenizer: str, eod_token: str | None, fast: bool, settings: dict) -> None:
    """Load the tokenizer once per worker process."""
    global _TOKENIZER, _SETTINGS
    _TOKENIZER = load_tokenizer(tokenizer, eod_token, fast_backend=fast)
    _SETTINGS = settings


def encode_batch(batch: Batch) -> Encoded:
    """Tokenize one batch (runs in a worker, or inline with --workers 1)."""
    tok, keys, txt_split = _TOKENIZER, _SETTINGS["keys"], _SETTINGS["txt_split"]
    dtype = np.dtype(_SETTINGS["dtype"])
    pairs, skips = document_texts(batch, keys, txt_split)
    tokens, lengths = {}, {}
    for k in keys:
        ids = tok.encode_batch([t for t, _ in pairs[k]])
        tokens[k], lengths[k] = _with_eod(ids, tok.eod_id, dtype)
    return Encoded(tokens, lengths, skips, len(batch.records), batch.nbytes)


def _with_eod(ids: list[np.ndarray], eod: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by the end-of-document id."""
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eod
    mask = np.ones(len(flat), dtype=bool)
    mask[ends - 1] = False
    if ids:
        flat[mask] = np.concatenate(ids)
    return flat, lengths


# ----------------------------------------------------------------------------------------------- writer side
class ShardWriter:
    """Writes one output (one json key) as a single shard, or as numbered shards of at most `max_bytes`."""

    def __init__(self, prefix: str, dtype: np.dtype, max_bytes: int | None):
        self.prefix, self.dtype, self.max_bytes = prefix, dtype, max_bytes
        self.paths: list[str] = []
        self.documents = 0
        self.tokens = 0
        self._builder: IndexedDatasetBuilder | None = None

    def _shard_name(self) -> str:
        return self.prefix if self.max_bytes is None else f"{self.prefix}_{len(self.paths):05d}"

    def _open(self) -> IndexedDatasetBuilder:
        if self._builder is None:
            name = self._shard_name()
            self.paths.append(name)
            self._builder = IndexedDatasetBuilder(name, self.dtype)
        return self._builder

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents; roll to a new shard before one would grow past `max_bytes`."""
        self.documents += len(lengths)
        self.tokens += len(flat)
        if self.max_bytes is None:
            self._open().add_flat(flat, lengths)
            return
        item = self.dtype.itemsize
        start, i = 0, 0
        while i < len(lengths):
            b = self._open()
            room = (self.max_bytes - b.num_bytes) // item
            ends = np.cumsum(lengths[i:])
            n = int(np.searchsorted(ends, room, side="right"))
            if n == 0 and b.num_documents == 0:
                n = 1  # a document larger than a shard gets a shard of its own
            if n == 0:
                self._close()
                continue
            ntok = int(ends[n - 1])
            b.add_flat(flat[start : start + ntok], lengths[i : i + n])
            start, i = start + ntok, i + n
            if i < len(lengths):
                self._close()

    def _close(self) -> None:
        # Finished shards stay under temporary names until the whole run succeeds (`publish`).
        if self._builder is not None:
            self._builder.finalize(publish=False)
            self._builder = None

    def finalize(self) -> None:
        """Close the last shard (an output with no documents still gets an empty, valid shard)."""
        self._open()
        self._close()

    def publish(self) -> None:
        """Give every shard its final name."""
        for p in self.paths:
            publish_shard(p)

    def abort(self) -> None:
        """Remove every shard of this output, finished or not: a failed run leaves nothing that looks whole."""
        if self._builder is not None:
            self._builder.abort()
            self._builder = None
        for p in self.paths:
            discard_shard(p)


def output_prefixes(prefix: str, keys: Sequence[str]) -> dict[str, str]:
    """One output per json key: PREFIX for a single key, PREFIX_<key> for several."""
    return {k: prefix if len(keys) == 1 else f"{prefix}_{k}" for k in keys}


def existing_outputs(prefix: str, suffix: str = "") -> list[str]:
    """Files a previous run with this prefix left (single or numbered shards), their names ending in `suffix`."""
    found = [p for p in (bin_path(prefix) + suffix, idx_path(prefix) + suffix) if os.path.exists(p)]
    for ext in ("bin", "idx"):
        found += glob.glob(f"{glob.escape(prefix)}_[0-9][0-9][0-9][0-9][0-9].{ext}{glob.escape(suffix)}")
    return sorted(found)


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class Summary:
    """What a run read, wrote and skipped."""

    files: int = 0
    duplicates: int = 0  # inputs left out as another path of a file already read
    symlink_loops: int = 0
    records: int = 0
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    outputs: dict[str, list[str]] = field(default_factory=dict)
    tokenizer: str = ""
    encoder: str = ""

    def report(self) -> str:
        """The human-readable end-of-run summary."""
        docs, toks = sum(self.documents.values()), sum(self.tokens.values())
        secs = max(self.seconds, 1e-9)
        left_out = [f"{n} {what}{'s' if n > 1 else ''} {how}" for n, what, how in (
            (self.duplicates, "duplicate input", "dropped"), (self.symlink_loops, "symlink loop", "skipped")) if n]
        lines = [
            f"read     {self.files} files" + (f" ({', '.join(left_out)})" if left_out else "")
            + f", {self.records:,} records, {format_bytes(self.input_bytes)}",
            f"wrote    {docs:,} documents, {toks:,} tokens, {format_bytes(self.output_bytes)}",
            f"skipped  {sum(self.skipped.values()):,}"
            + (" (" + ", ".join(f"{r}: {n:,}" for r, n in sorted(self.skipped.items())) + ")" if self.skipped else ""),
            f"time     {self.seconds:.2f} s: {self.input_bytes / secs / 1e6:.2f} MB/s, {docs / secs:,.0f} docs/s, "
            f"{toks / secs:,.0f} tokens/s",
            f"encoder  {self.encoder}",
        ]
        for key, paths in self.outputs.items():
            label = f"output[{key}]" if len(self.outputs) > 1 else "output"
            shown = paths if len(paths) <= 3 else [paths[0], "...", paths[-1]]
            lines.append(f"{label:8s} {len(paths)} shard(s): " + ", ".join(f"{p}.bin/.idx" for p in shown))
        return "\n".join(lines)


def _batches(files: Sequence[str], keys: Sequence[str], batch_bytes: int, txt_split: str) -> Iterator[Batch]:
    for path in files:
        yield from read_batches(path, keys, batch_bytes, txt_split)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: str = "byte",
    workers: int = 1,
    json_keys: Sequence[str] = ("text",),
    eod_token: str | None = None,
    max_shard_size: int | None = None,
    strict: bool = False,
    txt_split: str = "file",
    overwrite: bool = False,
    batch_bytes: int = 1 << 20,
    fast_tokenizer: bool = True,
    progress: bool | None = None,
    log=print,
) -> Summary:
    """Tokenize `inputs` into shards under `output_prefix`; returns the run's summary."""
    t0 = time.perf_counter()
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    found = find_inputs(inputs)
    files = found.files
    for line in found.warnings():
        log(f"warning: {line}", file=sys.stderr)
    tok = load_tokenizer(tokenizer, eod_token, fast_backend=fast_tokenizer)
    dtype = token_dtype(tok.vocab_size)
    prefixes = output_prefixes(output_prefix, json_keys)
    stale = [f for p in prefixes.values() for f in existing_outputs(p)]
    if stale and not overwrite:
        raise InputError(f"output exists: {short_list(stale)}; pass --overwrite")
    # A killed run leaves its shards under temporary names; nothing else writes names of this pattern.
    debris = [f for p in prefixes.values() for f in existing_outputs(p, TMP_SUFFIX)]
    for f in debris:
        os.remove(f)
    if debris:
        log(f"removed {len(debris)} temporary file{'s' if len(debris) > 1 else ''} an interrupted run left: "
            f"{short_list(debris)}", file=sys.stderr)

    settings = {"keys": list(json_keys), "txt_split": txt_split, "dtype": dtype.str}
    summary = Summary(files=len(files), duplicates=len(found.duplicates), symlink_loops=found.num_loops,
                      tokenizer=tok.name, encoder=getattr(tok, "fast_backend_note", "built-in"))
    writers = {k: ShardWriter(p, dtype, max_shard_size) for k, p in prefixes.items()}
    shown: Counter = Counter()
    compressed = any(f.endswith((".gz", ".zst")) for f in files)
    bar = Progress(None if compressed else sum(os.path.getsize(f) for f in files), enabled=progress)
    fast = _first_batch_self_check(tok, files, json_keys, txt_split, batch_bytes, log)
    summary.encoder = _encoder_description(tok, fast)

    def consume(result: Encoded) -> None:
        for s in result.skips:
            if strict:
                raise StrictModeError(f"{s}; stopping (--strict)")
            summary.skipped[s.reason] += 1
            shown[s.reason] += 1
            if shown[s.reason] <= MAX_MESSAGES_PER_REASON:
                log(f"skip: {s}", file=sys.stderr)
            if shown[s.reason] == MAX_MESSAGES_PER_REASON:
                log(f"skip: further '{s.reason}' skips are only counted", file=sys.stderr)
        summary.records += result.records
        summary.input_bytes += result.nbytes
        for k, w in writers.items():
            w.write(result.tokens[k], result.lengths[k])
        bar.update(result.nbytes, sum(len(v) for v in result.lengths.values()),
                   sum(len(v) for v in result.tokens.values()))

    batches = _batches(files, json_keys, batch_bytes, txt_split)
    init_args = (tokenizer, eod_token, fast, settings)
    try:
        if workers == 1:
            init_worker(*init_args)
            for b in batches:
                consume(_merge_reader_skips(b, encode_batch(b)))
        else:
            _run_pool(batches, workers, init_args, consume)
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        bar.close()
        raise
    bar.close()
    # Only now does anything under the final names change: new shards replace old ones, then leftovers of an
    # older, longer run (numbered shards past the new last one) are removed.
    for w in writers.values():
        w.publish()
    new = {f for w in writers.values() for p in w.paths for f in (bin_path(p), idx_path(p))}
    for f in stale:
        if f not in new:
            os.remove(f)
    for k, w in writers.items():
        summary.documents[k] = w.documents
        summary.tokens[k] = w.tokens
        summary.outputs[k] = w.paths
        summary.output_bytes += sum(os.path.getsize(bin_path(p)) + os.path.getsize(idx_path(p)) for p in w.paths)
    summary.seconds = time.perf_counter() - t0
    if summary.records == 0 and not summary.skipped:
        log(f"warning: the inputs held no records ({', '.join(files[:3])})", file=sys.stderr)
    return summary


def _merge_reader_skips(batch: Batch, enc: Encoded) -> Encoded:
    enc.skips = enc.skips + batch.skips  # a file-level problem (truncation) comes after the records read before it
    return enc


def _init_pool_worker(*init_args) -> None:
    """`init_worker` in a pool process, which also exits, silently, as soon as the parent process is gone."""
    # The parent's end of this pipe closes when it dies (even by SIGKILL). Left running, the worker would finish
    # its batch for nobody and die on a BrokenPipeError traceback sending the result.
    sentinel = mp.parent_process().sentinel
    threading.Thread(target=_exit_when_readable, args=(sentinel,), daemon=True).start()
    init_worker(*init_args)


def _exit_when_readable(fd: int) -> None:
    mp.connection.wait([fd])
    os._exit(0)  # nothing to clean up or report to: workers write no files and their parent is gone


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored meanwhile, also by processes started meanwhile (an ignored signal stays so in a child)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_pool(batches: Iterator[Batch], workers: int, init_args: tuple, consume) -> None:
    """Encode in `workers` processes, at most a few batches in flight, consuming results in input order."""
    # spawn: a forked child would inherit the tokenizer's thread pool in an unknown state.
    ctx = mp.get_context("spawn")
    # Workers ignore Ctrl-C from their first instruction: the parent alone gets KeyboardInterrupt and stops them,
    # so a Ctrl-C prints one line, not a traceback per worker.
    with _sigint_ignored():
        pool = ctx.Pool(workers, initializer=_init_pool_worker, initargs=init_args)
    with pool:
        pending: deque = deque()
        for b in batches:
            pending.append((b, pool.apply_async(encode_batch, (b,))))
            while len(pending) > 2 * workers:
                done, res = pending.popleft()
                consume(_merge_reader_skips(done, res.get()))
        while pending:
            done, res = pending.popleft()
            consume(_merge_reader_skips(done, res.get()))


def _encoder_description(tok, fast: bool) -> str:
    if not hasattr(tok, "fast"):
        return "built-in byte tokenizer"
    if fast:
        return tok.fast_backend_note
    if tok.fast is not None:
        return "Hugging Face tokenizers (gigatoken disagreed with it on this corpus's first batch)"
    return f"Hugging Face tokenizers (gigatoken: {tok.fast_backend_note})"


def _first_batch_self_check(tok, files, keys, txt_split, batch_bytes, log) -> bool:
    """Use the fast encoder only if it reproduces HF's ids on the corpus's first batch too."""
    if getattr(tok, "fast", None) is None:
        return False
    for path in files:
        for b in read_batches(path, keys, batch_bytes, txt_split):
            texts, _ = document_texts(b, keys, txt_split)
            sample = [t for k in keys for t, _ in texts[k]][:256]
            if sample:
                ok = self_check_on(tok, sample)
                if not ok:
                    log("warning: gigatoken disagrees with Hugging Face on this corpus; using Hugging Face",
                        file=sys.stderr)
                return ok
    return True


# ----------------------------------------------------------------------------------------------- command line
class _DefaultHelpFormatter(argparse.HelpFormatter):
    """Ends the help of every option that takes a value and is not required with one "(default: X)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Flags are off unless given, and help that describes its own default (a None one) says it already.
        if action.required or action.nargs == 0 or "(default: " in text:
            return text
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    """The preprocess_data.py command line."""
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize a corpus into memory-mapped token shards (Megatron's .bin/.idx MMIDIDX layout). "
        "Each document becomes one sequence: its tokens followed by the end-of-document id.",
        formatter_class=_DefaultHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", dest="inputs",
                   help="files, directories (searched recursively, symlinks followed) or globs; .jsonl/.json/.ndjson, "
                   ".txt, .parquet; jsonl and txt may be .gz or .zst compressed; a file reached twice is read once")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx (PREFIX_<key>.* with several --json-keys)")
    p.add_argument("--tokenizer", default="byte", metavar="PATH|byte",
                   help="a Hugging Face tokenizer.json (or a directory holding one), or 'byte' for the built-in "
                   "byte-level tokenizer (byte b is token b, end-of-document is 256)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes; output is identical for any value")
    p.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="JSON/parquet fields holding the text; each key becomes its own output")
    p.add_argument("--eod-token", default=None, metavar="TOKEN",
                   help="end-of-document token appended to every document (default: <|endoftext|> if the tokenizer has "
                   "it, else </s>)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="split the output into PREFIX_00000.bin, PREFIX_00001.bin, ... of at most SIZE bytes of "
                   "tokens each (e.g. 512MB, 2GiB) (default: one shard)")
    p.add_argument("--txt-split", choices=TXT_SPLITS, default="file",
                   help="for .txt inputs: a whole file is one document, or each line is one")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first record that would be skipped (malformed JSON, missing key, invalid "
                   "UTF-8, empty document, damaged file) instead of skipping and counting it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output shards with this prefix (only once the new ones are complete)")
    # A string default goes through `type` like a typed value, so --help shows it as a user would write it.
    p.add_argument("--batch-size", type=parse_size, default="1MB", metavar="SIZE", dest="batch_bytes",
                   help="raw input bytes per work item sent to a worker")
    p.add_argument("--no-fast-tokenizer", dest="fast_tokenizer", action="store_false",
                   help="never use gigatoken, even when installed and checked identical to Hugging Face")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress reports at all; without it, a bar on a terminal, elsewhere a line every 30 s")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/preprocess_data.py and the weft-preprocess console script."""
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(**vars(args))
    except (InputError, TokenizerError, StrictModeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; partial shards removed", file=sys.stderr)
        return 130
    print(summary.report())
    return 0
