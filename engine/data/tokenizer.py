"""Tokenizers for preprocessing and training: the built-in byte tokenizer and Hugging Face `tokenizer.json` files.

Both expose the same small surface: `encode_batch(texts) -> list of int arrays`, `decode(ids) -> str`,
`vocab_size`, `eod_id`. A fast backend (`gigatoken`) may replace HF's encoder, but only after a self-check shows
identical ids on a sample, so it can never change what lands in a shard.

HF `tokenizers` holds about 120 bytes per input character while it encodes (per-byte alignments, per-token strings
and offsets): a 50 MB document took 6.1 GB. So texts reach an encoder in calls of at most `ENCODE_PIECE_CHARS`
characters, a long text cut where the cut provably cannot change the ids (`cut_for_encoding`).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

BYTE_TOKENIZER = "byte"
# End-of-document names tried in order when --eod-token is not given.
DEFAULT_EOD_TOKENS = ("<|endoftext|>", "</s>")
# The built-in tokenizer's special tokens follow the 256 byte ids; end-of-document is 256.
BYTE_SPECIAL_TOKENS = ("<|endoftext|>",)
# The most characters one encoder call is given: bounds HF's working memory to ~120 MB per process.
ENCODE_PIECE_CHARS = 1 << 20


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or lacks what the caller needs."""


class ByteTokenizer:
    """Byte b is token b; special tokens follow from 256. Needs no file."""

    name = BYTE_TOKENIZER

    def __init__(self, eod_token: str | None = None):
        self.special_tokens = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(self.special_tokens)
        self.eod_id = resolve_eod(self.special_tokens.get, eod_token, "the byte tokenizer")

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """UTF-8 bytes of each text as uint16 ids."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Bytes back to text; special tokens by name, invalid UTF-8 replaced."""
        names = {v: k for k, v in self.special_tokens.items()}
        out, run = [], bytearray()
        for i in np.asarray(ids).tolist():
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(names.get(i, f"<unk:{i}>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, encoded without added special tokens."""

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None, fast_backend: bool = True):
        from tokenizers import Tokenizer

        self.path = _tokenizer_json(path)
        self.name = str(self.path)
        try:
            self.hf = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{self.path}: cannot load as a Hugging Face tokenizer: {e}") from e
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.eod_id = resolve_eod(self.hf.token_to_id, eod_token, str(self.path))
        # Added tokens a cut must not come just before, or None when cutting is not known to be safe.
        self.cut_guard = cut_guard(json.loads(self.path.read_text(encoding="utf-8")))
        self.fast = None
        self.fast_backend_note = "off"
        if fast_backend:
            self.fast, self.fast_backend_note = _load_gigatoken(self)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, no special tokens added."""
        return self._encode_bounded(texts, self.fast or self._encode_hf)

    def encode_reference(self, texts: Sequence[str]) -> list[np.ndarray]:
        """HF's own ids, never the fast backend (the oracle for the self-check)."""
        return self._encode_bounded(texts, self._encode_hf)

    def _encode_hf(self, texts: list[str]) -> list[np.ndarray]:
        encs = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def _encode_bounded(
        self, texts: Sequence[str], encode: Callable[[list[str]], list[np.ndarray]]
    ) -> list[np.ndarray]:
        """`encode` called on groups of at most ENCODE_PIECE_CHARS characters; each text's pieces joined again."""
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for owners, group in self._piece_groups(texts):
            for i, ids in zip(owners, encode(group), strict=True):
                parts[i].append(ids)
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]

    def _piece_groups(self, texts: Sequence[str]) -> Iterator[tuple[list[int], list[str]]]:
        """(text number of each piece, pieces) for consecutive pieces of at most ENCODE_PIECE_CHARS together."""
        owners: list[int] = []
        group: list[str] = []
        size = 0
        for i, text in enumerate(texts):
            pieces = (text,) if self.cut_guard is None else cut_for_encoding(text, ENCODE_PIECE_CHARS, self.cut_guard)
            for piece in pieces:
                if group and size + len(piece) > ENCODE_PIECE_CHARS:
                    yield owners, group
                    owners, group, size = [], [], 0
                owners.append(i)
                group.append(piece)
                size += len(piece)
        if group:
            yield owners, group

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids back to text, special tokens kept."""
        return self.hf.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


# Where GPT-2's byte-level pre-tokenizer starts a pre-token whatever came before: a whitespace character followed
# by a non-space one. Its regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) ends a
# whitespace run's match one character early when a non-space follows (`\s+(?!\S)` gives that character back),
# and that last character then stands alone or leads the next word; no alternative looks behind. So the
# pre-tokens, hence the ids (BPE never merges across pre-tokens), of a text cut there are those of the whole.
# Just after a newline is not such a place: "x \n" pre-tokenizes as "x", " \n" alone, but "x \ny" as
# "x", " ", "\n", "y". Candidates are only the four unambiguous whitespace characters, followed by a
# letter, mark, number, punctuation or symbol (whitespace in no Unicode version), not by an added token (whose
# split ends the text before it, as the end of a text would).
_CUT = re.compile(r"[ \t\n\r](?=\S)")
# Characters scanned at a time when looking for the last place to cut before a limit.
_CUT_SCAN_CHARS = 4096


def cut_guard(config: dict) -> tuple[str, ...] | None:
    """The added tokens' texts if `tokenizer.json` contents `config` may be cut where `cut_for_encoding` does.

    That holds for GPT-2's byte-level pre-tokenizer without a prefix space (what tools/train_tokenizer.py
    trains), no normalizer, and added tokens that hold no whitespace and strip none; for anything else (a
    prefix space is added to every piece, Metaspace, normalizers) we do not know, and documents are encoded whole.
    """
    pre = config.get("pre_tokenizer") or {}
    known = (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
             and config.get("normalizer") is None)
    added = config.get("added_tokens") or []
    if not known or any(t.get("lstrip") or t.get("rstrip") or re.search(r"\s", t["content"]) for t in added):
        return None
    return tuple(t["content"] for t in added)


def cut_for_encoding(text: str, max_chars: int, added: tuple[str, ...]) -> Iterator[str]:
    """`text` in pieces of at most `max_chars`, cut only where byte-level BPE ids cannot change (see `_CUT`).

    A stretch of more than `max_chars` with no such place stays one piece, up to the next place it has.
    """
    start = 0
    while len(text) - start > max_chars:
        cut = _last_cut(text, start, start + max_chars, added)
        if cut is None:
            cut = _first_cut(text, start + max_chars, added)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _last_cut(text: str, lo: int, hi: int, added: tuple[str, ...]) -> int | None:
    """The last place to cut in lo + 1 ... hi, or None; scans backwards, so a text is read about once."""
    end = hi + 2  # the lookahead must see the character after a cut at `hi`
    while True:
        begin = max(lo + 1, end - _CUT_SCAN_CHARS)
        for i in reversed([m.start() for m in _CUT.finditer(text, begin, end)]):
            if _cuttable(text, i, added):
                return i
        if begin == lo + 1:
            return None
        end = begin + 1  # the next block ends where this one began


def _first_cut(text: str, lo: int, added: tuple[str, ...]) -> int | None:
    """The first place to cut after `lo`, or None."""
    return next((m.start() for m in _CUT.finditer(text, lo + 1) if _cuttable(text, m.start(), added)), None)


def _cuttable(text: str, i: int, added: tuple[str, ...]) -> bool:
    """A `_CUT` candidate at `i` whose next character is a letter, mark, number, punctuation or symbol."""
    return unicodedata.category(text[i + 1])[0] in "LMNPS" and not text.startswith(added, i + 1)


def _tokenizer_json(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError(
            f"tokenizer {path!s}: no such file (give a tokenizer.json, a directory holding one, or 'byte')"
        )
    return p


def resolve_eod(lookup, eod_token: str | None, where: str) -> int:
    """The id of `eod_token`, or of the first default end-of-document token `where` knows."""
    names = (eod_token,) if eod_token else DEFAULT_EOD_TOKENS
    for name in names:
        tid = lookup(name)
        if tid is not None:
            return int(tid)
    tried = " or ".join(repr(n) for n in names)
    raise TokenizerError(f"{where} has no end-of-document token {tried}; name one it has with --eod-token")


# Documents of the built-in self-check: mixed scripts, whitespace runs, digits and rare bytes, where BPE
# implementations tend to disagree.
_SELF_CHECK_TEXTS = (
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Ünïcödé — ‘quotes’, emoji 🚀🔥, CJK 漢字かな, Arabic مرحبا, tabs\t\tand   spaces   ",
    "1234567890 3.14159 0xDEADBEEF\r\n<|endoftext|> not special here",
    " leading space, trailing space ",
    "a" * 3000,
)


def _load_gigatoken(tok: HFTokenizer):
    """Wrap `gigatoken` if installed and it reproduces HF's ids exactly; else (None, reason)."""
    if os.environ.get("WEFT_FAST_TOKENIZER", "1") == "0":
        return None, "disabled by WEFT_FAST_TOKENIZER=0"
    try:
        import awkward as ak
        import gigatoken
    except ImportError:
        return None, "gigatoken not installed"
    try:
        fast = gigatoken.Tokenizer(str(tok.path))
    except Exception as e:  # noqa: BLE001 - any failure of the optional backend means: use HF
        return None, f"gigatoken cannot load this tokenizer ({type(e).__name__}: {e})"

    def encode(texts: Sequence[str]) -> list[np.ndarray]:
        arr = fast.encode_batch(list(texts))
        flat = ak.to_numpy(ak.flatten(arr)).astype(np.int64, copy=False)
        ends = np.cumsum(ak.to_numpy(ak.num(arr)))
        return np.split(flat, ends[:-1]) if len(texts) else []

    sample = list(_SELF_CHECK_TEXTS)
    try:
        same = same_ids(encode(sample), tok.encode_reference(sample))
    except Exception as e:  # noqa: BLE001 - same
        return None, f"gigatoken failed the self-check ({type(e).__name__}: {e})"
    if not same:
        return None, "gigatoken ids differ from Hugging Face's on the self-check sample; using Hugging Face"
    return encode, "gigatoken (ids checked identical to Hugging Face)"


def load_tokenizer(spec: str | os.PathLike, eod_token: str | None = None, fast_backend: bool = True):
    """`'byte'` for the built-in byte tokenizer, else a path to a `tokenizer.json` or its directory."""
    if str(spec) == BYTE_TOKENIZER:
        return ByteTokenizer(eod_token)
    return HFTokenizer(spec, eod_token, fast_backend)


def same_ids(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    """True when two encodings of the same texts agree id for id."""
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def self_check_on(tok, texts: Sequence[str]) -> bool:
    """True when the active encoder gives HF's ids on `texts` (always true without a fast backend)."""
    if getattr(tok, "fast", None) is None:
        return True
    return same_ids(tok.encode_batch(texts), tok.encode_reference(texts))
