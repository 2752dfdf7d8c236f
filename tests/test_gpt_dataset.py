"""GPT samples cut from a shard: shapes, an independent reference stream, epochs, determinism, splits and the cache."""

from __future__ import annotations

import math
import os
import stat
import warnings

import numpy as np
import pytest

import engine.data.gpt_dataset as gpt_dataset
import engine.data.index_cache as index_cache
from engine.data.builder import build_datasets
from engine.data.gpt_dataset import (
    GPTDataset,
    build_sample_index,
    epochs_needed,
    parse_split,
    sample_index_bytes,
    split_documents,
)
from engine.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

# Token = document id * POS + position in the document, so every token names its document and its place in it.
POS = 64


def make_docs(rng: np.random.Generator, n: int, max_len: int = 40) -> list[np.ndarray]:
    """`n` documents of random lengths in [1, max_len] (a quarter of them length 1) with self-describing tokens."""
    lengths = rng.integers(1, max_len + 1, size=n)
    lengths[rng.random(n) < 0.25] = 1
    assert max_len <= POS and n * POS < 2**16
    return [(d * POS + np.arange(length)).astype(np.uint16) for d, length in enumerate(lengths)]


def write_shard(prefix, docs) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return IndexedDataset(prefix)


@pytest.fixture
def shard(tmp_path):
    """A 60-document shard (the documents and the opened reader)."""
    docs = make_docs(np.random.default_rng(1234), 60)
    return docs, write_shard(tmp_path / "shard" / "s", docs)


def samples_in_epochs(epochs: int, tokens: int, seq_len: int) -> int:
    """Samples whose start token k*L lies in the first `epochs` epochs: k*L < epochs*T."""
    return -(-epochs * tokens // seq_len)


def make_ds(indexed, docs_range, seq_len, num_samples, seed, cache_dir, **kw) -> GPTDataset:
    return GPTDataset(indexed, docs_range, seq_len, num_samples, seed, cache_dir=cache_dir, log=None, **kw)


def reference_stream(docs, ds: GPTDataset, start_doc: int) -> np.ndarray:
    """The unshuffled token stream: the split's documents concatenated in `ds.doc_order` order."""
    return np.concatenate([docs[start_doc + int(p)] for p in ds.doc_order]).astype(np.int64)


def read_all(ds, start: int = 0) -> np.ndarray:
    return np.stack([ds[i] for i in range(start, len(ds))])


# ------------------------------------------------------------------------------------------- sample contents


@pytest.mark.parametrize("seq_len", [1, 7, 16, 50])
def test_samples_equal_reference_stream(tmp_path, shard, seq_len):
    """Sample i is tokens [k*L, (k+1)*L] of the split's documents concatenated in doc_order, k = shuffle_index[i]."""
    docs, indexed = shard
    lo, hi = 10, 50  # a split that does not start at document 0: positions are relative to it
    tokens = sum(len(d) for d in docs[lo:hi])
    n = samples_in_epochs(3, tokens, seq_len) - 1
    ds = make_ds(indexed, (lo, hi), seq_len, n, seed=5, cache_dir=tmp_path / "c")
    assert len(ds) == n and ds.tokens_per_epoch == tokens
    stream = reference_stream(docs, ds, lo)
    order = np.asarray(ds.doc_order).reshape(-1, hi - lo)
    assert all(sorted(row) == list(range(hi - lo)) for row in order), "doc_order is not one permutation per epoch"
    for i in range(n):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (seq_len + 1,)
        k = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(sample, stream[k * seq_len : (k + 1) * seq_len + 1], err_msg=f"sample {i}")
    with pytest.raises(IndexError):
        ds[n]
    with pytest.raises(IndexError):
        ds[-1]


def test_empty_documents_are_skipped(tmp_path):
    """Zero-length documents among the split contribute nothing: samples still match the reference stream."""
    rng = np.random.default_rng(7)
    docs = make_docs(rng, 30, max_len=10)
    for d in (0, 4, 5, 17, 29):
        docs[d] = docs[d][:0]
    indexed = write_shard(tmp_path / "holes", docs)
    seq_len = 6
    ds = make_ds(indexed, (0, 30), seq_len, 120, seed=2, cache_dir=tmp_path / "c")
    stream = reference_stream(docs, ds, 0)
    for i in range(len(ds)):
        k = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(ds[i], stream[k * seq_len : (k + 1) * seq_len + 1], err_msg=f"sample {i}")


def test_split_without_tokens_raises(tmp_path):
    """A split whose documents are all empty warns and then raises ValueError (nothing to sample)."""
    empty = np.zeros(0, np.uint16)
    indexed = write_shard(tmp_path / "e", [empty, empty, np.array([1, 2, 3], np.uint16)])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no tokens"):
        make_ds(indexed, (0, 2), 4, 3, seed=0, cache_dir=tmp_path / "c")


def test_samples_cross_document_boundaries(tmp_path, shard):
    """Samples longer than most documents hold pieces of several documents, each piece a whole run in order."""
    docs, indexed = shard
    ds = make_ds(indexed, (0, 60), 100, 30, seed=0, cache_dir=tmp_path / "c")
    multi = 0
    for i in range(len(ds)):
        s = ds[i]
        doc_ids, pos = s // POS, s % POS
        # A boundary is wherever the next token is not the next position of the same document.
        change = np.flatnonzero((np.diff(doc_ids) != 0) | (np.diff(pos) != 1)) + 1
        multi += len(change) > 0
        for c in change:
            assert pos[c] == 0, f"sample {i} enters document {doc_ids[c]} mid-way"
            assert pos[c - 1] == len(docs[doc_ids[c - 1]]) - 1, f"sample {i} leaves document {doc_ids[c - 1]} early"
    assert multi == len(ds)


@pytest.mark.parametrize("seq_len", [5, 13, 64])
def test_each_epoch_is_a_permutation(tmp_path, shard, seq_len):
    """Per epoch, the served samples are exactly those starting in it, and it visits every document once, whole."""
    docs, indexed = shard
    lo, hi = 3, 47
    split_docs = docs[lo:hi]
    tokens = sum(len(d) for d in split_docs)
    epochs = 3
    n = samples_in_epochs(epochs, tokens, seq_len)
    ds = make_ds(indexed, (lo, hi), seq_len, n, seed=11, cache_dir=tmp_path / "c")
    ks = np.asarray(ds.shuffle_index, dtype=np.int64)
    served_epoch = ks * seq_len // tokens
    assert (np.diff(served_epoch) >= 0).all(), "an epoch's samples are served before the previous epoch's end"
    for e in range(epochs):
        want = np.arange(samples_in_epochs(e, tokens, seq_len), samples_in_epochs(e + 1, tokens, seq_len))
        got = np.sort(ks[served_epoch == e])
        np.testing.assert_array_equal(got, want, err_msg=f"epoch {e} samples are not a permutation")
    assert not np.array_equal(ks, np.sort(ks)), "samples are not shuffled"

    # Rebuild the token stream from the served samples alone, then read each epoch's documents off it.
    stream = np.full(n * seq_len + 1, -1, dtype=np.int64)
    for i in range(n):
        k = int(ks[i])
        piece = ds[i]
        seen = stream[k * seq_len : (k + 1) * seq_len + 1]
        assert ((seen == -1) | (seen == piece)).all(), "overlapping samples disagree"
        stream[k * seq_len : (k + 1) * seq_len + 1] = piece
    assert (stream != -1).all()
    assert len(stream) >= epochs * tokens
    order = np.asarray(ds.doc_order)
    for e in range(epochs):
        seg = stream[e * tokens : (e + 1) * tokens]
        visited, t = [], 0
        while t < tokens:
            d = int(seg[t] // POS)
            length = len(docs[d])
            np.testing.assert_array_equal(seg[t : t + length], docs[d], err_msg=f"epoch {e}: document {d} cut")
            visited.append(d)
            t += length
        assert t == tokens
        assert sorted(visited) == list(range(lo, hi)), f"epoch {e} does not visit every document exactly once"
        assert visited == [lo + int(p) for p in order[e * (hi - lo) : (e + 1) * (hi - lo)]], "not in doc_order order"


def test_epochs_needed_is_the_fewest_sufficient():
    """epochs_needed(N, T, L) is the smallest E >= 1 with ceil(E*T/L) >= N, checked by brute force."""
    for n in range(0, 40):
        for tokens in range(1, 25):
            for seq_len in (1, 2, 3, 7, 10, 31):
                e = 1
                while samples_in_epochs(e, tokens, seq_len) < n:
                    e += 1
                assert epochs_needed(n, tokens, seq_len) == e, (n, tokens, seq_len)


# ---------------------------------------------------------------------------------- determinism and extension


def test_deterministic_and_seed_dependent(tmp_path, shard):
    """The same arguments give identical datasets in separate caches; another seed gives another order."""
    _, indexed = shard
    a = make_ds(indexed, (0, 60), 9, 200, seed=3, cache_dir=tmp_path / "a")
    b = make_ds(indexed, (0, 60), 9, 200, seed=3, cache_dir=tmp_path / "b")
    c = make_ds(indexed, (0, 60), 9, 200, seed=4, cache_dir=tmp_path / "c")
    for name in ("doc_order", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(read_all(a), read_all(b))
    assert not np.array_equal(a.doc_order, c.doc_order)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert not np.array_equal(read_all(a), read_all(c))


@pytest.mark.parametrize("seq_len", [4, 17])
def test_more_samples_extend_the_same_stream(tmp_path, shard, seq_len):
    """A dataset of N2 > N1 samples starts with the N1-sample dataset, also when N1 ends mid-way through epoch 2."""
    _, indexed = shard
    lo, hi = 5, 55
    tokens = int(indexed.sizes[lo:hi].sum())
    s1, s2 = samples_in_epochs(1, tokens, seq_len), samples_in_epochs(2, tokens, seq_len)
    n1 = s1 + (s2 - s1) // 2  # mid-way through the second epoch
    n2 = samples_in_epochs(4, tokens, seq_len) - 3  # into the fourth
    small = make_ds(indexed, (lo, hi), seq_len, n1, seed=8, cache_dir=tmp_path / "small")
    big = make_ds(indexed, (lo, hi), seq_len, n2, seed=8, cache_dir=tmp_path / "big")
    assert epochs_needed(n1, tokens, seq_len) == 2 and epochs_needed(n2, tokens, seq_len) == 4
    np.testing.assert_array_equal(read_all(small), np.stack([big[i] for i in range(n1)]))
    np.testing.assert_array_equal(small.shuffle_index, big.shuffle_index[:n1])


def test_resume_reads_the_tail(tmp_path, shard):
    """A freshly opened dataset read from sample k onward gives the tail of a full read of the original."""
    _, indexed = shard
    full = read_all(make_ds(indexed, (0, 60), 12, 300, seed=1, cache_dir=tmp_path / "c"))
    for k in (0, 1, 77, 150, 299):
        reopened = make_ds(IndexedDataset(indexed.prefix), (0, 60), 12, 300, seed=1, cache_dir=tmp_path / "c")
        np.testing.assert_array_equal(read_all(reopened, start=k), full[k:])


# ------------------------------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("split", ["98,1,1", "1,0,0", "0.5/0.5", "8,2", "969,30,1", [3, 1, 1]])
@pytest.mark.parametrize("num_documents", [1, 2, 3, 10, 99, 1000])
def test_split_documents_cover_contiguously(split, num_documents):
    """The train/valid/test ranges tile [0, n) in order, each within one document of its share."""
    ranges = split_documents(num_documents, split)
    assert list(ranges) == ["train", "valid", "test"]
    bounds = [ranges["train"][0]] + [ranges[k][1] for k in ("train", "valid", "test")]
    assert bounds[0] == 0 and bounds[-1] == num_documents
    assert ranges["valid"][0] == ranges["train"][1] and ranges["test"][0] == ranges["valid"][1]
    assert bounds == sorted(bounds)
    fractions = parse_split(split)
    assert math.isclose(sum(fractions), 1.0)
    for (a, b), f in zip(ranges.values(), fractions, strict=True):
        assert abs((b - a) - f * num_documents) <= 1


@pytest.mark.parametrize(("split", "n", "sizes"), [("8,2", 10, (8, 2, 0)), ("98,1,1", 100, (98, 1, 1)),
                                                   ("1,1,1", 3, (1, 1, 1)), ("1,0,0", 7, (7, 0, 0)),
                                                   ("0.5/0.5", 4, (2, 2, 0)), ("2,1,1", 8, (4, 2, 2))])
def test_split_sizes_exact_when_shares_are_whole(split, n, sizes):
    """When every share of n documents is a whole number, each split gets exactly that many."""
    ranges = split_documents(n, split)
    assert tuple(b - a for a, b in ranges.values()) == sizes


def test_parse_split_values():
    """Weights are normalised, missing valid/test weights are zero, '/' works like ','."""
    assert parse_split("8,2") == pytest.approx((0.8, 0.2, 0.0))
    assert parse_split("0.5/0.5") == pytest.approx((0.5, 0.5, 0.0))
    assert parse_split("1") == pytest.approx((1.0, 0.0, 0.0))
    assert parse_split("98,1,1") == pytest.approx((0.98, 0.01, 0.01))


@pytest.mark.parametrize("split", ["", "a,b", "1,,1", "-1,2", "0,0,0", "1,2,3,4", "nan,1", "inf,1", [], [1, -1]])
def test_bad_splits_rejected(split):
    """Empty, non-numeric, negative, all-zero, non-finite and over-long splits raise ValueError."""
    with pytest.raises(ValueError, match=r"data\.split"):
        parse_split(split)
    with pytest.raises(ValueError):
        split_documents(10, split)


def test_empty_validation_split_warns_and_is_none(tmp_path, shard):
    """A split giving validation no documents warns and yields None for it, while train is still built."""
    _, indexed = shard
    with pytest.warns(UserWarning, match="valid"):
        out = build_datasets(indexed.prefix, "1,0,0", 8, {"train": 20, "valid": 5}, 0, cache_dir=str(tmp_path / "c"))
    assert out["valid"] is None
    assert isinstance(out["train"], GPTDataset) and len(out["train"]) == 20
    assert "test" not in out  # no samples asked for


def test_empty_train_split_raises(tmp_path, shard):
    """A split that leaves training no documents raises ValueError saying so."""
    _, indexed = shard
    with pytest.raises(ValueError, match="no training documents"):
        build_datasets(indexed.prefix, "0,1,0", 8, {"train": 20, "valid": 5}, 0, cache_dir=str(tmp_path / "c"))


def test_build_datasets_uses_the_split_ranges(tmp_path, shard):
    """build_datasets gives each split the document range split_documents assigns it, and only those documents."""
    docs, indexed = shard
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = build_datasets(indexed.prefix, "6,2,2", 8, {"train": 40, "valid": 9, "test": 9}, 2,
                             cache_dir=str(tmp_path / "c"))
    for name, (lo, hi) in split_documents(60, "6,2,2").items():
        ds = out[name]
        doc_ids = np.unique(read_all(ds) // POS)
        assert lo <= doc_ids.min() and doc_ids.max() < hi, name
        assert ds.tokens_per_epoch == sum(len(d) for d in docs[lo:hi])


# ------------------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_and_memory_mapped(tmp_path, shard, monkeypatch):
    """A second construction with the same arguments loads the memory-mapped arrays instead of rebuilding."""
    _, indexed = shard
    calls = []
    real = gpt_dataset.build_sample_index

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gpt_dataset, "build_sample_index", counting)
    logs: list[str] = []
    first = GPTDataset(indexed, (0, 60), 10, 100, 7, cache_dir=tmp_path / "c", log=logs.append)
    second = GPTDataset(indexed, (0, 60), 10, 100, 7, cache_dir=tmp_path / "c", log=logs.append)
    assert len(calls) == 1
    assert len([m for m in logs if "building" in m]) == 1
    for name in ("doc_order", "sample_index", "shuffle_index"):
        assert isinstance(getattr(second, name), np.memmap), name
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # Any argument that changes the samples changes the cache entry.
    GPTDataset(indexed, (0, 60), 10, 101, 7, cache_dir=tmp_path / "c", log=None)
    GPTDataset(indexed, (0, 60), 11, 100, 7, cache_dir=tmp_path / "c", log=None)
    GPTDataset(indexed, (0, 60), 10, 100, 8, cache_dir=tmp_path / "c", log=None)
    GPTDataset(indexed, (1, 60), 10, 100, 7, cache_dir=tmp_path / "c", log=None)
    assert len(calls) == 5


def test_shard_rewritten_in_place_rebuilds_the_index(tmp_path):
    """Same path, same size, same token count, documents reordered: the cached index is not reused."""
    docs = [np.full(n, i, dtype=np.uint16) for i, n in enumerate([5, 3, 7, 2, 9, 4])]
    first = make_ds(write_shard(tmp_path / "s", docs), (0, 6), 4, 10, 0, tmp_path / "c")
    before = read_all(first)
    again = make_ds(write_shard(tmp_path / "s", docs[::-1]), (0, 6), 4, 10, 0, tmp_path / "c")
    stream = reference_stream(docs[::-1], again, 0)
    for i in range(len(again)):
        k = int(again.shuffle_index[i])
        np.testing.assert_array_equal(again[i], stream[k * 4 : k * 4 + 5])
    assert len(list((tmp_path / "c").glob("*.json"))) == 2 and before.shape == read_all(again).shape


def test_default_cache_beside_the_shards(shard):
    """Without a cache_dir the indices go to index-cache/ beside a writable shard directory."""
    _, indexed = shard
    GPTDataset(indexed, (0, 60), 10, 50, 7, log=None)
    beside = os.path.join(os.path.dirname(indexed.prefix), "index-cache")
    assert any(f.endswith(".json") for f in os.listdir(beside))


def test_read_only_shard_dir_falls_back_to_user_cache(tmp_path, shard, monkeypatch):
    """When the shard directory is not writable the indices go to $WEFT_CACHE_DIR/index-cache."""
    _, indexed = shard
    shard_dir = os.path.dirname(indexed.prefix)
    user = tmp_path / "user-cache"
    monkeypatch.setenv("WEFT_CACHE_DIR", str(user))
    os.chmod(shard_dir, 0o555)
    try:
        if os.access(shard_dir, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        ds = GPTDataset(indexed, (0, 60), 10, 50, 7, log=None)
        assert len(ds[0]) == 11
    finally:
        os.chmod(shard_dir, stat.S_IRWXU)
    assert not os.path.exists(os.path.join(shard_dir, "index-cache"))
    assert any(f.endswith(".json") for f in os.listdir(user / "index-cache"))


def test_unwritable_cache_beside_falls_back_to_user_cache(tmp_path, shard, monkeypatch):
    """If index-cache/ beside the shards is not writable (os.access says so), the user cache dir is used."""
    _, indexed = shard
    beside = os.path.realpath(os.path.join(os.path.dirname(indexed.prefix), "index-cache"))
    user = tmp_path / "user-cache"
    monkeypatch.setenv("WEFT_CACHE_DIR", str(user))
    real_access = os.access
    monkeypatch.setattr(index_cache.os, "access",
                        lambda p, mode, **kw: False if os.path.realpath(p) == beside else real_access(p, mode, **kw))
    ds = GPTDataset(indexed, (0, 60), 10, 50, 7, log=None)
    assert len(ds[0]) == 11
    assert not os.listdir(beside)
    assert any(f.endswith(".json") for f in os.listdir(user / "index-cache"))


# ----------------------------------------------------------------------------------------------- edge cases


def test_split_smaller_than_one_sample_repeats_and_warns(tmp_path):
    """A split of fewer tokens than seq_len warns, and its samples are full-length cuts of the repeated documents."""
    docs = [np.array([7, 8], np.uint16), np.array([500], np.uint16), np.array([9, 10, 11], np.uint16)]
    indexed = write_shard(tmp_path / "tiny", docs)
    seq_len = 16
    with pytest.warns(UserWarning, match="fewer than one sample"):
        ds = make_ds(indexed, (0, 2), seq_len, 5, seed=0, cache_dir=tmp_path / "c")
    stream = reference_stream(docs, ds, 0)
    for i in range(5):
        s = ds[i]
        assert s.shape == (seq_len + 1,)
        assert set(s.tolist()) == {7, 8, 500}  # only the split's tokens, the third document never
        k = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(s, stream[k * seq_len : (k + 1) * seq_len + 1])


def test_single_token_split(tmp_path):
    """A split of one length-1 document gives samples of seq_len+1 copies of that token."""
    indexed = write_shard(tmp_path / "one", [np.array([42], np.uint16), np.array([1, 2], np.uint16)])
    with pytest.warns(UserWarning):
        ds = make_ds(indexed, (0, 1), 3, 4, seed=0, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(read_all(ds), np.full((4, 4), 42))


@pytest.mark.parametrize("docs_range", [(0, 61), (-1, 5), (5, 5), (10, 3), (60, 61)])
def test_document_range_outside_shard_rejected(tmp_path, shard, docs_range):
    """Empty, reversed, negative and past-the-end document ranges raise ValueError."""
    _, indexed = shard
    with pytest.raises(ValueError, match="document range"):
        make_ds(indexed, docs_range, 8, 10, seed=0, cache_dir=tmp_path / "c")


def test_bad_lengths_rejected(tmp_path, shard):
    """seq_len < 1 and negative num_samples raise ValueError."""
    _, indexed = shard
    with pytest.raises(ValueError):
        make_ds(indexed, (0, 60), 0, 10, seed=0, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError):
        make_ds(indexed, (0, 60), 8, -1, seed=0, cache_dir=tmp_path / "c")


@pytest.mark.parametrize(("docs", "seq_len", "samples"), [(1000, 128, 50_000), (50, 1024, 2000), (20_000, 32, 5000),
                                                         (10, 256, 3000)])
def test_the_index_memory_estimate_bounds_the_build(docs, seq_len, samples):
    """What the memory check counts on before building: at least the build's measured peak, at most 1.5 times it."""
    import tracemalloc

    sizes = np.random.default_rng(0).integers(5, 2000, docs)
    tracemalloc.start()
    build_sample_index(sizes, seq_len, samples, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = sample_index_bytes(docs, int(sizes.sum()), seq_len, samples)
    assert peak <= estimate <= 1.5 * peak


def test_an_index_too_big_for_memory_is_refused_before_building(tmp_path, monkeypatch):
    """build_datasets checks the indices against the free memory first: a clear error, and nothing is built."""
    import engine.data.builder as builder

    prefix = write_shard(tmp_path / "s", [np.arange(100)] * 20).prefix
    monkeypatch.setattr(builder, "available_host_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"sample indices for 1,000,000 train samples of 16 tokens would take "
                                         r"[\d.]+ GiB, more than the 0.0 GiB of memory free: lower train.steps"):
        build_datasets(prefix, "100,0,0", 16, {"train": 1_000_000}, 1, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
