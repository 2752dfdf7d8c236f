"""Our checkpoints to and from Hugging Face `transformers` models: GPT2LMHeadModel and LlamaForCausalLM.

Llama's parameters map one to one onto ours under other names. GPT-2's differ in two ways: its Conv1D layers store
weights as (in, out), our Linear's transpose, and q, k and v are one fused `c_attn` projection. The mapping lives
here only; `tools/export_hf.py` and `tools/import_hf.py` (`export_main`, `import_main`) and the tests use it.

A tied output head appears in our checkpoints once, as `tok_emb.weight` (parameters are saved by unique name); in
transformers' state dicts it appears under both names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine.config import ModelConfig
from engine.data.tokenizer import BYTE_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, TokenizerError
from engine.inference import checkpoint_model_config, checkpoint_tokenizer
from engine.model import GPT
from engine.training.checkpoint import FORMAT_VERSION, CheckpointError, load_full_weights, read_meta, resolve_checkpoint
from engine.training.integrity import honour_umask
from engine.training.reshard import FullTensors, copy_parameters

try:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        LlamaConfig,
        PretrainedConfig,
        PreTrainedTokenizerFast,
    )
except ImportError as e:
    raise ImportError("exporting to and importing from Hugging Face needs transformers: pip install transformers") \
        from e

# transformers' GPT-2 activations that are our tanh-approximated GELU.
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Files a saved transformers tokenizer consists of (any one suffices for AutoTokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _name_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (transformers name, stored transposed) for every tensor that maps one to one.

    GPT-2's q, k and v projections are left out: they are fused into `c_attn` (see `to_hf` / `_state_from_hf`).
    """
    if cfg.arch == "gpt2":
        names = {"tok_emb.weight": ("transformer.wte.weight", False),
                 "pos_emb.weight": ("transformer.wpe.weight", False),
                 "norm.weight": ("transformer.ln_f.weight", False), "norm.bias": ("transformer.ln_f.bias", False),
                 "head.weight": ("lm_head.weight", False)}
        layer = {"attn_norm.weight": ("ln_1.weight", False), "attn_norm.bias": ("ln_1.bias", False),
                 "attn.o_proj.weight": ("attn.c_proj.weight", True), "attn.o_proj.bias": ("attn.c_proj.bias", False),
                 "mlp_norm.weight": ("ln_2.weight", False), "mlp_norm.bias": ("ln_2.bias", False),
                 "mlp.up_proj.weight": ("mlp.c_fc.weight", True), "mlp.up_proj.bias": ("mlp.c_fc.bias", False),
                 "mlp.down_proj.weight": ("mlp.c_proj.weight", True),
                 "mlp.down_proj.bias": ("mlp.c_proj.bias", False)}
        prefix = "transformer.h"
    else:
        names = {"tok_emb.weight": ("model.embed_tokens.weight", False), "norm.weight": ("model.norm.weight", False),
                 "head.weight": ("lm_head.weight", False)}
        layer = {"attn_norm.weight": ("input_layernorm.weight", False),
                 "mlp_norm.weight": ("post_attention_layernorm.weight", False)}
        layer |= {f"attn.{p}_proj.weight": (f"self_attn.{p}_proj.weight", False) for p in ("q", "k", "v", "o")}
        layer |= {f"mlp.{p}_proj.weight": (f"mlp.{p}_proj.weight", False) for p in ("gate", "up", "down")}
        prefix = "model.layers"
    for i in range(cfg.num_layers):
        names |= {f"blocks.{i}.{ours}": (f"{prefix}.{i}.{theirs}", t) for ours, (theirs, t) in layer.items()}
    return names


def hf_config(cfg: ModelConfig, eod_id: int) -> PretrainedConfig:
    """The transformers configuration of our model; end-of-document is its EOS and BOS (it starts each document)."""
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": eod_id, "eos_token_id": eod_id,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std}
    if cfg.arch == "gpt2":
        if cfg.num_kv_heads != cfg.num_heads:
            raise ValueError(f"a GPT-2 model with model.num_kv_heads={cfg.num_kv_heads} != model.num_heads="
                             f"{cfg.num_heads} has no transformers equivalent (GPT2LMHeadModel has no grouped-query "
                             "attention)")
        # Our dropout sits on the embeddings and on each residual branch, as GPT-2's embd_pdrop and resid_pdrop.
        return GPT2Config(n_positions=cfg.max_seq_len, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                          n_head=cfg.num_heads, n_inner=cfg.ffn_hidden_size, activation_function="gelu_new",
                          resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
                          layer_norm_epsilon=cfg.norm_eps, **common)
    return LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.hidden_size // cfg.num_heads,
                       max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                       hidden_act="silu", attention_bias=False, mlp_bias=False, **common)


def to_hf(cfg: ModelConfig, state: Mapping[str, torch.Tensor], eod_id: int) \
        -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """Our config and parameters (by our names; a tied head may be absent) -> transformers' config and state dict."""
    state = dict(state)
    if cfg.tie_embeddings:
        state.setdefault("head.weight", state["tok_emb.weight"])
    out = {theirs: (state[ours].T if transposed else state[ours]).contiguous()
           for ours, (theirs, transposed) in _name_map(cfg).items()}
    if cfg.arch == "gpt2":
        for i in range(cfg.num_layers):
            q, k, v = (f"blocks.{i}.attn.{p}_proj" for p in "qkv")
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [state[q + ".weight"], state[k + ".weight"], state[v + ".weight"]]).T.contiguous()
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [state[q + ".bias"], state[k + ".bias"], state[v + ".bias"]])
    return hf_config(cfg, eod_id), out


def _model_config_from_hf(c: PretrainedConfig, name: str) -> ModelConfig:
    """Our ModelConfig for a transformers GPT-2 or Llama config; ValueError for features our model lacks."""
    problems = []
    if c.model_type == "gpt2":
        if c.activation_function not in GPT2_TANH_GELUS:
            problems.append(f"activation_function={c.activation_function!r} (ours is the tanh GELU, 'gelu_new')")
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            problems.append("attention scores not scaled by 1/sqrt(head_dim) alone")
        cfg = ModelConfig(name=name, arch="gpt2", num_layers=c.n_layer, hidden_size=c.n_embd, num_heads=c.n_head,
                          num_kv_heads=c.n_head, ffn_hidden_size=c.n_inner or 4 * c.n_embd, vocab_size=c.vocab_size,
                          max_seq_len=c.n_positions, norm_eps=c.layer_norm_epsilon, dropout=c.resid_pdrop,
                          init_std=c.initializer_range, tie_embeddings=c.tie_word_embeddings)
    elif c.model_type == "llama":
        if c.hidden_act != "silu":
            problems.append(f"hidden_act={c.hidden_act!r} (ours is SwiGLU, 'silu')")
        if c.attention_bias or c.mlp_bias:
            problems.append("attention or MLP biases (ours has none)")
        if c.head_dim != c.hidden_size // c.num_attention_heads:
            problems.append(f"head_dim={c.head_dim} other than hidden_size / num_attention_heads")
        if c.rope_parameters.get("rope_type", "default") != "default":
            problems.append(f"RoPE scaling {c.rope_parameters['rope_type']!r} (ours is plain RoPE)")
        cfg = ModelConfig(name=name, arch="llama", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                          num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                          ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
                          max_seq_len=c.max_position_embeddings, rope_theta=c.rope_parameters["rope_theta"],
                          norm_eps=c.rms_norm_eps, init_std=c.initializer_range,
                          tie_embeddings=c.tie_word_embeddings)
    else:
        raise ValueError(f"model_type {c.model_type!r}: only 'gpt2' and 'llama' models can be imported")
    if problems:
        raise ValueError(f"this {c.model_type} model does not fit ours: " + "; ".join(problems))
    return cfg


def _state_from_hf(cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict -> our parameters by name (a tied head once, as `tok_emb.weight`)."""
    state = {ours: (hf_state[theirs].T if transposed else hf_state[theirs]).contiguous()
             for ours, (theirs, transposed) in _name_map(cfg).items()}
    if cfg.tie_embeddings:
        del state["head.weight"]
    if cfg.arch == "gpt2":
        h = cfg.hidden_size
        for i in range(cfg.num_layers):
            c_attn = f"transformer.h.{i}.attn.c_attn"
            weights = hf_state[c_attn + ".weight"].T.split(h)
            biases = hf_state[c_attn + ".bias"].split(h)
            for p, w, b in zip("qkv", weights, biases, strict=True):
                state[f"blocks.{i}.attn.{p}_proj.weight"] = w.contiguous()
                state[f"blocks.{i}.attn.{p}_proj.bias"] = b.contiguous()
    return state


def hf_weights(hf_dir: str | os.PathLike) -> FullTensors:
    """A transformers directory's weights under our names, as whole tensors (for train.init_from)."""
    _, tensors = from_hf(hf_dir)
    return FullTensors(tensors, str(hf_dir))


def from_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers GPT-2 or Llama directory -> our ModelConfig and fp32 parameters by our names."""
    # use_safetensors: a pickled pytorch_model.bin is refused, like everything else we load.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True,
                                                 use_safetensors=True)
    cfg = _model_config_from_hf(model.config, Path(hf_dir).resolve().name)
    return cfg, _state_from_hf(cfg, {k: v.detach() for k, v in model.state_dict().items()})


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level characters: printable Latin-1 bytes stand for themselves, the others move to 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def byte_tokenizer_as_hf() -> Tokenizer:
    """Our byte tokenizer as a `tokenizers.Tokenizer`: byte b is id b, then the special tokens from 256.

    A byte-level BPE with no merges over the 256 byte characters in byte order: every byte stays its own token.
    """
    alphabet = _byte_level_alphabet()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()  # invalid UTF-8 decodes to U+FFFD, as ByteTokenizer.decode does
    tok.add_special_tokens(list(BYTE_SPECIAL_TOKENS))
    return tok


def save_hf_tokenizer(tokenizer: ByteTokenizer | HFTokenizer, eod_id: int, output: str | os.PathLike,
                      max_length: int | None = None) -> None:
    """Write `tokenizer` where AutoTokenizer.from_pretrained(output) loads it, end-of-document as EOS and BOS, and
    `max_length` (the model's context) as its model_max_length."""
    backend = byte_tokenizer_as_hf() if isinstance(tokenizer, ByteTokenizer) else tokenizer.hf
    eod = backend.id_to_token(eod_id)
    limit = {} if max_length is None else {"model_max_length": max_length}  # else transformers' "no limit", 1e30
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eod, bos_token=eod,
                            clean_up_tokenization_spaces=False, **limit).save_pretrained(output)


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write a checkpoint as a transformers model directory (safetensors, config, tokenizer); returns it."""
    step_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    tokenizer = checkpoint_tokenizer(step_dir, meta)
    # Merged over tensor-parallel shards, vocabulary padding dropped.
    config, hf_state = to_hf(checkpoint_model_config(meta), load_full_weights(step_dir), meta["eod_id"])
    # Built on the meta device and then handed our tensors: no time spent on a random initialisation.
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hf_model.load_state_dict(hf_state, strict=True, assign=True)
    hf_model.tie_weights()
    hf_model.save_pretrained(output)
    context = config.n_positions if isinstance(config, GPT2Config) else config.max_position_embeddings
    save_hf_tokenizer(tokenizer, meta["eod_id"], output, context)
    for f in Path(output).iterdir():
        if f.is_file():
            honour_umask(f)
    return Path(output)


def read_hf_dir(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerFast,
                                                   int]:
    """A transformers GPT-2 or Llama directory, checked: our model config, its weights by our names, its tokenizer
    and the end-of-document (EOS) id."""
    if not (Path(hf_dir) / "config.json").is_file():
        # Checked here: transformers would take a missing directory for a Hub model name.
        raise ValueError(f"{hf_dir}: not a transformers model directory (no config.json)")
    if not any((Path(hf_dir) / name).is_file() for name in HF_TOKENIZER_FILES):
        # Without one, AutoTokenizer quietly builds an empty tokenizer of the model's type.
        raise ValueError(f"{hf_dir}: no tokenizer ({', '.join(HF_TOKENIZER_FILES)}); save it beside the model with "
                         "tokenizer.save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError(f"{hf_dir}: its tokenizer ({type(tokenizer).__name__}) has no tokenizer.json form")
    eod_id = tokenizer.eos_token_id
    if eod_id is None:
        raise ValueError(f"{hf_dir}: the tokenizer names no end-of-sequence token, so no end-of-document id")
    cfg, state = from_hf(hf_dir)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{hf_dir}: the tokenizer has {len(tokenizer)} tokens, the model only {cfg.vocab_size}")
    return cfg, state, tokenizer, eod_id


def hf_for_inference(hf_dir: str | os.PathLike) -> tuple[GPT, HFTokenizer, dict]:
    """A transformers directory as generation takes it: our model (fp32, eval mode), the tokenizer, its EOD id."""
    cfg, state, tokenizer, eod_id = read_hf_dir(hf_dir)
    model = GPT(cfg)
    copy_parameters(model, FullTensors(state, str(hf_dir)))
    with tempfile.TemporaryDirectory() as tmp:  # HFTokenizer reads a tokenizer.json, which it keeps in memory
        tokenizer.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"))
        ours = HFTokenizer(Path(tmp) / "tokenizer.json", tokenizer.eos_token, fast_backend=False)
    return model.eval(), ours, {"eod_id": eod_id}


def import_model(hf_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write a transformers GPT-2 or Llama directory as one of our step directories; returns it."""
    cfg, state, tokenizer, eod_id = read_hf_dir(hf_dir)
    out = Path(output)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, tmp / "model-pp00-tp00.safetensors")
    honour_umask(tmp / "model-pp00-tp00.safetensors")
    tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    # What read_meta and the loaders need; no optimizer state, so it serves train.init_from, not a resume.
    meta = {"format": FORMAT_VERSION, "step": 0, "world_size": 1, "tp": 1, "pp": 1, "dp": 1, "files": files,
            "config": {"model": asdict(cfg)}, "tokenizer": "tokenizer.json", "eod_id": eod_id,
            "imported_from": str(Path(hf_dir).resolve())}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if out.exists():
        out.rmdir()  # empty: checked by the caller
    os.replace(tmp, out)
    return out


def model_overrides(cfg: ModelConfig) -> str:
    """The `model.*` command-line overrides that make a training run build this model."""
    keys = ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
            "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings")
    return " ".join(f"model.{k}={getattr(cfg, k)}" for k in keys)


def _check_output(p: argparse.ArgumentParser, output: str) -> None:
    if Path(output).exists() and (not Path(output).is_dir() or any(Path(output).iterdir())):
        p.error(f"--output {output} exists and is not an empty directory; choose a new one or remove it")


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/export_hf.py."""
    p = argparse.ArgumentParser(prog="export_hf.py", description="Write a checkpoint as a Hugging Face transformers "
                                "model directory (GPT2LMHeadModel or LlamaForCausalLM) with its tokenizer.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a step directory, or a run directory (its latest checkpoint)")
    p.add_argument("--output", required=True, metavar="DIR", help="a new (or empty) directory")
    args = p.parse_args(argv)
    _check_output(p, args.output)
    try:
        out = export_checkpoint(args.checkpoint, args.output)
    except (CheckpointError, TokenizerError, ValueError) as e:
        p.error(str(e))
    print(f"exported {args.checkpoint} -> {out}; load it with AutoModelForCausalLM.from_pretrained and "
          "AutoTokenizer.from_pretrained", file=sys.stderr)
    return 0


def import_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/import_hf.py."""
    p = argparse.ArgumentParser(prog="import_hf.py", description="Write a Hugging Face transformers GPT-2 or Llama "
                                "directory as a checkpoint step directory, usable as train.init_from and by "
                                "generate.py.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a transformers model directory (config.json, weights, tokenizer)")
    p.add_argument("--output", required=True, metavar="DIR", help="a new (or empty) directory: the step directory")
    args = p.parse_args(argv)
    _check_output(p, args.output)
    try:
        out = import_model(args.model, args.output)
    except (OSError, ValueError) as e:
        p.error(str(e))
    cfg = checkpoint_model_config(read_meta(out))
    print(f"imported {args.model} -> {out}\ncontinue training from it with: train.init_from={out} "
          f"{model_overrides(cfg)}", file=sys.stderr)
    return 0
