"""KV-cached generation (tools/generate.py) against transformers, and export to / import from transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import Config
from engine.data.tokenizer import ByteTokenizer, load_tokenizer
from engine.hf import export_main, import_main, import_model, save_hf_tokenizer
from engine.inference import Sampling, generate, load_for_inference
from engine.inference import main as generate_main
from engine.model import GPT
from engine.parallel.state import ParallelState
from engine.training.checkpoint import load_model_weights, resolve_checkpoint, save_checkpoint
from tests.test_model import model_cfg, randomised

ROOT = Path(__file__).resolve().parent.parent
SINGLE = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
PROMPT = "Grüße, 世界! "  # multi-byte characters: 17 bytes
TEXT = "Ünïcödé — ‘quotes’, emoji 🚀🔥, CJK 漢字かな, Arabic مرحبا,\ttabs  and\n\nnewlines "
# The Llama one pads its vocabulary (padding rows are dropped from logits and on export).
MODELS = {"gpt2": ("gpt2", {}), "llama-gqa": ("llama", {"num_kv_heads": 2, "make_vocab_size_divisible_by": 64})}


def tiny_model(arch: str, tokenizer: str = "byte", **overrides) -> GPT:
    """A randomised tiny model over the vocabulary of `tokenizer` ("byte" or a tokenizer.json)."""
    vocab = load_tokenizer(tokenizer, fast_backend=False).vocab_size
    torch.manual_seed(0)
    return randomised(GPT(model_cfg(arch, vocab_size=vocab, **({"max_seq_len": 128} | overrides)))).eval()


def save_run(run_dir: Path, model: GPT, tokenizer: str = "byte") -> Path:
    """Save `model` as a real checkpoint of `run_dir`, as the trainer does; returns the run directory."""
    eod_id = load_tokenizer(tokenizer, fast_backend=False).eod_id
    meta = {"config": asdict(Config(model=model.cfg)), "eod_id": eod_id,
            "tokenizer": "byte" if tokenizer == "byte" else "tokenizer.json"}
    save_checkpoint(run_dir, 1, SINGLE, model, torch.optim.AdamW(model.parameters()), meta,
                    tokenizer_file=None if tokenizer == "byte" else tokenizer)
    return run_dir


def run_generate(capsys, *args: str) -> tuple[str, str]:
    """tools/generate.py in this process: (stdout, stderr)."""
    assert generate_main(list(args)) == 0
    out = capsys.readouterr()
    return out.out, out.err


def usage_error(capsys, main, *args: str) -> str:
    """The message of the usage error (exit 2) a tool's `main` gives for `args`."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_logits_equal_the_full_forward(name):
    arch, overrides = MODELS[name]
    torch.manual_seed(0)
    model = randomised(GPT(model_cfg(arch, **overrides))).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.kv_cache(2, 20)
        steps = [model(tokens[:, :7], cache=cache)]  # the prompt, then one token at a time
        steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="one token at a time"):
        model(tokens[:, :2], cache=cache)


def test_gpt2_refuses_positions_past_max_seq_len():
    model = GPT(model_cfg("gpt2", max_seq_len=8)).eval()
    cache = model.kv_cache(1, 16)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_matches_transformers(name, tmp_path, bpe_tokenizer):
    """GPT-2 with the byte tokenizer and a grouped-query Llama with a BPE: same ids and text as HF's generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, overrides = MODELS[name]
    tokenizer = "byte" if arch == "gpt2" else bpe_tokenizer
    model = tiny_model(arch, tokenizer, **overrides)
    run_dir = save_run(tmp_path / "run", model, tokenizer)
    n = 24
    stdout = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(run_dir), "--prompt", PROMPT,
         "--max-new-tokens", str(n), "--greedy", "--device", "cpu"],
        capture_output=True, check=True, cwd=tmp_path).stdout.decode("utf-8")
    assert export_main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()

    ours = load_tokenizer(tokenizer, fast_backend=False)
    prompt = ours.encode_batch([PROMPT])[0].tolist()
    assert hf_tok(PROMPT).input_ids == prompt
    continuation = generate(model, prompt, n, ours.eod_id, Sampling(greedy=True))
    ids = torch.tensor([prompt])
    hf_ids = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                               pad_token_id=ours.eod_id)[0, len(prompt):].tolist()
    if hf_ids[-1] == ours.eod_id:  # HF keeps the end-of-sequence token it stopped at; we leave it out
        hf_ids = hf_ids[:-1]
    assert continuation == hf_ids and len(continuation) > 5
    assert stdout == hf_tok.decode(prompt + hf_ids) + "\n"
    assert stdout.startswith(PROMPT)
    if arch == "gpt2":
        return
    from_hf_dir = subprocess.run(  # generate.py reads the transformers directory itself too (Llama with a BPE)
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(tmp_path / "hf"), "--prompt", PROMPT,
         "--max-new-tokens", str(n), "--greedy", "--device", "cpu"],
        capture_output=True, check=True, cwd=tmp_path).stdout.decode("utf-8")
    assert from_hf_dir == stdout


@pytest.mark.parametrize(("arch", "tie"), [("gpt2", True), ("llama", False)])
def test_export_import_round_trips_every_weight(arch, tie, tmp_path):
    model = tiny_model(arch, num_kv_heads=2 if arch == "llama" else None, tie_embeddings=tie)
    run_dir = save_run(tmp_path / "run", model)
    assert export_main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["vocab_size"], hf_config["eos_token_id"], hf_config["tie_word_embeddings"]) == (257, 256, tie)
    assert import_main(["--model", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0

    step_dir = resolve_checkpoint(tmp_path / "back")
    original = load_file(resolve_checkpoint(run_dir) / "model-pp00-tp00.safetensors")
    imported = load_file(step_dir / "model-pp00-tp00.safetensors")
    assert sorted(imported) == sorted(original) == sorted(n for n, _ in model.named_parameters())
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor), name
    back, tokenizer, meta = load_for_inference(step_dir)  # what generate.py and train.init_from read
    assert asdict(back.cfg) | {"name": ""} == asdict(model.cfg) | {"name": "", "recompute": "none"}
    load_model_weights(step_dir, GPT(model.cfg))
    assert meta["eod_id"] == 256
    assert tokenizer.encode_batch([TEXT])[0].tolist() == list(TEXT.encode("utf-8"))


@pytest.mark.parametrize("name", MODELS)
def test_import_of_a_transformers_model_gives_its_logits(name, tmp_path):
    """A model made by transformers itself (not by our export): imported, our forward gives its logits."""
    from transformers import AutoModelForCausalLM

    from engine.hf import hf_config

    arch, overrides = MODELS[name]
    torch.manual_seed(0)
    config = hf_config(model_cfg(arch, vocab_size=257, **overrides), eod_id=256)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.2)
    hf_model.save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(ByteTokenizer(), 256, tmp_path / "hf")
    model, _, _ = load_for_inference(import_model(tmp_path / "hf", tmp_path / "ours"))
    tokens = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        assert (model(tokens) - hf_model(input_ids=tokens).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_autotokenizer_loads_the_exported_tokenizer(kind, tmp_path, bpe_tokenizer):
    from transformers import AutoTokenizer

    ours = load_tokenizer("byte" if kind == "byte" else bpe_tokenizer, fast_backend=False)
    save_hf_tokenizer(ours, ours.eod_id, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode_batch([TEXT])[0].tolist()
    assert hf(TEXT).input_ids == ids
    assert hf.decode(ids) == ours.decode(ids) == TEXT
    assert hf.eos_token_id == ours.eod_id and hf.convert_ids_to_tokens(ours.eod_id) == "<|endoftext|>"
    if kind == "byte":
        invalid = [*"é".encode()[:1], ord("a")]  # a cut multi-byte character
        assert hf.decode(invalid) == ours.decode(invalid) == "\ufffda"


def test_generation_stops_at_end_of_document(tmp_path, capsys):
    model = tiny_model("gpt2")
    prompt = list(PROMPT.encode("utf-8"))
    free = generate(model, prompt, 12, eod_id=-1, sampling=Sampling(greedy=True))
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token first seen mid-way
    assert generate(model, prompt, 12, eod_id=free[k], sampling=Sampling(greedy=True)) == free[:k]

    # Through the command line, with a model that always predicts the end of the document: the prompt alone.
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)  # the final norm outputs all ones ...
        model.tok_emb.weight[256] = 1.0  # ... so the tied head scores end-of-document (256) highest
    run_dir = save_run(tmp_path / "run", model)
    out, _ = run_generate(capsys, "--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "8")
    assert out == PROMPT + "\n"


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path, capsys):
    model = tiny_model("llama", num_kv_heads=2)
    run_dir = save_run(tmp_path / "run", model)
    prompt, n = list(PROMPT.encode("utf-8")), 30

    def sample(seed: int, **sampling) -> list[int]:
        return generate(model, prompt, n, -1, Sampling(**sampling), torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1) != sample(2)
    greedy = generate(model, prompt, n, -1, Sampling(greedy=True))
    assert sample(1, top_k=1, temperature=0.7) == sample(2, top_p=1e-6) == greedy != sample(1, top_k=5)
    args = ["--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "20", "--top-k", "40",
            "--top-p", "0.9", "--temperature", "0.8"]
    assert run_generate(capsys, *args, "--seed", "3") == run_generate(capsys, *args, "--seed", "3")


def test_generate_cli_errors_and_gpt2_length_limit(tmp_path, capsys):
    run_dir = save_run(tmp_path / "run", tiny_model("gpt2", max_seq_len=24))
    base = ["--checkpoint", str(run_dir), "--max-new-tokens", "4"]
    cases = {
        ("--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x", "--max-new-tokens", "4"): "not a checkpoint",
        (*base, "--prompt", ""): "--prompt is empty",
        (*base, "--prompt", "x", "--greedy", "--temperature", "0.5"): "cannot be combined with --temperature",
        (*base, "--prompt", "x", "--temperature", "0"): "--temperature must be positive",
        (*base, "--prompt", "x", "--top-k", "0"): "--top-k must be at least 1",
        (*base, "--prompt", "x", "--top-p", "1.5"): "--top-p must be in (0, 1]",
        (*base, "--prompt", "x" * 24): "at most 24 positions",
        ("--checkpoint", str(run_dir), "--prompt", "x", "--max-new-tokens", "0"): "at least 1",
        ("--checkpoint", str(run_dir), "--prompt", "x"): "--max-new-tokens",
    }
    for args, message in cases.items():
        assert message in usage_error(capsys, generate_main, *args), args
    out, err = run_generate(capsys, "--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "50",
                            "--greedy")
    assert "stopping after 7 new tokens, at model.max_seq_len=24" in err
    assert out.startswith(PROMPT)


def test_trainer_checkpoint_exports_and_imports_for_init_from(tmp_path):
    """A checkpoint the trainer wrote, through transformers and back, initialises a new run with its exact weights."""
    from engine.hf import hf_weights
    from engine.training.checkpoint import checkpoint_weights
    from engine.training.trainer import Trainer
    from tests.test_trainer import tiny_config, write_pattern_shard

    cfg = tiny_config(write_pattern_shard(tmp_path / "shard"), str(tmp_path / "cache"), arch="llama")
    cfg.data.tokenizer, cfg.train.steps = "byte", 2
    for run in ("src", "dst"):
        (tmp_path / run).mkdir()
    source = Trainer(cfg, SINGLE, tmp_path / "src")
    source.fit()
    assert export_main(["--checkpoint", str(tmp_path / "src"), "--output", str(tmp_path / "hf")]) == 0
    assert import_main(["--model", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    for weights in ("imported", "hf"):  # our imported step directory, or the transformers directory itself
        target = Trainer(cfg, SINGLE, tmp_path / "dst")
        read = hf_weights if weights == "hf" else checkpoint_weights
        target.init_weights_from(read(tmp_path / weights))
        for (name, a), b in zip(source.model.named_parameters(), target.model.parameters(), strict=True):
            assert torch.equal(a, b), (weights, name)


def test_export_and_import_refuse_what_the_other_side_cannot_hold(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    run_dir = str(save_run(tmp_path / "run", tiny_model("gpt2", num_kv_heads=2)))
    hf, ours = str(tmp_path / "hf"), str(tmp_path / "ours")
    assert "no grouped-query attention" in usage_error(capsys, export_main, "--checkpoint", run_dir, "--output", hf)
    assert "not an empty directory" in usage_error(capsys, export_main, "--checkpoint", run_dir, "--output", run_dir)
    biased = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, mlp_bias=True, eos_token_id=256)
    AutoModelForCausalLM.from_config(biased).save_pretrained(hf)
    assert "no tokenizer" in usage_error(capsys, import_main, "--model", hf, "--output", ours)
    save_hf_tokenizer(ByteTokenizer(), 256, hf)
    assert "MLP biases" in usage_error(capsys, import_main, "--model", hf, "--output", ours)
    assert "no config.json" in usage_error(capsys, import_main, "--model", str(tmp_path / "nowhere"), "--output", ours)
