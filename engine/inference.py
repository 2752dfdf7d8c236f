"""Text generation from a checkpoint with a KV cache (`tools/generate.py`), and the checkpoint loaders export uses.

The prompt goes through the model once (prefill), then each new token alone, its keys and values appended to the
cache; generation stops at the end-of-document id or after `max_new_tokens`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.data.tokenizer import BYTE_TOKENIZER, ByteTokenizer, HFTokenizer, TokenizerError
from engine.model import GPT
from engine.training.checkpoint import (
    CheckpointError,
    is_hf_model_dir,
    load_model_weights,
    read_meta,
    resolve_checkpoint,
)


def checkpoint_model_config(meta: dict) -> ModelConfig:
    """The model configuration a checkpoint was saved with (every derived default already filled in)."""
    cfg = ModelConfig(**meta["config"]["model"])
    cfg.recompute = "none"  # a training-memory setting; inference keeps no activations for a backward pass
    return cfg


def checkpoint_tokenizer(step_dir: Path, meta: dict) -> ByteTokenizer | HFTokenizer:
    """The tokenizer stored with a checkpoint: the built-in byte tokenizer, or its copied tokenizer.json."""
    if "tokenizer" not in meta or "eod_id" not in meta:
        raise CheckpointError(f"{step_dir}: the checkpoint records no tokenizer (it predates checkpoints that keep "
                              "one); save it again with the current trainer")
    if meta["tokenizer"] == BYTE_TOKENIZER:
        return ByteTokenizer()
    from tokenizers import Tokenizer

    if meta["tokenizer"] != "tokenizer.json":  # never follow a path read from a file
        raise CheckpointError(f"{step_dir}/meta.json: unexpected tokenizer entry {meta['tokenizer']!r}")
    path = step_dir / "tokenizer.json"
    try:
        # Named through the recorded id, so an imported tokenizer whose end-of-document token is not one of the
        # default names (e.g. Llama 3's "<|end_of_text|>") loads too.
        eod_token = Tokenizer.from_file(str(path)).id_to_token(meta["eod_id"])
    except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
        raise TokenizerError(f"{path}: cannot load as a Hugging Face tokenizer: {e}") from e
    return HFTokenizer(path, eod_token, fast_backend=False)


def load_for_inference(path: str | os.PathLike,
                       device: torch.device | str = "cpu") -> tuple[GPT, ByteTokenizer | HFTokenizer, dict]:
    """The model (eval mode, on `device`), tokenizer and metadata of a step directory, a run's latest checkpoint, or a
    transformers model directory (whose metadata is only its end-of-document id)."""
    if is_hf_model_dir(path):
        from engine.hf import hf_for_inference  # needs transformers: imported only for a transformers directory

        model, tokenizer, meta = hf_for_inference(path)
        return model.to(device), tokenizer, meta
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    model = GPT(checkpoint_model_config(meta))
    load_model_weights(step_dir, model)
    return model.to(device).eval(), checkpoint_tokenizer(step_dir, meta), meta


@dataclass
class Sampling:
    """How the next token is chosen from the logits: the argmax, or a draw after temperature, top-k and top-p."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p (nucleus)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) row of logits."""
    if sampling.greedy:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        kth_best = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already reach top_p; the most likely token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, eod_id: int, sampling: Sampling,
             generator: torch.Generator | None = None) -> list[int]:
    """The continuation of `prompt` (without the end-of-document token that may have ended it)."""
    device = model.tok_emb.weight.device
    cache = model.kv_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]
    new: list[int] = []
    while len(new) < max_new_tokens:
        token = next_token(logits, sampling, generator)
        if token == eod_id:
            break
        new.append(token)
        if len(new) < max_new_tokens:  # the last token's logits are never needed
            logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return new


def build_parser() -> argparse.ArgumentParser:
    """The command line of tools/generate.py."""
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Continue a prompt with a trained checkpoint (KV-cached decoding); prints the prompt and its "
        "continuation. Samples with temperature 1 unless told otherwise.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a step directory, a run directory (its latest checkpoint), or a transformers GPT-2/Llama "
                   "model directory (config.json, safetensors weights and its tokenizer)")
    p.add_argument("--prompt", required=True, help="text to continue; encoded with the run's tokenizer, no BOS/EOD")
    p.add_argument("--max-new-tokens", type=int, required=True, metavar="N", help="stop after N new tokens")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, metavar="T", help="divide the logits by T (default 1)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample among the most likely tokens covering P")
    p.add_argument("--seed", type=int, default=1234, help="the sampling seed: same seed, same text (default 1234)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    return p


def parse_sampling(p: argparse.ArgumentParser, args: argparse.Namespace) -> Sampling:
    """The Sampling the flags ask for; a usage error (exit 2) for contradictory or out-of-range values."""
    sampling_flags = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                     ("--top-p", args.top_p)) if v is not None]
    if args.greedy and sampling_flags:
        p.error(f"--greedy takes the most likely token; it cannot be combined with {', '.join(sampling_flags)}")
    if args.greedy:
        return Sampling(greedy=True)
    sampling = Sampling(temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                        top_p=1.0 if args.top_p is None else args.top_p)
    if not sampling.temperature > 0:
        p.error(f"--temperature must be positive, got {args.temperature} (use --greedy for the argmax)")
    if sampling.top_k is not None and sampling.top_k < 1:
        p.error(f"--top-k must be at least 1, got {args.top_k}")
    if not 0 < sampling.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return sampling


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/generate.py."""
    p = build_parser()
    args = p.parse_args(argv)
    sampling = parse_sampling(p, args)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt:
        p.error("--prompt is empty; give some text to continue")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available; use --device cpu")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer, meta = load_for_inference(args.checkpoint, device)
    except (CheckpointError, TokenizerError, ValueError, ImportError) as e:
        p.error(str(e))
    prompt = [int(i) for i in tokenizer.encode_batch([args.prompt])[0]]
    max_new = args.max_new_tokens
    if model.pos_emb is not None:  # GPT-2's learned positions end at max_seq_len
        room = model.cfg.max_seq_len - len(prompt)
        if room < 1:
            p.error(f"the prompt is {len(prompt)} tokens; this GPT-2 model takes at most {model.cfg.max_seq_len} "
                    "positions (model.max_seq_len), prompt and continuation together")
        if room < max_new:
            print(f"note: stopping after {room} new tokens, at model.max_seq_len={model.cfg.max_seq_len}",
                  file=sys.stderr)
            max_new = room
    generator = torch.Generator(device).manual_seed(args.seed)
    new = generate(model, prompt, max_new, meta["eod_id"], sampling, generator)
    # Bytes, not print(): the text is exactly what the tokenizer decoded, whatever the console's encoding.
    sys.stdout.buffer.write((tokenizer.decode(prompt + new) + "\n").encode("utf-8"))
    return 0
