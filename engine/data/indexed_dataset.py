"""Token shards in Megatron's MMIDIDX layout: `PREFIX.bin` holds the tokens, `PREFIX.idx` says where each sequence is.

The `.idx` file is, in order (little endian):
    magic        9 bytes  b"MMIDIDX\\x00\\x00"
    version      uint64   1
    dtype code   uint8    (see DTYPE_CODES)
    n_sequences  uint64
    n_doc_index  uint64   (number of documents + 1)
    sizes        int32[n_sequences]      tokens per sequence
    pointers     int64[n_sequences]      byte offset of each sequence in the .bin
    doc_index    int64[n_doc_index]      document d spans sequences doc_index[d]:doc_index[d+1]

The writer and the reader share this module so the layout lives in exactly one place. In our shards each document
is one sequence; datasets written by Megatron with several sequences per document read fine.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_sequences, n_doc_index
HEADER_SIZE = _HEADER.size  # 34 bytes

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

# Megatron's rule: uint16 tokens while every id fits with room to spare, int32 beyond.
UINT16_VOCAB_LIMIT = 65500


# Pointer pairs and document-index steps checked when a shard is opened (evenly spaced, both ends included).
OPEN_CHECK_SAMPLES = 1000
# Entries per step of IndexedDataset.verify (a few arrays of this many int64s at a time).
VERIFY_CHUNK = 1 << 22


class ShardFormatError(ValueError):
    """A `.bin`/`.idx` pair that is missing, truncated or not in the MMIDIDX layout."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token dtype for a vocabulary of `vocab_size` ids (uint16 below 65,500, else int32)."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


# Appended to a shard's file names until it is published whole.
TMP_SUFFIX = ".tmp"


def idx_path(prefix: str | os.PathLike) -> str:
    """The index file of a shard prefix."""
    return f"{os.fspath(prefix)}.idx"


def bin_path(prefix: str | os.PathLike) -> str:
    """The token file of a shard prefix."""
    return f"{os.fspath(prefix)}.bin"


def shard_prefix(path: str | os.PathLike) -> str:
    """Accept `x`, `x.bin` or `x.idx` and return the prefix `x`."""
    p = os.fspath(path)
    return p[:-4] if p.endswith((".bin", ".idx")) else p


def unique_prefixes(paths: Sequence[str]) -> list[str]:
    """Shard prefixes from prefixes or .bin/.idx paths (a shell glob gives both), order kept."""
    out: list[str] = []
    for p in paths:
        prefix = shard_prefix(p)
        if prefix not in out:
            out.append(prefix)
    return out


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """Up to k distinct indices spread evenly over range(n), first and last included (all of them if n <= k)."""
    if n <= k:
        return np.arange(max(n, 0))
    return np.unique(np.linspace(0, n - 1, k).astype(np.int64))


def write_index(path: str | os.PathLike, dtype: np.dtype, sizes: np.ndarray, doc_index: np.ndarray) -> None:
    """Write an `.idx` file for sequences of `sizes` tokens stored back to back in a `.bin` of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
        raise ValueError(f"token dtype {dtype} has no MMIDIDX code; use one of {sorted(map(str, _CODE_OF))}")
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    doc_index = np.asarray(doc_index, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[dtype], len(sizes), len(doc_index)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_index.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Append documents to a new shard; files appear under their final names only when `finalize` succeeds."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = shard_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"token dtype {self.dtype} has no MMIDIDX code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = bin_path(self.prefix) + TMP_SUFFIX
        self._bin = open(self._bin_tmp, "wb")
        # Compact typed arrays: a shard can hold tens of millions of documents.
        self._sizes = array("i")
        self._doc_index = array("q", [0])
        self.num_tokens = 0

    @property
    def num_bytes(self) -> int:
        """Bytes of tokens written so far."""
        return self.num_tokens * self.dtype.itemsize

    @property
    def num_documents(self) -> int:
        """Documents written so far."""
        return len(self._sizes)

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document as one sequence."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(len(arr))
        self._doc_index.append(len(self._sizes))
        self.num_tokens += len(arr)

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents given back to back in `flat`, document i being `lengths[i]` tokens."""
        flat = np.asarray(flat).astype(self.dtype, copy=False)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != len(flat):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(flat)} tokens were given")
        self._bin.write(flat.tobytes(order="C"))
        base = len(self._sizes)
        self._sizes.frombytes(lengths.tobytes())
        self._doc_index.frombytes(np.arange(base + 1, base + len(lengths) + 1, dtype=np.int64).tobytes())
        self.num_tokens += len(flat)

    def add_index(self, other: IndexedDataset) -> None:
        """Append every sequence of an existing shard (same dtype), keeping its document boundaries."""
        if other.dtype != self.dtype:
            raise ShardFormatError(f"cannot merge {other.prefix} ({other.dtype}) into a {self.dtype} shard")
        base = len(self._sizes)
        # Stream the token bytes in chunks so merging never holds a whole shard in memory.
        with open(bin_path(other.prefix), "rb") as src:
            while chunk := src.read(64 << 20):
                self._bin.write(chunk)
        self._sizes.frombytes(other.sizes.tobytes())
        self._doc_index.frombytes((other.doc_index[1:] + base).tobytes())
        self.num_tokens += int(other.sizes.sum(dtype=np.int64))

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def finalize(self, publish: bool = True) -> None:
        """Write the index; with `publish`, move both files to their final names (else see `publish_shard`)."""
        self._bin.close()
        write_index(idx_path(self.prefix) + TMP_SUFFIX, self.dtype, np.frombuffer(self._sizes, np.int32),
                    np.frombuffer(self._doc_index, np.int64))
        if publish:
            publish_shard(self.prefix)

    def abort(self) -> None:
        """Drop the partial files."""
        self._bin.close()
        discard_shard(self.prefix)


def publish_shard(prefix: str) -> None:
    """Move a finalized shard's temporary files to their final names (the .bin first: the .idx marks it whole)."""
    os.replace(bin_path(prefix) + TMP_SUFFIX, bin_path(prefix))
    os.replace(idx_path(prefix) + TMP_SUFFIX, idx_path(prefix))


def discard_shard(prefix: str) -> None:
    """Remove a shard's temporary files, if any."""
    for p in (bin_path(prefix) + TMP_SUFFIX, idx_path(prefix) + TMP_SUFFIX):
        if os.path.exists(p):
            os.remove(p)


class IndexedDataset:
    """Read-only, zero-copy view of a shard: `ds[i]` is sequence i as a numpy array backed by the memory map."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = shard_prefix(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise ShardFormatError(f"{p}: no such file (a shard is a PREFIX.bin + PREFIX.idx pair)")
        idx_size = os.path.getsize(ipath)
        if idx_size < HEADER_SIZE:
            raise ShardFormatError(f"{ipath}: {idx_size} bytes, shorter than the {HEADER_SIZE}-byte MMIDIDX header")
        with open(ipath, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise ShardFormatError(f"{ipath}: not an MMIDIDX index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ShardFormatError(f"{ipath}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise ShardFormatError(f"{ipath}: unknown token dtype code {code}")
        expected = HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
        if idx_size != expected:
            raise ShardFormatError(
                f"{ipath}: {idx_size} bytes but its header ({n_seq} sequences, {n_doc} document entries) needs "
                f"{expected}; the file is truncated or corrupt"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        buf = self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=HEADER_SIZE + 4 * n_seq)
        self.doc_index = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=HEADER_SIZE + 12 * n_seq)
        self._check_on_open(ipath, bpath)
        bin_size = os.path.getsize(bpath)
        # np.memmap cannot map an empty file; an empty shard has no tokens to read anyway.
        self._bin = np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def _check_on_open(self, ipath: str, bpath: str) -> None:
        """O(1) and sampled consistency checks that catch truncation, mismatched pairs and corrupt indexes at open."""
        n_seq = len(self.sizes)
        bin_size = os.path.getsize(bpath)
        if len(self.doc_index) == 0 or self.doc_index[0] != 0 or self.doc_index[-1] != n_seq:
            raise ShardFormatError(f"{ipath}: document index does not span the {n_seq} sequences; corrupt index")
        if n_seq == 0:
            need = 0
        else:
            if self.pointers[0] != 0:
                raise ShardFormatError(f"{ipath}: first sequence pointer is {self.pointers[0]}, expected 0")
            if self.sizes[-1] < 0:  # the pair checks below cover every other size
                raise ShardFormatError(f"{ipath}: last sequence size is {self.sizes[-1]}, negative")
            need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize
        if bin_size != need:
            raise ShardFormatError(
                f"{bpath}: {bin_size} bytes but {ipath} describes {need}; the .bin is truncated or belongs to "
                "another index"
            )
        # Fancy indexing a memory map reads only the sampled pages, so this stays cheap on huge shards.
        self._check_pointers(_evenly_spaced(n_seq - 1, OPEN_CHECK_SAMPLES))
        self._check_doc_index(_evenly_spaced(len(self.doc_index) - 1, OPEN_CHECK_SAMPLES))

    def _check_pointers(self, i: np.ndarray) -> None:
        """Raise on the first i (in order) whose size is negative or whose next pointer is not where size i puts it."""
        sizes, start, nxt = self.sizes[i].astype(np.int64), self.pointers[i], self.pointers[i + 1]
        end = start + sizes * self.dtype.itemsize
        bad = np.flatnonzero((sizes < 0) | (nxt != end))
        if len(bad):
            j, k = int(i[bad[0]]), int(bad[0])
            raise ShardFormatError(
                f"{idx_path(self.prefix)}: pointer of sequence {j + 1} is {nxt[k]}, but sequence {j} at byte "
                f"{start[k]} with {sizes[k]} tokens ends at byte {end[k]}; corrupt index"
            )

    def _check_doc_index(self, d: np.ndarray) -> None:
        """Raise on the first d (in order) where the document index decreases from entry d to entry d + 1."""
        lo, hi = self.doc_index[d], self.doc_index[d + 1]
        bad = np.flatnonzero(hi < lo)
        if len(bad):
            k = int(bad[0])
            raise ShardFormatError(
                f"{idx_path(self.prefix)}: document index decreases at document {int(d[k]) + 1} ({lo[k]} -> "
                f"{hi[k]}); corrupt index"
            )

    def verify(self) -> None:
        """Full O(n) check: sizes non-negative, pointers where the sizes put them, document index non-decreasing."""
        # In chunks, so memory stays bounded on huge shards.
        for n, check in ((len(self.sizes) - 1, self._check_pointers), (len(self.doc_index) - 1, self._check_doc_index)):
            for lo in range(0, max(n, 0), VERIFY_CHUNK):
                check(np.arange(lo, min(lo + VERIFY_CHUNK, n)))

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        """Documents (not sequences) in the shard."""
        return len(self.doc_index) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in the shard."""
        return int(self.sizes.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        return self.get(int(i) % len(self))

    def all_tokens(self) -> np.ndarray:
        """Every token of the shard, back to back, as one read-only view."""
        return self._bin.view(self.dtype)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence i, as a read-only view (no copy)."""
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of size {size}")
        start = int(self.pointers[i]) + offset * self.dtype.itemsize
        return self._bin[start : start + length * self.dtype.itemsize].view(self.dtype)


def merge_shards(prefixes: Sequence[str], output_prefix: str) -> IndexedDataset:
    """Concatenate shards (same dtype) into one, in the order given."""
    if not prefixes:
        raise ValueError("merge_shards needs at least one input shard")
    shards = [IndexedDataset(p) for p in prefixes]
    builder = IndexedDatasetBuilder(output_prefix, shards[0].dtype)
    try:
        for shard in shards:
            builder.add_index(shard)
    except BaseException:
        builder.abort()
        raise
    builder.finalize()
    return IndexedDataset(output_prefix)
