"""The GPT model against Hugging Face's GPT-2 and Llama, recomputation, initialisation, and the size/FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from engine.config import Config, ModelConfig, fill_defaults
from engine.model import GPT, count_parameters, flops_per_token

VOCAB = 97


def model_cfg(arch: str, **overrides) -> ModelConfig:
    """A tiny ModelConfig with the run's defaults filled in."""
    fields = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "max_seq_len": 32} | overrides
    return fill_defaults(Config(model=ModelConfig(arch=arch, **fields)), world_size=1, vocab_size=VOCAB).model


def randomised(model: GPT) -> GPT:
    """Every parameter random (norms and biases too), so a mis-mapped weight cannot hide behind ones and zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def into_hf(model: GPT):
    """transformers' GPT2LMHeadModel or LlamaForCausalLM holding our weights, mapped by engine.hf."""
    from transformers import AutoModelForCausalLM

    from engine.hf import to_hf

    config, state = to_hf(model.cfg, model.state_dict(), eod_id=0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def assert_matches_hf(model: GPT, hf) -> None:
    """Same logits (< 1e-5) on random tokens, and our loss on shifted targets equals HF's loss with labels."""
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(input_ids=tokens).logits
        assert (ours - theirs).abs().max().item() < 1e-5
        # HF shifts labels inside: position t predicts token t+1, the last position predicts nothing.
        loss = model(tokens[:, :-1], tokens[:, 1:])
        torch.testing.assert_close(loss, hf(input_ids=tokens, labels=tokens).loss, rtol=1e-6, atol=1e-6)


def test_gpt2_matches_transformers():
    torch.manual_seed(0)
    model = randomised(GPT(model_cfg("gpt2", norm_eps=1e-5))).eval()
    assert model.head.weight is model.tok_emb.weight
    assert_matches_hf(model, into_hf(model))


@pytest.mark.parametrize("tie", [False, True])
def test_llama_matches_transformers(tie):
    torch.manual_seed(0)
    cfg = model_cfg("llama", num_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=tie)
    model = randomised(GPT(cfg)).eval()
    assert (model.head.weight is model.tok_emb.weight) == tie
    assert_matches_hf(model, into_hf(model))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_recompute_gives_identical_gradients(arch, dropout, monkeypatch):
    """Same loss and bit-identical gradients; the attention core (selective) or whole blocks (full) rerun."""
    attention_calls, mlp_calls = [], []
    attention = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: attention_calls.append(1) or attention(*a, **kw))
    tokens = torch.randint(0, VOCAB, (2, 16))
    results = {}
    for recompute in ("none", "selective", "full"):
        torch.manual_seed(0)  # same weights and same dropout masks for each
        model = GPT(model_cfg(arch, num_kv_heads=2, dropout=dropout, recompute=recompute)).train()
        for block in model.blocks.values():
            # A pre-hook: recomputation stops as soon as the last saved tensor is rebuilt, before an MLP returns.
            block.mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
        attention_calls.clear()
        mlp_calls.clear()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results[recompute] = (loss, {n: p.grad for n, p in model.named_parameters()})
        layers = model.cfg.num_layers
        assert len(attention_calls) == (layers if recompute == "none" else 2 * layers)
        assert len(mlp_calls) == (2 * layers if recompute == "full" else layers)
    for recompute in ("selective", "full"):
        torch.testing.assert_close(results[recompute], results["none"], rtol=0, atol=0)


PARAMETER_CASES = [
    ("gpt2", {}),
    ("gpt2", {"tie_embeddings": False}),
    ("gpt2", {"num_kv_heads": 2}),
    ("llama", {"num_kv_heads": 1}),
    ("llama", {"num_kv_heads": 2}),
    ("llama", {"num_kv_heads": 4}),
    ("llama", {"num_kv_heads": 2, "tie_embeddings": True}),
    ("llama", {"ffn_hidden_size": 96, "num_layers": 3}),
]


@pytest.mark.parametrize(("arch", "overrides"), PARAMETER_CASES)
def test_count_parameters_matches_model(arch, overrides):
    cfg = model_cfg(arch, **overrides)
    model = GPT(cfg)
    # Independent of parameters()'s own de-duplication: the state dict lists a tied weight under both names.
    unique = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    assert count_parameters(cfg) == model.num_parameters() == sum(unique.values())


def test_count_parameters_matches_published_sizes():
    """GPT-2 small is 124,439,808 parameters in HF's checkpoint; TinyLlama-1.1B is 1,100,048,384."""
    gpt2 = ModelConfig(arch="gpt2", num_layers=12, hidden_size=768, num_heads=12, max_seq_len=1024)
    llama = ModelConfig(arch="llama", num_layers=22, hidden_size=2048, num_heads=32, num_kv_heads=4,
                        ffn_hidden_size=5632)
    assert count_parameters(fill_defaults(Config(model=gpt2), 1, vocab_size=50257).model) == 124_439_808
    assert count_parameters(fill_defaults(Config(model=llama), 1, vocab_size=32000).model) == 1_100_048_384


def test_flops_per_token_by_hand():
    """Llama, 4 heads of 16 with 2 KV heads, 2 layers: every matmul written out, then the attention term."""
    cfg = model_cfg("llama", num_kv_heads=2, ffn_hidden_size=192, tie_embeddings=True)
    h, kv, f, layers, seq = 64, 2 * 16, 192, 2, 32
    q, k, v, o = h * h, h * kv, h * kv, h * h
    gate, up, down = h * f, h * f, f * h
    head = h * VOCAB  # counted although tied: the output projection is still a matmul
    n_matmul = layers * (q + k + v + o + gate + up + down) + head
    attention = layers * 3 * (2 * seq * h + 2 * seq * h)  # q k^T and scores v, forward + 2x backward
    assert flops_per_token(cfg, seq) == 6 * n_matmul + attention


def test_flops_per_token_gpt2_by_hand():
    cfg = model_cfg("gpt2")  # ffn 4h, tied
    h, f, layers, seq = 64, 256, 2, 20
    n_matmul = layers * (4 * h * h + h * f + f * h) + h * VOCAB
    assert flops_per_token(cfg, seq) == 6 * n_matmul + 12 * layers * h * seq


def test_grouped_query_saves_exactly_the_kv_projections():
    full, grouped = model_cfg("llama", num_kv_heads=4), model_cfg("llama", num_kv_heads=1)
    head_dim, saved_heads = 16, 3
    kv_projection_flops = 6 * 2 * full.num_layers * full.hidden_size * saved_heads * head_dim  # k and v
    assert flops_per_token(full, 64) - flops_per_token(grouped, 64) == kv_projection_flops


def test_flops_ignore_tying():
    assert flops_per_token(model_cfg("gpt2", tie_embeddings=True), 32) == flops_per_token(
        model_cfg("gpt2", tie_embeddings=False), 32)


def test_init():
    torch.manual_seed(0)
    layers, std = 4, 0.02
    model = GPT(model_cfg("gpt2", num_layers=layers, hidden_size=256, init_std=std))
    block = list(model.blocks.values())[-1]
    for proj in (block.attn.o_proj, block.mlp.down_proj):
        assert proj.weight.std().item() == pytest.approx(std / math.sqrt(2 * layers), rel=0.05)
    for weight in (block.attn.q_proj.weight, block.mlp.up_proj.weight, model.tok_emb.weight, model.pos_emb.weight):
        assert weight.std().item() == pytest.approx(std, rel=0.05)
        assert abs(weight.mean().item()) < std / 20
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
