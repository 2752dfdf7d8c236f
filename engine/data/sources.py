"""Reading raw corpus files: find them, open them (plain, .gz, .zst), and cut them into batches of raw records.

Raw records stay undecoded here (bytes for jsonl lines and text files, Python values for parquet cells) so that the
expensive part - parsing, decoding, tokenizing - happens in the worker processes. Problems found while reading a
whole file (unreadable, truncated compression, bad parquet) are reported as `Skip` records in the batch stream.
"""

from __future__ import annotations

import errno
import glob
import gzip
import io
import json
import os
import stat
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst")
TXT_SPLITS = ("file", "line")
# Messages of one kind printed one by one before the rest are only counted.
MAX_MESSAGES_PER_REASON = 5


class InputError(ValueError):
    """An input that cannot be read at all (no such file, unknown format, nothing matched)."""


@dataclass(frozen=True)
class Skip:
    """One document (or a whole file's remainder) left out, and why."""

    reason: str
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Batch:
    """Raw records of one file: jsonl lines, text documents, or parquet rows (dicts of the requested keys)."""

    path: str
    kind: str  # "jsonl" | "text" | "parquet"
    first_line: int  # 1-based line (jsonl), document (text) or row (parquet) number of records[0]
    records: list = field(default_factory=list)
    nbytes: int = 0  # raw bytes this batch accounts for, for throughput
    skips: list[Skip] = field(default_factory=list)  # file-level problems met while reading this batch


def file_kind(path: str | os.PathLike) -> str:
    """'jsonl', 'text' or 'parquet' from the file name (compression suffixes ignored)."""
    name = os.fspath(path).lower()
    for suf in COMPRESSION_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise InputError(
        f"{path}: unknown input format; expected .jsonl, .txt or .parquet (optionally .gz or .zst for jsonl/txt)"
    )


def _is_supported(path: Path) -> bool:
    try:
        file_kind(path)
        return True
    except InputError:
        return False


@dataclass
class InputFiles:
    """The files to read, in order, and what was left out while finding them."""

    files: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path left out, earlier path of that file)
    loops: dict[str, list[str]] = field(default_factory=dict)  # input -> symlink loops met under it

    @property
    def num_loops(self) -> int:
        """Symlink loops skipped, over all inputs."""
        return sum(len(v) for v in self.loops.values())

    def warnings(self) -> list[str]:
        """One line per duplicate left out (the first few, then a count) and per input holding symlink loops."""
        lines = []
        for dup, kept in self.duplicates[:MAX_MESSAGES_PER_REASON]:
            why = "named by an earlier input too" if dup == kept else f"same file as {kept}"
            lines.append(f"dropped duplicate input {dup} ({why})")
        if len(self.duplicates) > MAX_MESSAGES_PER_REASON:
            lines.append(f"dropped {len(self.duplicates) - MAX_MESSAGES_PER_REASON} more duplicate inputs")
        for where, paths in self.loops.items():
            lines.append(f"skipped {len(paths)} symlink loop{'s' if len(paths) > 1 else ''} under {where}: "
                         + short_list(paths))
        return lines


def short_list(items: Sequence[str]) -> str:
    """The first few items, comma separated, then '...' if there are more."""
    return ", ".join(items[:MAX_MESSAGES_PER_REASON]) + (", ..." if len(items) > MAX_MESSAGES_PER_REASON else "")


def find_inputs(patterns: Sequence[str]) -> InputFiles:
    """Files named directly, every supported file under a directory (sorted), and glob matches (sorted).

    A file is read once however it is reached (another spelling of its path, a symlink, a hard link, two inputs
    that overlap): it is identified by device and inode, the first path to reach it is kept, the others are listed
    in `duplicates`.
    """
    found = InputFiles()
    first_path: dict[tuple[int, int], str] = {}
    for pat in patterns:
        for path, st in _expand(pat, found.loops):
            key = (st.st_dev, st.st_ino)
            if key in first_path:
                found.duplicates.append((path, first_path[key]))
            else:
                first_path[key] = path
                found.files.append(path)
    return found


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """`find_inputs`'s files, its warnings printed to stderr; for tools that need only the list."""
    found = find_inputs(patterns)
    for line in found.warnings():
        print(f"warning: {line}", file=sys.stderr)
    return found.files


def _expand(pat: str, loops: dict[str, list[str]]) -> list[tuple[str, os.stat_result]]:
    """The files one input names, with their stat (symlinks followed); loops met are added to `loops[pat]`."""
    p = Path(pat).expanduser()
    try:
        st = p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{pat}: symlink loop (following its links never ends at a file or directory)") from e
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{pat}: {e.strerror}") from e
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        found, met = _walk(p, st)
        if met:
            loops[pat] = met
        if not found:
            raise InputError(f"{pat}: directory holds no .jsonl/.txt/.parquet files")
        return found
    if st is not None:
        file_kind(p)  # fail early on an unknown format
        return [(str(p), st)]
    if not glob.has_magic(pat):
        raise InputError(f"{pat}: no such file or directory")
    found, met, dir_ids = [], [], {}
    # glob's ** follows directory symlinks, a loop included, until the path is too long to resolve.
    for f in sorted(glob.glob(os.path.expanduser(pat), recursive=True)):
        loop = _loop_on_path(Path(f), dir_ids)
        if loop is not None:
            if loop not in met:
                met.append(loop)
            continue
        try:
            fst = os.stat(f)
        except OSError as e:
            if e.errno == errno.ELOOP:
                met.append(f)
            continue
        if stat.S_ISREG(fst.st_mode):
            file_kind(f)
            found.append((f, fst))
    if met:
        loops[pat] = sorted(met)
    if not found:
        raise InputError(f"{pat}: pattern matches no file")
    return found


def _loop_on_path(path: Path, dir_ids: dict[Path, tuple[int, int]]) -> str | None:
    """The first directory of `path` that is one it is already inside (reached by a symlink loop), or None."""
    inside: set[tuple[int, int]] = set()
    for d in (*reversed(path.parent.parents), path.parent):
        if d not in dir_ids:
            try:
                st = os.stat(d)
            except OSError:
                return None  # let the file's own stat tell what is wrong
            dir_ids[d] = (st.st_dev, st.st_ino)
        if dir_ids[d] in inside:
            return str(d)
        inside.add(dir_ids[d])
    return None


def _walk(root: Path, root_st: os.stat_result) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """Supported files under `root`, sorted by path, following directory symlinks; and the symlink loops met.

    A symlink to a directory that encloses it (same device and inode as one on the way down) is a loop: listed,
    not followed. Other symlinked directories are walked, so a file under two of them comes out twice
    and `find_inputs` keeps the first. Dangling symlinks and unreadable directories are passed over, as before.
    """
    found: list[tuple[str, os.stat_result]] = []
    loops: list[str] = []
    stack = [(root, frozenset({(root_st.st_dev, root_st.st_ino)}))]
    while stack:
        directory, enclosing = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            path = directory / entry.name
            try:
                st = entry.stat()
            except OSError as e:
                if e.errno == errno.ELOOP:
                    loops.append(str(path))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in enclosing:
                    loops.append(str(path))
                else:
                    stack.append((path, enclosing | {key}))
            elif stat.S_ISREG(st.st_mode) and _is_supported(path):
                found.append((str(path), st))
    return sorted(found, key=lambda f: f[0]), sorted(loops)


def _open_binary(path: str) -> io.BufferedIOBase:
    """Open for reading bytes, decompressing .gz and .zst transparently."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    raw = open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(raw), 1 << 20)
    return raw


class TruncatedStreamError(EOFError):
    """A compressed stream that ends in the middle of a frame."""


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file of one or more frames, raising on a truncated last frame.

    zstandard's own stream_reader returns a clean end-of-file when the input stops mid-frame; a truncated shard of
    a corpus must not pass for a complete one.
    """

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._dobj, self._pending, self._in_frame = self._new(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise TruncatedStreamError("zstd stream ends in the middle of a frame")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._dobj.decompress(chunk)
                chunk = b""
                if self._dobj.eof:  # frame finished; anything after it starts the next frame
                    chunk, self._dobj, self._in_frame = self._dobj.unused_data, self._new(), False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


# What a damaged compressed stream raises: gzip's EOFError/BadGzipFile/zlib.error, zstandard's ZstdError.
def _decompress_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


def read_batches(
    path: str, keys: Sequence[str], batch_bytes: int = 1 << 20, txt_split: str = "file"
) -> Iterator[Batch]:
    """Cut one file into batches of about `batch_bytes` raw bytes."""
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_batches(path, keys, batch_bytes)
        return
    try:
        f = _open_binary(path)
    except OSError as e:
        yield Batch(path, kind, 1, skips=[Skip("unreadable_file", path, e.strerror or str(e))])
        return
    errors = _decompress_errors()
    with f:
        if kind == "text" and txt_split == "file":
            try:
                data = f.read()
            except errors as e:
                yield Batch(path, kind, 1, skips=[Skip("truncated_file", path, f"{type(e).__name__}: {e}")])
                return
            except OSError as e:
                yield Batch(path, kind, 1, skips=[Skip("unreadable_file", path, e.strerror or str(e))])
                return
            yield Batch(path, kind, 1, [data], len(data))
            return
        yield from _line_batches(f, path, kind, batch_bytes, errors)


def _line_batches(f, path: str, kind: str, batch_bytes: int, errors) -> Iterator[Batch]:
    """One record per line: a JSON object (jsonl) or a document (text with --txt-split line)."""
    batch = Batch(path, kind, 1)
    lineno = 0
    try:
        for line in f:
            lineno += 1
            batch.nbytes += len(line)
            batch.records.append(line)
            if batch.nbytes >= batch_bytes:
                yield batch
                batch = Batch(path, kind, lineno + 1)
    except errors as e:
        batch.skips.append(
            Skip("truncated_file", f"{path}:{lineno + 1}", f"{type(e).__name__}: {e}; the lines before it were kept")
        )
    except OSError as e:
        batch.skips.append(Skip("unreadable_file", f"{path}:{lineno + 1}", e.strerror or str(e)))
    if batch.records or batch.skips:
        yield batch


def _parquet_batches(path: str, keys: Sequence[str], batch_bytes: int) -> Iterator[Batch]:
    """Parquet rows as dicts of the requested keys; a missing column is a per-row `missing_key`."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
        present = [k for k in keys if k in pf.schema_arrow.names]
        row = 1
        for rb in pf.iter_batches(batch_size=4096, columns=present):
            cols = {k: rb.column(k).to_pylist() for k in present}
            n = rb.num_rows
            records = [{k: cols[k][i] for k in present} for i in range(n)]
            yield Batch(path, "parquet", row, records, rb.nbytes)
            row += n
    except OSError as e:
        yield Batch(path, "parquet", 1, skips=[Skip("unreadable_file", path, str(e))])
    except (pa.ArrowException, ValueError) as e:  # a damaged file, a wrong column type
        yield Batch(path, "parquet", 1, skips=[Skip("corrupt_file", path, f"{type(e).__name__}: {e}")])


def document_texts(
    batch: Batch, keys: Sequence[str], txt_split: str = "file"
) -> tuple[dict[str, list[tuple[str, str]]], list[Skip]]:
    """Decode raw records into (text, location) per key; every record that is not a document becomes a `Skip`."""
    texts: dict[str, list[tuple[str, str]]] = {k: [] for k in keys}
    skips: list[Skip] = []
    for i, rec in enumerate(batch.records):
        where = f"{batch.path}:{batch.first_line + i}"
        if batch.kind == "text":
            if txt_split == "line":
                rec = rec.rstrip(b"\n").removesuffix(b"\r")
            else:
                where = batch.path
            try:
                value = rec.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.append(Skip("invalid_utf8", where, str(e)))
                continue
            values = {k: value for k in keys}
        elif batch.kind == "jsonl":
            if not rec.strip():
                skips.append(Skip("blank_line", where))
                continue
            try:
                obj = json.loads(rec)
            except UnicodeDecodeError as e:
                skips.append(Skip("invalid_utf8", where, str(e)))
                continue
            except ValueError as e:
                skips.append(Skip("malformed_json", where, str(e)))
                continue
            if not isinstance(obj, dict):
                skips.append(Skip("malformed_json", where, f"a JSON {type(obj).__name__}, not an object"))
                continue
            values = obj
        else:  # parquet row
            values = rec
        for k in keys:
            v = values.get(k)
            if v is None:
                reason = "missing_key" if k not in values else "not_a_string"
                skips.append(Skip(reason, where, f"key {k!r}" + (" is null" if k in values else "")))
            elif not isinstance(v, str):
                skips.append(Skip("not_a_string", where, f"key {k!r} holds a {type(v).__name__}"))
            elif not v:
                skips.append(Skip("empty_document", where, f"key {k!r}"))
            elif batch.kind == "jsonl" and not _encodable(v):
                skips.append(Skip("invalid_unicode", where, f"key {k!r} holds a lone surrogate"))
            else:
                texts[k].append((v, where))
    return texts, skips


def _encodable(text: str) -> bool:
    """False for text holding a lone surrogate, which JSON escapes allow but UTF-8 and every tokenizer reject."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
