"""Tokenizers for preprocessing and training: the built-in byte tokenizer and Hugging Face `tokenizer.json` files.

Both expose the same small surface: `encode_batch(texts) -> list of int arrays`, `decode(ids) -> str`,
`vocab_size`, `eod_id`. A fast backend (`gigatoken`) may replace HF's encoder, but only after a self-check shows
identical ids on a sample, so it can never change what lands in a shard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BYTE_TOKENIZER = "byte"
# End-of-document names tried in order when --eod-token is not given.
DEFAULT_EOD_TOKENS = ("<|endoftext|>", "</s>")
# The built-in tokenizer's special tokens follow the 256 byte ids; end-of-document is 256.
BYTE_SPECIAL_TOKENS = ("<|endoftext|>",)


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
        self.fast = None
        self.fast_backend_note = "off"
        if fast_backend:
            self.fast, self.fast_backend_note = _load_gigatoken(self)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, no special tokens added."""
        return self.fast(texts) if self.fast is not None else self.encode_reference(texts)

    def encode_reference(self, texts: Sequence[str]) -> list[np.ndarray]:
        """HF's own ids, never the fast backend (the oracle for the self-check)."""
        encs = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids back to text, special tokens kept."""
        return self.hf.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


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
