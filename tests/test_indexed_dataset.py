"""The MMIDIDX shard format: round trips, interoperability with an independent writer, and corrupt files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from engine.data import indexed_dataset
from engine.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    ShardFormatError,
    merge_shards,
    token_dtype,
)
from engine.data.inspect_shards import main as inspect_main


def random_docs(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    return [rng.integers(0, high, size=rng.integers(0, 300)) for _ in range(n)]


def write_shard(prefix, docs, dtype) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)


@pytest.mark.parametrize("vocab", [300, 65_499, 65_500, 200_000])
def test_round_trip_random_lengths(tmp_path, vocab):
    """Every document written comes back identical, in uint16 below a 65,500 vocabulary and int32 from it on."""
    rng = np.random.default_rng(vocab)
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65_500 else np.int32)
    docs = random_docs(rng, 200, vocab)
    write_shard(tmp_path / "s", docs, dtype)
    ds = IndexedDataset(tmp_path / "s")
    ds.verify()
    assert ds.dtype == dtype and len(ds) == ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for got, want in zip((ds[i] for i in range(len(ds))), docs, strict=True):
        np.testing.assert_array_equal(got, want)
    assert ds[-1].tolist() == docs[-1].tolist()
    for i in (i for i, d in enumerate(docs) if len(d) >= 3):
        np.testing.assert_array_equal(ds.get(i, 1, 2), docs[i][1:3])


def test_add_flat_equals_add_document(tmp_path):
    """Appending documents as one flat array gives the same files as appending them one by one."""
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 50, 1000)
    write_shard(tmp_path / "a", docs, np.uint16)
    with IndexedDatasetBuilder(tmp_path / "b", np.uint16) as b:
        b.add_flat(np.concatenate(docs), np.array([len(d) for d in docs]))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def independent_write(prefix, docs, dtype_code, np_dtype, sentences_per_doc=1) -> None:
    """A minimal MMIDIDX writer straight from the byte layout, sharing no code with the engine."""
    seqs = [np.asarray(d, dtype=np_dtype) for d in docs]
    with open(f"{prefix}.bin", "wb") as f:
        for s in seqs:
            f.write(s.tobytes())
    sizes = [len(s) for s in seqs]
    pointers, off = [], 0
    for n in sizes:
        pointers.append(off)
        off += n * np.dtype(np_dtype).itemsize
    doc_idx = list(range(0, len(seqs) + 1, sentences_per_doc))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", dtype_code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize(("code", "np_dtype"), [(8, np.uint16), (4, np.int32), (5, np.int64), (1, np.uint8)])
def test_reads_independently_written_pair(tmp_path, code, np_dtype):
    """A pair written from the byte layout by hand (as Megatron writes it) reads back exactly."""
    rng = np.random.default_rng(code)
    docs = random_docs(rng, 40, 250)
    independent_write(tmp_path / "m", docs, code, np_dtype)
    ds = IndexedDataset(str(tmp_path / "m") + ".idx")  # a .bin/.idx path is accepted as the prefix
    ds.verify()
    assert ds.dtype == np_dtype and len(ds) == 40
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)


def test_multi_sequence_documents_and_merge(tmp_path):
    """Megatron shards with several sequences per document keep their document boundaries through a merge."""
    rng = np.random.default_rng(1)
    docs = random_docs(rng, 12, 100)
    independent_write(tmp_path / "a", docs, 8, np.uint16, sentences_per_doc=3)
    write_shard(tmp_path / "b", docs[:5], np.uint16)
    merged = merge_shards([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"))
    merged.verify()
    assert merged.num_documents == 4 + 5 and len(merged) == 17
    assert merged.doc_index.tolist() == [0, 3, 6, 9, 12, 13, 14, 15, 16, 17]
    for i, d in enumerate(docs + docs[:5]):
        np.testing.assert_array_equal(merged[i], d)


def test_merge_rejects_mixed_dtypes_and_leaves_no_output(tmp_path):
    """Merging uint16 with int32 shards fails clearly and writes nothing under the output name."""
    write_shard(tmp_path / "a", [np.arange(5)], np.uint16)
    write_shard(tmp_path / "b", [np.arange(5)], np.int32)
    with pytest.raises(ShardFormatError, match="cannot merge"):
        merge_shards([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"))
    assert not list(tmp_path.glob("ab*"))


def test_failed_write_leaves_no_shard(tmp_path):
    """An exception while writing removes the partial files: no half shard can be mistaken for a whole one."""
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(tmp_path / "s", np.uint16) as b:
        b.add_document(np.arange(10))
        raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())


def test_empty_shard(tmp_path):
    """A shard with no documents is valid and empty."""
    write_shard(tmp_path / "e", [], np.uint16)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


# ------------------------------------------------------------------------------------------------ corrupt files
@pytest.fixture
def good_shard(tmp_path):
    docs = [np.arange(1, 11), np.arange(20, 25), np.arange(30, 60)]
    write_shard(tmp_path / "g", docs, np.uint16)
    return tmp_path / "g"


def _patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "missing_idx": (lambda p: p.with_suffix(".idx").unlink(), r"g\.idx: no such file"),
    "missing_bin": (lambda p: p.with_suffix(".bin").unlink(), r"g\.bin: no such file"),
    "idx_shorter_than_header": (lambda p: p.with_suffix(".idx").write_bytes(b"MMIDIDX"), r"shorter than the 34-byte"),
    "idx_truncated": (
        lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-5]),
        r"g\.idx: .* truncated or corrupt",
    ),
    "bad_magic": (lambda p: _patch(p.with_suffix(".idx"), 0, b"NOTANIDX!"), r"not an MMIDIDX index"),
    "bad_version": (lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 7)), r"index version 7"),
    "bad_dtype": (lambda p: _patch(p.with_suffix(".idx"), 17, bytes([42])), r"unknown token dtype code 42"),
    "bin_truncated": (
        lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-3]),
        r"g\.bin: .* truncated or belongs to another index",
    ),
    "bin_of_another_shard": (
        lambda p: p.with_suffix(".bin").write_bytes(b"\x00" * 200), r"g\.bin: 200 bytes but .* describes 90"
    ),
    "doc_index_broken": (lambda p: _patch(p.with_suffix(".idx"), 34 + 3 * 12, struct.pack("<q", 5)),
                         r"document index does not span"),
    # Second pointer 20 -> 4: the ends still agree with the .bin, only the sampled pointer check sees it.
    "pointer_contradicts_sizes": (lambda p: _patch(p.with_suffix(".idx"), 34 + 3 * 4 + 8, struct.pack("<q", 4)),
                                  r"g\.idx: pointer of sequence 1 is 4, but sequence 0 .* ends at byte 20"),
    "last_size_negative": (lambda p: _patch(p.with_suffix(".idx"), 34 + 2 * 4, struct.pack("<i", -1)),
                           r"g\.idx: last sequence size is -1, negative"),
    # doc_index [0, 1, 2, 3] -> [0, 3, 1, 3]: right ends, wrong order.
    "doc_index_decreasing": (lambda p: _patch(p.with_suffix(".idx"), 34 + 3 * 12 + 8, struct.pack("<qq", 3, 1)),
                             r"g\.idx: document index decreases at document 2 \(3 -> 1\)"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_pair_gives_clear_error(good_shard, case):
    """Each kind of damage raises ShardFormatError naming the damaged file, never garbage or a crash."""
    damage, message = CORRUPTIONS[case]
    damage(good_shard)
    with pytest.raises(ShardFormatError, match=message):
        IndexedDataset(good_shard)


@pytest.fixture
def shard_bad_past_sample(tmp_path, monkeypatch):
    """A 4-sequence shard whose third pointer is wrong, opened with a 1-pair sample that misses it."""
    write_shard(tmp_path / "b", [np.arange(1, 11), np.arange(5), np.arange(7), np.arange(3)], np.uint16)
    _patch(tmp_path / "b.idx", 34 + 4 * 4 + 2 * 8, struct.pack("<q", 2))  # pointer 30 -> 2; pair 0 still fine
    monkeypatch.setattr(indexed_dataset, "OPEN_CHECK_SAMPLES", 1)
    return tmp_path / "b"


def test_verify_checks_every_pointer_the_open_sample_missed(shard_bad_past_sample):
    """Opening samples pointer pairs; verify() checks all of them and names the first bad one."""
    ds = IndexedDataset(shard_bad_past_sample)
    with pytest.raises(ShardFormatError, match=r"b\.idx: pointer of sequence 2 is 2, but sequence 1"):
        ds.verify()


def test_open_checks_a_sample_of_pointers_across_a_large_shard(tmp_path):
    """On a shard with far more sequences than the sample, a bad pointer near the end is still found at open."""
    n = 20 * indexed_dataset.OPEN_CHECK_SAMPLES
    with IndexedDatasetBuilder(tmp_path / "big", np.uint16) as b:
        b.add_flat(np.zeros(n, np.uint16), np.ones(n, np.int32))
    _patch(tmp_path / "big.idx", 34 + n * 4 + (n - 2) * 8, struct.pack("<q", 0))  # second-to-last pointer
    # Pair n-2 (an end of the evenly spaced sample) sees it; pair n-3 does too if it falls in the sample.
    with pytest.raises(ShardFormatError, match=rf"big\.idx: pointer of sequence ({n - 2} is 0|{n - 1} is)"):
        IndexedDataset(tmp_path / "big")


def test_inspect_verify_reports_what_it_checked(good_shard, capsys):
    """--verify says which shard it verified, its counts, and what was checked."""
    assert inspect_main([str(good_shard), "--verify"]) == 0
    out = capsys.readouterr().out
    assert (f"verified {good_shard}: 3 documents, 3 sequences, 45 tokens in a 90-byte .bin; every size, "
            "pointer and document-index entry consistent") in out


def test_inspect_verify_fails_on_a_bad_shard(shard_bad_past_sample, capsys):
    """--verify exits non-zero on a bad shard, naming the file and the first bad pointer, and prints no 'verified'."""
    assert inspect_main([str(shard_bad_past_sample), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert "verified" not in out and "error: " in err and "b.idx: pointer of sequence 2 is 2" in err


def test_out_of_range_reads_raise(good_shard):
    """Reads past a sequence or past the shard raise IndexError instead of returning neighbouring tokens."""
    ds = IndexedDataset(good_shard)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get(1, 2, 4)
