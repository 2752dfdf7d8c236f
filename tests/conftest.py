"""Shared fixtures: a small slice of the built-in corpus and a BPE tokenizer trained on it (built once a session)."""

from __future__ import annotations

import os

import pytest

# Keep every test's torch/BLAS from oversubscribing the 2 CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> str:
    """~1 MB of the built-in corpus as jsonl."""
    from engine.data.builtin_corpus import build_corpus

    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    build_corpus(path, max_bytes=1_000_000)
    return str(path)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, stdlib_corpus) -> str:
    """A 1024-token byte-level BPE trained on `stdlib_corpus`; returns the tokenizer.json path."""
    from engine.data.train_tokenizer import train_tokenizer

    return str(train_tokenizer([stdlib_corpus], str(tmp_path_factory.mktemp("tok")), vocab_size=1024))
