"""The PyTorch kernel references against independent naive formulas, and the backend dispatch's errors."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import kernels

LEADING_SHAPES = [(), (5,), (2, 3), (2, 2, 3)]


@pytest.fixture(autouse=True)
def _default_backends():
    """Leave the process-wide defaults as found, whatever a test configured."""
    yield
    kernels.configure()


@pytest.mark.parametrize("lead", LEADING_SHAPES)
def test_rms_norm(lead):
    x, w = torch.randn(*lead, 16), torch.randn(16)
    x64, w64 = x.double(), w.double()
    expected = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", LEADING_SHAPES)
def test_layer_norm(lead):
    x, w, b = torch.randn(*lead, 16) * 3 + 1, torch.randn(16), torch.randn(16)
    x64 = x.double()
    mean = x64.sum(-1, keepdim=True) / 16
    var = ((x64 - mean) ** 2).sum(-1, keepdim=True) / 16  # biased variance, as LayerNorm uses
    expected = (x64 - mean) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", LEADING_SHAPES)
def test_gelu_tanh(lead):
    x = torch.randn(*lead, 16) * 3
    x64 = x.double()
    expected = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    torch.testing.assert_close(kernels.gelu_tanh(x).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", LEADING_SHAPES)
def test_swiglu(lead):
    gate, up = torch.randn(*lead, 16) * 3, torch.randn(*lead, 16)
    g64 = gate.double()
    expected = g64 / (1 + torch.exp(-g64)) * up.double()
    torch.testing.assert_close(kernels.swiglu(gate, up).double(), expected, rtol=1e-5, atol=1e-6)


def test_rotary_matches_complex_rotation():
    """Rotate-half RoPE pairs dimension i with i + d/2 as a complex number and turns it by pos * theta^(-2i/d)."""
    batch, seq, heads, dim, theta = 2, 7, 3, 8, 500000.0
    x = torch.randn(batch, seq, heads, dim)
    cos, sin = kernels.rope_cache(seq, dim, theta)
    assert cos.shape == sin.shape == (seq, dim)

    x64 = x.double()
    z = torch.complex(x64[..., : dim // 2], x64[..., dim // 2 :])
    freq = theta ** (-torch.arange(dim // 2, dtype=torch.float64) * 2 / dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq  # (seq, dim/2)
    turned = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]  # broadcast over heads
    expected = torch.cat((turned.real, turned.imag), dim=-1)
    torch.testing.assert_close(kernels.apply_rotary(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


def test_rotary_keeps_dtype():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert kernels.apply_rotary(x, *kernels.rope_cache(4, 8, 10000.0)).dtype == torch.bfloat16


def _naive_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d) + mask) v per head in float64, each query head reading K/V head h // group."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        seq = q.size(2)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_grouped_query(kv_heads, causal):
    batch, seq, heads, dim = 2, 6, 4, 8
    q = torch.randn(batch, seq, heads, dim)
    k, v = torch.randn(batch, seq, kv_heads, dim), torch.randn(batch, seq, kv_heads, dim)
    out = kernels.attention(q, k, v, causal=causal)
    assert out.shape == (batch, seq, heads, dim)
    torch.testing.assert_close(out.double(), _naive_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


def _naive_cross_entropy(logits, targets, ignore_index):
    logits, targets = logits.double().reshape(-1, logits.size(-1)), targets.reshape(-1)
    keep = targets != ignore_index
    picked = logits[keep].gather(1, targets[keep, None])[:, 0]
    return (torch.logsumexp(logits[keep], dim=-1) - picked).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_ignores_and_upcasts(dtype):
    logits = (torch.randn(3, 5, 11) * 4).to(dtype)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = -1
    targets[2, 4] = -1
    loss = kernels.cross_entropy(logits, targets, ignore_index=-1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _naive_cross_entropy(logits, targets, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("backend", "attention"), [("auto", "auto"), ("torch", "sdpa")])
def test_configure_accepts_available_backends(backend, attention):
    kernels.configure(backend=backend, attention=attention)
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    torch.testing.assert_close(kernels.attention(q, k, v).double(), _naive_attention(q, k, v, True), rtol=1e-5,
                               atol=1e-5)


@pytest.fixture
def no_gpu(monkeypatch):
    """A process without CUDA and without Triton's CPU interpreter: the Triton kernels cannot run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_triton_backend_names_the_key_and_the_fix(no_gpu):
    with pytest.raises(RuntimeError, match=r"kernels\.backend='triton': no CUDA device.*TRITON_INTERPRET=1"):
        kernels.configure(backend="triton")
    with pytest.raises(RuntimeError, match=r"kernels\.backend='triton': tensors on cpu.*TRITON_INTERPRET=1"):
        kernels.rms_norm(torch.randn(2, 4), torch.ones(4), 1e-5, backend="triton")
    with pytest.raises(RuntimeError, match=r"kernels\.attention='triton': no CUDA device.*TRITON_INTERPRET=1"):
        kernels.configure(attention="triton")


def test_triton_not_importable_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(RuntimeError, match=r"kernels\.backend='triton': triton does not import.*pip install triton"):
        kernels.configure(backend="triton")
    with pytest.raises(RuntimeError, match=r"kernels\.attention='triton': triton does not import"):
        kernels.configure(attention="triton")


def test_failed_configure_keeps_previous_defaults(no_gpu):
    kernels.configure(backend="torch", attention="sdpa")
    with pytest.raises(RuntimeError):
        kernels.configure(backend="torch", attention="triton")
    q = torch.randn(1, 3, 2, 4)
    kernels.attention(q, q, q)  # still sdpa: the failed call stored nothing


def test_flash_attn_missing_says_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    with pytest.raises(RuntimeError, match=r"kernels\.attention='flash_attn'.*not installed"):
        kernels.configure(attention="flash_attn")
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(RuntimeError, match=r"kernels\.attention='flash_attn'.*not installed"):
        kernels.attention(q, q, q, backend="flash_attn")


def test_flash_attn_installed_needs_cuda(monkeypatch, no_gpu):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    with pytest.raises(RuntimeError, match=r"kernels\.attention='flash_attn' runs on CUDA only"):
        kernels.configure(attention="flash_attn")
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(RuntimeError, match=r"kernels\.attention='flash_attn' runs on CUDA only"):
        kernels.attention(q, q, q, backend="flash_attn")


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match=r"kernels\.backend='cuda' is not one of auto, triton, torch"):
        kernels.configure(backend="cuda")
    with pytest.raises(ValueError, match=r"kernels\.attention='flash' is not one of"):
        kernels.attention(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), backend="flash")
