"""Parameter and FLOP counts computed from the config alone, for logging model size and MFU.

With h = hidden_size, f = ffn_hidden_size, L = num_layers, V = vocab_size, d = h / num_heads,
kv = num_kv_heads * d (the K and V projection width; kv = h without grouped-query attention):

    matrix weights per layer   = h*h (q) + h*kv (k) + h*kv (v) + h*h (o) + m*h*f (MLP; m = 2 for GPT-2, 3 for Llama)
    N_matmul                   = L * (matrix weights per layer) + V*h (output head, tied or not: it is a matmul)

Worked example, Llama with h=64, 4 heads, 2 KV heads (kv=32), f=192, L=2, V=100: per layer
4096 + 2048 + 2048 + 4096 + 3*12288 = 49152, so N_matmul = 2*49152 + 6400 = 104704, and at seq_len=32
flops_per_token = 6*104704 + 12*2*64*32 = 628224 + 49152 = 677376.
"""

from __future__ import annotations

from engine.config import ModelConfig


def matmul_weights_per_layer(cfg: ModelConfig) -> int:
    """Weights of the q, k, v, o projections and the MLP matrices of one layer (each does 2 FLOPs per token forward,
    4 backward)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = cfg.num_kv_heads * (h // cfg.num_heads)
    mlp_matrices = 2 if cfg.arch == "gpt2" else 3  # up, down (+ gate for SwiGLU)
    return 2 * h * h + 2 * h * kv + mlp_matrices * h * f


def count_parameters(cfg: ModelConfig) -> int:
    """Unique parameters of GPT(cfg), tied weights once: N_matmul plus embeddings, norms and biases.

    Beyond the matrix weights (module docstring), per layer: GPT-2 has biases on q, k, v, o (h + kv + kv + h) and on
    the MLP (f + h) and two LayerNorms of weight + bias (4h); Llama has two RMSNorm weights (2h). Once: the token
    embedding V*h, GPT-2's position table max_seq_len*h, the final norm (2h GPT-2, h Llama), and the output head
    V*h only when untied.
    """
    h, f, vocab = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    kv = cfg.num_kv_heads * (h // cfg.num_heads)
    if cfg.arch == "gpt2":
        per_layer = (2 * h + 2 * kv) + (f + h) + 4 * h
        once = vocab * h + cfg.max_seq_len * h + 2 * h
    else:
        per_layer = 2 * h
        once = vocab * h + h
    head = 0 if cfg.tie_embeddings else vocab * h
    return cfg.num_layers * (matmul_weights_per_layer(cfg) + per_layer) + once + head


def parameters_per_rank(cfg: ModelConfig, tp: int, layers: range | None = None) -> int:
    """Parameters one tensor-parallel rank of the pipeline stage holding `layers` holds (default: every layer).

    Split by tp: the q, o and MLP matrices, their column biases, K/V when tp divides the KV heads, and the padded
    vocabulary rows (the padding included: it is allocated). Whole on every rank: norms, row-parallel biases,
    GPT-2's position table, and K/V when tp exceeds the KV heads. The first stage holds the embeddings, the last
    the final norm and the head; a tied head on a last stage without the embedding is a copy, and counted.
    """
    from engine.parallel.layers import padded_vocab_size  # the model's own padding rule

    layers = range(cfg.num_layers) if layers is None else layers
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = cfg.num_kv_heads * (h // cfg.num_heads)
    gpt2 = cfg.arch == "gpt2"
    kv_split = tp if cfg.num_kv_heads % tp == 0 else 1
    mlp_in = (1 if gpt2 else 2) * h * f // tp  # up (and gate)
    per_layer = 2 * h * h // tp + 2 * h * kv // kv_split + mlp_in + f * h // tp
    if gpt2:  # biases of q, k, v (split like their weights), up (split), o and down (whole); two LayerNorms
        per_layer += h // tp + 2 * kv // kv_split + f // tp + 2 * h + 4 * h
    else:  # two RMSNorms
        per_layer += 2 * h
    vocab_matrix = padded_vocab_size(cfg.vocab_size, tp, cfg.make_vocab_size_divisible_by) // tp * h
    first, last = layers.start == 0, layers.stop == cfg.num_layers
    total = len(layers) * per_layer
    if first:  # token embedding (+ GPT-2's positions)
        total += vocab_matrix + (cfg.max_seq_len * h if gpt2 else 0)
    if last:  # final norm and head (shared with the embedding when tied on the same stage)
        total += (2 * h if gpt2 else h) + (0 if cfg.tie_embeddings and first else vocab_matrix)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * L * h * seq_len.

    6 * N_matmul: each matrix weight does one multiply-add (2 FLOPs) per token forward and twice that backward
    (input and weight gradients). The attention term: per layer and token, q k^T and (scores) v each cost
    2 * seq_len * h forward, so 4 * seq_len * h, times 3 for forward + backward = 12 * seq_len * h (the causal
    mask's skipped half is not subtracted, as in PaLM's MFU). Grouped-query attention leaves this term unchanged;
    it only shrinks N_matmul through narrower K/V projections. Embedding lookups, position tables, norms and biases
    are not counted.
    """
    n_matmul = cfg.num_layers * matmul_weights_per_layer(cfg) + cfg.vocab_size * cfg.hidden_size
    return 6.0 * n_matmul + cfg.num_layers * attention_flops_per_token(cfg, seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """One layer's q k^T and (scores) v FLOPs per token, forward and backward: 3 * 2 * (2 * seq_len * h), the
    causal mask's skipped half included (flops_per_token)."""
    return 12.0 * cfg.hidden_size * seq_len
