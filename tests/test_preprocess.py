"""tools/preprocess_data.py: every document comes out exactly once, whatever the format, worker count or sharding."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
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
    assert first in r.stdout and "length histogram" in r.stdout
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
