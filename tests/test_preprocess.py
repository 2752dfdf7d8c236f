"""tools/preprocess_data.py: every document comes out exactly once, whatever the format, worker count or sharding."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.data.indexed_dataset import IndexedDataset, merge_shards
from engine.data.preprocess import StrictModeError, preprocess
from engine.data.sources import InputError
from engine.data.tokenizer import TokenizerError, load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def quiet(*args, **kwargs) -> None:
    """A `log` that swallows messages."""


def read_docs(prefix) -> list[np.ndarray]:
    ds = IndexedDataset(prefix)
    ds.verify()
    return [np.array(ds[i]) for i in range(len(ds))]


def corpus_texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def assert_documents(prefix, texts, tokenizer) -> None:
    """The shard holds exactly `texts`, in order, each encoded without specials and followed by the EOD id."""
    tok = load_tokenizer(tokenizer, fast_backend=False)
    docs = read_docs(prefix)
    assert len(docs) == len(texts)
    for ids, text in zip(docs, texts, strict=True):
        assert ids[-1] == tok.eod_id
        assert tok.decode(ids[:-1]) == text


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_every_document_round_trips(tmp_path, stdlib_corpus, bpe_tokenizer, tokenizer):
    """Decoding each written document gives back its input text, for the byte tokenizer and a trained BPE."""
    tok = bpe_tokenizer if tokenizer == "bpe" else "byte"
    s = preprocess([stdlib_corpus], str(tmp_path / "out"), tokenizer=tok, log=quiet, progress=False)
    texts = corpus_texts(stdlib_corpus)
    assert s.documents == {"text": len(texts)} and not s.skipped
    assert_documents(tmp_path / "out", texts, tok)
    if tokenizer == "byte":
        ds = IndexedDataset(tmp_path / "out")
        assert ds.dtype == np.uint16 and ds[0][-1] == 256  # byte b is token b; EOD is 256


def test_output_identical_for_1_and_4_workers(tmp_path, stdlib_corpus, bpe_tokenizer):
    """Shards are byte-identical whatever --workers is (small batches so every worker gets many)."""
    outs = []
    for workers in (1, 4):
        prefix = tmp_path / f"w{workers}"
        preprocess([stdlib_corpus], str(prefix), tokenizer=bpe_tokenizer, workers=workers, batch_bytes=50_000,
                   log=quiet, progress=False)
        outs.append(prefix)
    for ext in (".bin", ".idx"):
        assert Path(f"{outs[0]}{ext}").read_bytes() == Path(f"{outs[1]}{ext}").read_bytes()


def test_fast_backend_gives_hf_ids(tmp_path, stdlib_corpus, bpe_tokenizer):
    """With gigatoken installed, its shards equal Hugging Face's byte for byte (it is used only when identical)."""
    pytest.importorskip("gigatoken")
    tok = load_tokenizer(bpe_tokenizer)
    assert tok.fast is not None, tok.fast_backend_note
    fast = preprocess([stdlib_corpus], str(tmp_path / "fast"), tokenizer=bpe_tokenizer, log=quiet, progress=False)
    assert fast.encoder.startswith("gigatoken")
    slow = preprocess([stdlib_corpus], str(tmp_path / "hf"), tokenizer=bpe_tokenizer, fast_tokenizer=False,
                      log=quiet, progress=False)
    assert slow.encoder.startswith("Hugging Face")
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/fast{ext}").read_bytes() == Path(f"{tmp_path}/hf{ext}").read_bytes()


def _write_formats(tmp_path, texts) -> dict[str, list[str]]:
    """The same documents as jsonl, .jsonl.gz, .jsonl.zst, parquet, txt files and a line-per-document txt."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": texts, "other": list(range(len(texts)))}), tmp_path / "a.parquet",
                   row_group_size=3)
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):
        (txt_dir / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    return {
        "jsonl": [str(tmp_path / "a.jsonl")],
        "gz": [str(tmp_path / "a.jsonl.gz")],
        "zst": [str(tmp_path / "a.jsonl.zst")],
        "parquet": [str(tmp_path / "a.parquet")],
        "txt_dir": [str(txt_dir)],
        "txt_glob": [str(txt_dir / "*.txt")],
    }


def test_every_input_format_gives_the_same_shard(tmp_path):
    """jsonl, .gz, .zst, parquet, a directory of .txt and a glob all yield identical shards."""
    texts = [f"document {i}: " + "ünïcode ✓ " * i + "\n  trailing  " for i in range(1, 12)]
    inputs = _write_formats(tmp_path, texts)
    reference = None
    for name, paths in inputs.items():
        prefix = tmp_path / f"out_{name}"
        s = preprocess(paths, str(prefix), log=quiet, progress=False)
        assert s.documents["text"] == len(texts) and not s.skipped, name
        blob = (Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes())
        reference = reference or blob
        assert blob == reference, name
    assert_documents(tmp_path / "out_jsonl", texts, "byte")


def test_txt_one_document_per_line(tmp_path):
    """--txt-split line: each line is a document, line endings are separators, empty lines are counted skips."""
    (tmp_path / "a.txt").write_bytes(b"first line\r\nsecond line\n\n  \nlast, no newline")
    s = preprocess([str(tmp_path / "a.txt")], str(tmp_path / "o"), txt_split="line", log=quiet, progress=False)
    assert s.skipped == {"empty_document": 1}
    assert_documents(tmp_path / "o", ["first line", "second line", "  ", "last, no newline"], "byte")


BAD_JSONL = [
    b'{"text": "good one"}\n',
    b'{"text": "broken\n',  # malformed
    b'{"title": "no text key"}\n',  # missing key
    b'{"text": "bad \xff\xfe utf8"}\n',  # invalid UTF-8
    b'{"text": ""}\n',  # empty document
    b'{"text": "   "}\n',  # whitespace is content: written
    b'{"text": 42}\n',  # not a string
    b'{"text": null}\n',  # null
    b"\n",  # blank line
    b'["a", "list"]\n',  # not an object
    b'{"text": "lone \\ud800 surrogate"}\n',  # cannot be encoded
    b'{"text": "good two"}',  # last line without newline
]
EXPECTED_SKIPS = {"malformed_json": 2, "missing_key": 1, "invalid_utf8": 1, "empty_document": 1, "not_a_string": 2,
                  "blank_line": 1, "invalid_unicode": 1}


@pytest.mark.parametrize(("workers", "tokenizer"), [(1, "byte"), (2, "byte"), (1, "bpe"), (2, "bpe")])
def test_bad_records_are_skipped_counted_and_named(tmp_path, bpe_tokenizer, workers, tokenizer):
    """Each bad record is skipped and counted by reason, with a message naming file and line; the rest is kept."""
    tok = bpe_tokenizer if tokenizer == "bpe" else "byte"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(BAD_JSONL))
    messages = []
    s = preprocess([str(path)], str(tmp_path / "o"), tokenizer=tok, workers=workers, progress=False,
                   log=lambda m, **kw: messages.append(m))
    assert dict(s.skipped) == EXPECTED_SKIPS
    assert s.records == len(BAD_JSONL)
    assert s.documents["text"] + sum(EXPECTED_SKIPS.values()) == len(BAD_JSONL)
    assert_documents(tmp_path / "o", ["good one", "   ", "good two"], tok)
    text = "\n".join(messages)
    assert f"{path}:2: malformed_json" in text
    assert f"{path}:3: missing_key" in text
    assert f"{path}:4: invalid_utf8" in text
    assert f"{path}:11: invalid_unicode" in text


def test_strict_fails_on_first_bad_record_and_writes_nothing(tmp_path):
    """--strict stops at the first bad record, names it, and leaves no output shard behind."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(BAD_JSONL))
    with pytest.raises(StrictModeError, match=rf"{path}:2: malformed_json"):
        preprocess([str(path)], str(tmp_path / "o"), strict=True, log=quiet, progress=False)
    assert not list(tmp_path.glob("o*"))


def test_strict_failure_with_sharding_leaves_no_shard(tmp_path):
    """With --max-shard-size, shards finished before a --strict failure are removed too, not left looking whole."""
    path = tmp_path / "late_bad.jsonl"
    path.write_bytes(b'{"text": "fine document number one"}\n' * 200 + b"not json\n")
    with pytest.raises(StrictModeError, match=rf"{path}:201: malformed_json"):
        preprocess([str(path)], str(tmp_path / "m"), strict=True, max_shard_size=200, log=quiet, progress=False)
    assert not list(tmp_path.glob("m*"))


def test_failed_overwrite_keeps_the_previous_output(tmp_path):
    """--overwrite replaces the old shard only once the new one is complete: a failed run leaves the old intact."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "the old output"}\n')
    bad.write_bytes(b'{"text": "new"}\n{"text": 7}\n')
    preprocess([str(good)], str(tmp_path / "o"), log=quiet, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("o.*")}
    with pytest.raises(StrictModeError):
        preprocess([str(bad)], str(tmp_path / "o"), strict=True, overwrite=True, log=quiet, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("o.*")} == before
    assert_documents(tmp_path / "o", ["the old output"], "byte")


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_file(tmp_path, suffix):
    """A truncated .gz/.zst keeps the documents before the damage and counts the file as truncated."""
    import zstandard

    # ~1 MB, several zstd blocks, so the first half of the compressed file decodes to whole documents.
    texts = [f"doc {i} " + " ".join(str(i * j) for j in range(60)) for i in range(3000)]
    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)
    blob = gzip.compress(lines) if suffix == ".gz" else zstandard.ZstdCompressor().compress(lines)
    path = tmp_path / f"t.jsonl{suffix}"
    path.write_bytes(blob[: len(blob) // 2])
    messages = []
    s = preprocess([str(path)], str(tmp_path / "o"), progress=False, log=lambda m, **kw: messages.append(m))
    assert s.skipped == {"truncated_file": 1}
    assert 0 < s.documents["text"] < len(texts)
    assert any(str(path) in m and "truncated_file" in m for m in messages)
    assert_documents(tmp_path / "o", texts[: s.documents["text"]], "byte")
    with pytest.raises(StrictModeError, match="truncated_file"):
        preprocess([str(path)], str(tmp_path / "o2"), strict=True, log=quiet, progress=False)


def test_corrupt_parquet_and_unreadable_file(tmp_path):
    """A damaged parquet file is counted as corrupt; an unreadable file as unreadable; other inputs still go in."""
    (tmp_path / "good.jsonl").write_text('{"text": "kept"}\n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    inputs = [str(tmp_path / "broken.parquet"), str(tmp_path / "good.jsonl")]
    expected = {"corrupt_file": 1}
    if os.geteuid() != 0:  # root reads any file regardless of its mode
        locked = tmp_path / "locked.jsonl"
        locked.write_text('{"text": "secret"}\n')
        locked.chmod(0)
        inputs.append(str(locked))
        expected["unreadable_file"] = 1
    s = preprocess(inputs, str(tmp_path / "o"), log=quiet, progress=False)
    assert dict(s.skipped) == expected
    assert_documents(tmp_path / "o", ["kept"], "byte")


def test_empty_inputs(tmp_path):
    """Empty files give a valid empty shard and a warning, not a crash."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    messages = []
    s = preprocess([str(tmp_path / "empty.jsonl")], str(tmp_path / "o"), progress=False,
                   log=lambda m, **kw: messages.append(m))
    assert s.records == 0 and s.documents == {"text": 0}
    assert len(IndexedDataset(tmp_path / "o")) == 0
    assert any("held no records" in m for m in messages)


@pytest.mark.parametrize(("inputs", "message"), [
    (["does/not/exist.jsonl"], "no such file or directory"),
    (["nothing-matches-*.jsonl"], "pattern matches no file"),
    (["setup.py"], "unknown input format"),
])
def test_bad_input_paths_fail_fast(tmp_path, inputs, message):
    """Missing files, empty globs and unknown formats are errors before any work starts."""
    with pytest.raises(InputError, match=message):
        preprocess([str(REPO / p) if p == "setup.py" else p for p in inputs], str(tmp_path / "o"), log=quiet)
    assert not list(tmp_path.iterdir())


def test_sharding_and_merge(tmp_path, stdlib_corpus):
    """--max-shard-size splits at document boundaries; merging the shards gives the unsharded output exactly."""
    preprocess([stdlib_corpus], str(tmp_path / "one"), log=quiet, progress=False)
    s = preprocess([stdlib_corpus], str(tmp_path / "many"), max_shard_size=100_000, log=quiet, progress=False)
    paths = s.outputs["text"]
    assert len(paths) > 5 and paths[0].endswith("many_00000")
    biggest_doc = max(len(d) for d in read_docs(tmp_path / "one")) * 2
    for p in paths:
        size = Path(f"{p}.bin").stat().st_size
        docs = len(IndexedDataset(p))
        assert size <= 100_000 or (docs == 1 and size <= biggest_doc), (p, size, docs)
    merge_shards(paths, str(tmp_path / "merged"))
    for ext in (".bin", ".idx"):
        assert Path(f"{tmp_path}/merged{ext}").read_bytes() == Path(f"{tmp_path}/one{ext}").read_bytes()


def test_several_json_keys_give_several_outputs(tmp_path):
    """Each --json-keys key becomes PREFIX_<key>, with its own skips counted."""
    (tmp_path / "a.jsonl").write_text('{"q": "why", "a": "because"}\n{"q": "how"}\n')
    s = preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), json_keys=["q", "a"], log=quiet, progress=False)
    assert s.documents == {"q": 2, "a": 1} and s.skipped == {"missing_key": 1}
    assert_documents(tmp_path / "o_q", ["why", "how"], "byte")
    assert_documents(tmp_path / "o_a", ["because"], "byte")


def test_existing_output_needs_overwrite(tmp_path):
    """A second run refuses to replace shards unless --overwrite, which also removes stale numbered shards."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n' * 30)
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), max_shard_size=10, log=quiet, progress=False)
    assert len(list(tmp_path.glob("o_*.bin"))) == 15
    with pytest.raises(InputError, match="pass --overwrite"):
        preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), log=quiet, progress=False)
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), overwrite=True, log=quiet, progress=False)
    assert not list(tmp_path.glob("o_*")) and len(IndexedDataset(tmp_path / "o")) == 30


def test_eod_token_resolution(tmp_path, bpe_tokenizer):
    """The EOD token defaults to <|endoftext|>, else </s>; a name the vocabulary lacks is a clear error."""
    assert load_tokenizer(bpe_tokenizer).eod_id == load_tokenizer(bpe_tokenizer).hf.token_to_id("<|endoftext|>")
    with pytest.raises(TokenizerError, match="no end-of-document token '<eos>'"):
        load_tokenizer(bpe_tokenizer, eod_token="<eos>")
    from engine.data.train_tokenizer import train_tokenizer

    (tmp_path / "c.txt").write_text("hello world " * 50)
    s_tok = train_tokenizer([str(tmp_path / "c.txt")], str(tmp_path / "t"), vocab_size=300, special_tokens=["</s>"])
    assert load_tokenizer(s_tok).eod_id == 0
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")


def run_tool(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """Run tools/<name>.py by path, from another working directory, with no install."""
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_tools_run_by_path_from_anywhere(tmp_path):
    """build_corpus -> train_tokenizer -> preprocess -> inspect -> merge, each run by path from elsewhere."""
    r = run_tool("build_corpus", "--output", "c.jsonl", "--max-size", "300KB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_tool("train_tokenizer", "--input", "c.jsonl", "--output", "tok", "--vocab-size", "512", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_tool("preprocess_data", "--input", "c.jsonl", "--output-prefix", "s/x", "--tokenizer", "tok",
                 "--max-shard-size", "40KB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "skipped  0" in r.stdout
    r = run_tool("merge_shards", "--input", "s/x_*.idx", "--output-prefix", "s/all", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_tool("inspect_shards", "s/all", "--tokenizer", "tok", "--decode", "0", "--verify", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])["text"]
    assert first in r.stdout and "length histogram" in r.stdout and "verified s/all: " in r.stdout
    r = run_tool("preprocess_data", "--input", "missing.jsonl", "--output-prefix", "y", cwd=tmp_path)
    assert r.returncode == 2 and "error: missing.jsonl: no such file" in r.stderr
    r = run_tool("inspect_shards", "s/nothing", cwd=tmp_path)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_preprocessing_imports_no_torch():
    """The preprocessing entry point starts without importing torch (it would cost seconds per worker)."""
    code = ("import runpy, sys; sys.argv = ['preprocess_data.py', '--help']\n"
            f"try:\n    runpy.run_path({str(REPO / 'tools' / 'preprocess_data.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--output-prefix" in r.stdout


# ----------------------------------------------------------------------------------------------- inputs read once
def test_same_file_under_several_names_is_read_once(tmp_path, monkeypatch):
    """A file named as itself, ./itself, its absolute path, a glob, a symlink or a hard link is read once."""
    monkeypatch.chdir(tmp_path)
    Path("f.jsonl").write_text('{"text": "f one"}\n{"text": "f two"}\n')
    Path("g.jsonl").write_text('{"text": "g"}\n')
    os.symlink("f.jsonl", "link.jsonl")
    os.link("f.jsonl", "hard.jsonl")
    inputs = ["f.jsonl", "./f.jsonl", "g.jsonl", str(tmp_path / "f.jsonl"), "link.jsonl", "hard.jsonl", "./f*.jsonl"]
    messages = []
    s = preprocess(inputs, "o", log=lambda m, **kw: messages.append(m), progress=False)
    assert_documents("o", ["f one", "f two", "g"], "byte")
    assert s.files == 2 and s.duplicates == 5
    assert "warning: dropped duplicate input f.jsonl (named by an earlier input too)" in messages  # ./f.jsonl
    for dup in (str(tmp_path / "f.jsonl"), "link.jsonl", "hard.jsonl", "./f.jsonl"):  # the last from the glob
        assert f"warning: dropped duplicate input {dup} (same file as f.jsonl)" in messages, (dup, messages)
    assert "read     2 files (5 duplicate inputs dropped)" in s.report()


def test_directory_symlinks_are_followed_and_loops_reported(tmp_path, monkeypatch):
    """Symlinked directories are walked once each; a link back to an enclosing directory is a loop, named."""
    from engine.data.sources import find_inputs

    monkeypatch.chdir(tmp_path)
    for path, text in [("d/a.jsonl", "a"), ("d/sub/b.jsonl", "b"), ("outside/c.jsonl", "c")]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"text": text}) + "\n")
    os.symlink(".", "d/loop")  # d/loop -> d
    os.symlink("sub", "d/alias")  # d/alias/b.jsonl is d/sub/b.jsonl
    os.symlink("../outside", "d/ext")  # followed: a user linking data in expects it read
    os.symlink("self.jsonl", "d/self.jsonl")  # a file that resolves to itself
    messages = []
    s = preprocess(["d"], "o", log=lambda m, **kw: messages.append(m), progress=False)
    assert_documents("o", ["a", "b", "c"], "byte")  # d/a, d/alias/b (first in sorted order), d/ext/c
    assert "warning: dropped duplicate input d/sub/b.jsonl (same file as d/alias/b.jsonl)" in messages
    assert "warning: skipped 2 symlink loops under d: d/loop, d/self.jsonl" in messages
    assert s.duplicates == 1 and s.symlink_loops == 2
    assert "read     3 files (1 duplicate input dropped, 2 symlink loops skipped)" in s.report()
    walked, globbed = find_inputs(["d"]), find_inputs(["d/**/*.jsonl"])  # glob's ** follows links too, loops included
    assert globbed.files == walked.files and globbed.duplicates == walked.duplicates
    assert globbed.loops == {"d/**/*.jsonl": ["d/loop", "d/self.jsonl"]}


@pytest.mark.parametrize("links", [{"loop": "loop"}, {"a": "b", "b": "a"}])
def test_symlink_loop_named_on_the_command_line_is_an_error(tmp_path, links):
    """A symlink loop given as an input is an error that says so (not 'no such file')."""
    for name, target in links.items():
        os.symlink(target, tmp_path / name)
    first = str(tmp_path / next(iter(links)))
    with pytest.raises(InputError, match=f"^{first}: symlink loop"):
        preprocess([first], str(tmp_path / "o"), log=quiet)


# ----------------------------------------------------------------------------------------------- bounded encoding
def _recording_encoders(tok) -> list[str]:
    """Make `tok`'s encoders record every text they are handed; returns the list they fill."""
    seen: list[str] = []

    class Recorder:
        def __init__(self, hf):
            self.hf = hf

        def encode_batch_fast(self, texts, **kwargs):
            seen.extend(texts)
            return self.hf.encode_batch_fast(texts, **kwargs)

    tok.hf = Recorder(tok.hf)
    if tok.fast is not None:
        fast = tok.fast
        tok.fast = lambda texts: seen.extend(texts) or fast(texts)
    return seen


def test_long_documents_are_encoded_in_bounded_pieces_with_identical_ids(stdlib_corpus, bpe_tokenizer, monkeypatch):
    """Long texts reach the encoder in pieces of at most ENCODE_PIECE_CHARS; ids equal encoding them whole."""
    import random

    from engine.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 64)
    rng = random.Random(0)
    alphabet = [*" \n\r\t\u00a0\u3000\x1c\x85\u2028\u180e\u200b\x0b\x0c", *"ab'sZ09.,;-_(){}é漢🚀", "\u0301",
                "<|endoftext|>", "'s", "'ll"]
    no_cut = "x" * 500 + " \n\t" * 100  # whitespace only at the end: nowhere to cut
    texts = [
        "\n".join(corpus_texts(stdlib_corpus)[:8]),  # code: indentation, blank lines, trailing spaces
        ("a" + " " * 40 + "b\n\n\n   \t\r\n" + "word " * 20) * 5,
        "line one\r\nline two  \r\n\r\n" * 30,
        "Ünïcödé — 漢字かな 🚀🔥\u00a0\u3000x\x1c\x85 e\u0301 مرحبا\n" * 20,
        "x <|endoftext|> y\n\n<|endoftext|>\n z" * 20,
        "".join(rng.choice(alphabet) for _ in range(5000)),
        no_cut,
        "",
        " leading space",
    ]
    tok = load_tokenizer(bpe_tokenizer)
    whole = [np.asarray(e.ids) for e in tok.hf.encode_batch_fast(texts, add_special_tokens=False)]
    seen = _recording_encoders(tok)
    for encode in (tok.encode_batch, tok.encode_reference):
        seen.clear()
        got = encode(texts)
        assert len(got) == len(texts)
        for i, (g, w) in enumerate(zip(got, whole, strict=True)):
            assert np.array_equal(g, w), (encode.__name__, i)
        assert seen.count(no_cut) == 1 and len(seen) > 100  # really cut, except where it cannot be
        # Longer pieces only where the first 64 characters hold no whitespace followed by a letter or digit.
        assert all(len(t) <= 64 or not re.search(r"[ \t\n\r][A-Za-z0-9]", t[1:66]) for t in seen), seen


def test_tokenizer_without_a_known_cut_rule_encodes_whole(bpe_tokenizer, tmp_path, monkeypatch):
    """With a prefix space added to every text, cutting would change the ids, so such a tokenizer encodes whole."""
    from engine.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 64)
    config = json.loads(Path(bpe_tokenizer).read_text())
    config["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path, fast_backend=False)
    text = "hello world\n" * 20
    whole = tok.hf.encode(text, add_special_tokens=False).ids
    cut = [i for e in tok.hf.encode_batch_fast([text[:60], text[60:]], add_special_tokens=False) for i in e.ids]
    assert cut != whole  # why this tokenizer must not be cut
    seen = _recording_encoders(tok)
    assert tok.encode_batch([text])[0].tolist() == whole and seen == [text]


# ----------------------------------------------------------------------------------------------- interrupted runs
def test_leftover_temporary_files_of_this_prefix_are_removed(tmp_path):
    """A run removes the .tmp files a killed run with the same prefix left, names them, and touches nothing else."""
    ours = ["o.bin.tmp", "o.idx.tmp", "o_00007.bin.tmp", "o_00007.idx.tmp"]
    others = ["oo.bin.tmp", "o_x.bin.tmp", "o_0007.bin.tmp", "o_000077.bin.tmp", "o_text.bin.tmp", "o.tmp",
              "o.bin.tmp.bak", "o.json.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"debris")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    messages = []
    preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "o"), progress=False,
               log=lambda m, **kw: messages.append(m))
    assert sorted(p.name for p in tmp_path.glob("*.tmp*")) == sorted(others)
    listed = ", ".join(str(tmp_path / n) for n in sorted(ours))
    assert f"removed 4 temporary files an interrupted run left: {listed}" in messages


def _start_run(source: Path, prefix: Path, tokenizer: str) -> subprocess.Popen:
    """A 2-worker preprocess_data.py run in a process group of its own (as a terminal would start it)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(source), "--output-prefix",
         str(prefix), "--tokenizer", tokenizer, "--workers", "2", "--batch-size", "64KB", "--no-fast-tokenizer",
         "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_tokens(proc: subprocess.Popen, prefix: Path) -> None:
    """Return once the run has written tokens: its workers are up and have encoded batches."""
    tmp, deadline = Path(f"{prefix}.bin.tmp"), time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no tokens written after 60 s"
        time.sleep(0.02)


def test_ctrl_c_prints_one_line_and_no_worker_tracebacks(tmp_path, stdlib_corpus, bpe_tokenizer):
    """Ctrl-C (SIGINT to the whole process group) gives one line and leaves no partial file."""
    fifo, prefix = tmp_path / "stream.jsonl", tmp_path / "o"
    os.mkfifo(fifo)
    proc = _start_run(fifo, prefix, bpe_tokenizer)
    with open(fifo, "wb") as stream:  # the run reads what we write (~16 batches), then waits for more
        stream.write(Path(stdlib_corpus).read_bytes())
        stream.flush()
        _wait_for_tokens(proc, prefix)
        time.sleep(0.3)  # the workers finish what they were sent and wait too: SIGINT meets them in Python code
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # returns once the workers are gone too: they share its stderr
    assert proc.returncode == 130 and err.strip() == "interrupted; partial shards removed", err
    assert not list(tmp_path.glob("o*"))


def test_killed_parent_leaves_no_worker_tracebacks_and_the_next_run_clears_its_files(tmp_path, stdlib_corpus,
                                                                                      bpe_tokenizer):
    """A SIGKILLed run's busy workers exit at once, silently; the next run removes the .tmp shard it left."""
    big, prefix = tmp_path / "big.jsonl", tmp_path / "o"
    big.write_bytes(Path(stdlib_corpus).read_bytes() * 6)
    proc = _start_run(big, prefix, bpe_tokenizer)
    _wait_for_tokens(proc, prefix)  # the parent keeps both workers busy from here on
    proc.kill()
    _, err = proc.communicate(timeout=30)  # returns once the workers are gone too: they share its stderr
    assert "Traceback" not in err, err
    left = sorted(str(p) for p in tmp_path.glob("o*.tmp"))
    assert left
    messages = []
    preprocess([stdlib_corpus], str(prefix), progress=False, log=lambda m, **kw: messages.append(m))
    assert not list(tmp_path.glob("o*.tmp"))
    assert f"removed 1 temporary file an interrupted run left: {left[0]}" in messages, (left, messages)


def help_blocks(parser) -> dict[str, str]:
    """Each option's --help entry, by its first option string, as one line (wide terminal: no wrapping)."""
    blocks: dict[str, str] = {}
    current = None
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_help_shows_each_default_once_and_it_is_the_real_one(monkeypatch):
    """Every option taking a value and not required ends its help with one '(default: X)'; giving X changes
    nothing. Flags and required options show none."""
    from engine.data.preprocess import build_parser

    monkeypatch.setenv("COLUMNS", "1000")
    parser = build_parser()
    blocks = help_blocks(parser)
    required = ["--input", "in.jsonl", "--output-prefix", "out"]
    baseline = vars(parser.parse_args(required))
    for action in parser._actions:
        opt = action.option_strings[0]
        if opt == "-h":
            continue
        shown = re.findall(r"\(default: ([^()]*(?:\([^()]*\))?[^()]*)\)", blocks[opt])
        if action.required or action.nargs == 0:
            assert not shown, f"{opt}: {blocks[opt]}"
            continue
        assert len(shown) == 1 and blocks[opt].endswith(f"(default: {shown[0]})"), f"{opt}: {blocks[opt]}"
        if action.default is not None:  # a value, not a description of what happens without the option
            given = vars(parser.parse_args([*required, opt, *shown[0].split()]))
            assert given[action.dest] == baseline[action.dest], f"{opt}: help shows {shown[0]!r}"


def test_train_tokenizer_reports_what_it_read(tmp_path, capsys):
    """train_tokenizer.py says how many files, documents and bytes of text it read, what it skipped, and where
    the tokenizer went."""
    from engine.data.train_tokenizer import main

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"hello world {i}"}) + "\n" for i in range(3)))
    (tmp_path / "b.jsonl").write_text('{"text": "good morning"}\nnot json\n{"text": "good night"}\n')
    assert main(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "t"),
                 "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    assert "read 2 files, 5 documents (61 B of text; 1 record skipped); vocabulary " in err
    assert f"-> {tmp_path / 't' / 'tokenizer.json'}" in err and (tmp_path / "t" / "tokenizer.json").is_file()


def test_train_tokenizer_with_no_documents_is_an_error(tmp_path, capsys):
    """Inputs holding no documents give a non-zero exit and a clear message, not an empty tokenizer."""
    from engine.data.train_tokenizer import main

    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "error: no documents in 1 file (1 record skipped); nothing to train a tokenizer on" in err
    assert not (tmp_path / "t").exists()
