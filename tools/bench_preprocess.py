#!/usr/bin/env python3
"""Benchmark the data pipeline on the built-in corpus; prints numbers, asserts nothing.

1. The ceiling: the HF tokenizer's own `encode_batch` over the whole corpus held in memory (all cores).
2. End to end: `tools/preprocess_data.py` as a fresh process (start to files written) for 1 and N workers,
   with Hugging Face tokenizers and, when installed, the gigatoken fast path.
3. One huge document: peak memory of a 1-worker run on a single document of --huge-doc-mb MB.
4. Index building: sample/shuffle indices for a synthetic 10M-document shard, opening that shard, and a blend index.

    python tools/bench_preprocess.py --workdir runs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from engine.data.blended_dataset import build_blend_index  # noqa: E402
from engine.data.builtin_corpus import build_corpus  # noqa: E402
from engine.data.gpt_dataset import GPTDataset  # noqa: E402
from engine.data.indexed_dataset import IndexedDataset, write_index  # noqa: E402
from engine.data.train_tokenizer import train_tokenizer  # noqa: E402


def corpus_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def bench_ceiling(tokenizer: Path, texts: list[str], method: str = "encode_batch") -> dict:
    """HF `encode_batch` on the corpus in memory: the throughput our end-to-end run is measured against.

    `encode_batch_fast` (same ids, no character offsets) is what preprocessing calls; it is timed too.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    encode = getattr(tok, method)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    encode(texts[:50], add_special_tokens=False)  # warm up the thread pool
    t0 = time.perf_counter()
    encs = encode(texts, add_special_tokens=False)
    dt = time.perf_counter() - t0
    ntok = sum(len(e.ids) for e in encs)
    return {"seconds": dt, "mb_s": nbytes / dt / 1e6, "docs_s": len(texts) / dt, "tok_s": ntok / dt,
            "bytes": nbytes, "tokens": ntok}


def bench_end_to_end(corpus: Path, tokenizer: Path, out: Path, workers: int, fast: bool, nbytes: int,
                     ndocs: int) -> dict:
    """One preprocessing run as a fresh process; rates use the corpus's UTF-8 text bytes, like the ceiling."""
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
           str(out), "--tokenizer", str(tokenizer), "--workers", str(workers), "--overwrite", "--no-progress"]
    if not fast:
        cmd.append("--no-fast-tokenizer")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(r.stderr)
    ntok = IndexedDataset(out).num_tokens
    encoder = next((ln.split(None, 1)[1] for ln in r.stdout.splitlines() if ln.startswith("encoder")), "?")
    return {"seconds": dt, "mb_s": nbytes / dt / 1e6, "docs_s": ndocs / dt, "tok_s": ntok / dt, "encoder": encoder}


def write_huge_document(texts: list[str], path: Path, nchars: int) -> None:
    """One jsonl document of `nchars` characters: the corpus's documents back to back, repeated as needed."""
    joined = "\n".join(texts)
    doc = (joined * (nchars // len(joined) + 1))[:nchars]
    path.write_text(json.dumps({"text": doc}) + "\n", encoding="utf-8")


def bench_peak_memory(corpus: Path, tokenizer: Path, out: Path, fast: bool) -> dict:
    """Seconds and peak resident memory of one fresh 1-worker preprocess_data.py run (wait4's ru_maxrss)."""
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
           str(out), "--tokenizer", str(tokenizer), "--workers", "1", "--overwrite", "--no-progress"]
    if not fast:
        cmd.append("--no-fast-tokenizer")
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, which RUSAGE_CHILDREN would not give
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(err.read().decode())
    return {"seconds": dt, "peak_bytes": usage.ru_maxrss * 1024}  # ru_maxrss is in KiB on Linux


def bench_indices(workdir: Path, num_docs: int, seq_len: int) -> dict:
    """Open a synthetic shard of `num_docs` documents (sparse .bin) and build its sample indices, cold cache."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 2000, size=num_docs).astype(np.int32)  # ~1k tokens/doc, ~10B tokens at 10M docs
    prefix = workdir / f"synthetic_{num_docs}"
    t0 = time.perf_counter()
    write_index(f"{prefix}.idx", np.dtype(np.uint16), sizes, np.arange(num_docs + 1))
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(int(sizes.sum(dtype=np.int64)) * 2)  # sparse: no disk used, enough for the reader's checks
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = IndexedDataset(prefix)
    t_open = time.perf_counter() - t0
    samples = int(sizes.sum(dtype=np.int64)) // seq_len  # one epoch
    with tempfile.TemporaryDirectory(dir=workdir) as cache:
        t0 = time.perf_counter()
        gpt = GPTDataset(ds, (0, num_docs), seq_len, samples, seed=1234, cache_dir=cache, log=None)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        GPTDataset(ds, (0, num_docs), seq_len, samples, seed=1234, cache_dir=cache, log=None)
        t_cached = time.perf_counter() - t0
        assert len(gpt) == samples
    os.remove(f"{prefix}.bin")
    os.remove(f"{prefix}.idx")
    return {"docs": num_docs, "samples": samples, "write_idx_s": t_write, "open_s": t_open, "build_s": t_build,
            "cached_s": t_cached}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench", help="where the corpus, tokenizer and outputs go")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="N for the N-worker run")
    p.add_argument("--index-docs", type=int, default=10_000_000, help="documents in the index benchmark")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--blend-samples", type=int, default=1_000_000)
    p.add_argument("--huge-doc-mb", type=float, default=50, help="size of the single-document run; 0 skips it")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokdir = work / "corpus.jsonl", work / f"tokenizer-{args.vocab_size}"
    if not corpus.exists():
        build_corpus(corpus)
    if not (tokdir / "tokenizer.json").exists():
        train_tokenizer([str(corpus)], str(tokdir), vocab_size=args.vocab_size)
    tokenizer = tokdir / "tokenizer.json"
    texts = corpus_texts(corpus)
    print(f"# data pipeline benchmark, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    ceiling = bench_ceiling(tokenizer, texts)
    print(f"corpus: {len(texts):,} documents, {ceiling['bytes'] / 1e6:.1f} MB of text, {ceiling['tokens']:,} tokens "
          f"with a {args.vocab_size}-token byte-level BPE")
    print(f"\n{'run':44s} {'seconds':>8s} {'MB/s':>7s} {'docs/s':>8s} {'tokens/s':>11s} {'x ceiling':>9s}")

    def row(name: str, r: dict) -> None:
        print(f"{name:44s} {r['seconds']:8.2f} {r['mb_s']:7.2f} {r['docs_s']:8.0f} {r['tok_s']:11,.0f} "
              f"{r['mb_s'] / ceiling['mb_s']:9.2f}")

    row("ceiling: HF encode_batch, in memory", ceiling)
    row("HF encode_batch_fast, in memory", bench_ceiling(tokenizer, texts, "encode_batch_fast"))
    ndocs = len(texts)
    huge = work / "huge_document.jsonl"
    if args.huge_doc_mb > 0:
        write_huge_document(texts, huge, int(args.huge_doc_mb * 1e6))
    del texts
    try:
        import gigatoken  # noqa: F401

        fast_variants = [False, True]
    except ImportError:
        fast_variants = [False]
    for fast in fast_variants:
        for workers in sorted({1, args.workers}):
            r = bench_end_to_end(corpus, tokenizer, work / "out", workers, fast, ceiling["bytes"], ndocs)
            label = "gigatoken" if fast else "HF tokenizers"
            row(f"preprocess_data.py, {label}, {workers} worker(s)", r)
    if args.huge_doc_mb > 0:
        size = huge.stat().st_size
        print(f"\none {size / 1e6:.0f} MB document, 1 worker (peak resident memory of the whole process):")
        for fast in fast_variants:
            r = bench_peak_memory(huge, tokenizer, work / "out_huge", fast)
            label = "gigatoken" if fast else "HF tokenizers"
            print(f"  {label:14s} {r['peak_bytes'] / 2**20:8,.0f} MiB ({r['peak_bytes'] / size:.1f}x the document), "
                  f"{r['seconds']:.1f} s")
    print(f"\nindex building ({args.index_docs:,} documents, seq_len {args.seq_len}, cold cache):")
    ix = bench_indices(work, args.index_docs, args.seq_len)
    print(f"  write .idx {ix['write_idx_s']:.2f} s | open shard {ix['open_s'] * 1e3:.1f} ms")
    print(f"  build sample/shuffle indices for {ix['samples']:,} samples: {ix['build_s']:.2f} s "
          f"(reopen from cache {ix['cached_s'] * 1e3:.1f} ms)")
    t0 = time.perf_counter()
    build_blend_index([0.5, 0.3, 0.2], args.blend_samples)
    print(f"  blend index, 3 datasets, {args.blend_samples:,} samples: {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
