"""The Triton kernels against the PyTorch references: forward values and every input's gradient, and the dispatch.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), which must be chosen before their
@triton.jit decorators run, i.e. before the kernel modules are imported: done below, above their imports. On a CUDA
machine the same tests run the compiled kernels on the GPU (set TRITON_INTERPRET=1 yourself to test the interpreter
there). The interpreter costs ~5 ms per program instance, so every shape here is tiny, but odd: hidden sizes that are
not powers of two, sequences that are not multiples of the block, batch 1 and > 1, grouped-query ratios 1, 2 and 4.

This module leaves the process as it found it: the variable is set only while the kernel modules are imported and
while this module's tests run (pytest imports every test module before running any, and the training CLI tests
start subprocesses that must not inherit it). triton itself is imported normally (torch._dynamo imports it early in
a pytest session anyway); `_interpreter` makes triton.language's own @jit helpers interpretable for these tests only.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
ON_CUDA = torch.cuda.is_available()
INTERPRET = not ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    pytest.importorskip("numpy", reason="Triton's interpreter needs numpy")

_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules' @triton.jit decorators run

import kernels  # noqa: E402
from engine.config import Config, ModelConfig, fill_defaults  # noqa: E402
from engine.model import GPT  # noqa: E402
from kernels import (  # noqa: E402
    dispatch,
    triton_activations,
    triton_attention,
    triton_common,
    triton_cross_entropy,
    triton_norms,
    triton_rope,
)

if _ENV_BEFORE is None:  # put it back until this module's tests run (see `_interpreter`)
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _ENV_BEFORE
assert triton_common.INTERPRETED == INTERPRET, "kernels.triton_* were imported before this module chose the mode"

DEVICE = "cuda" if ON_CUDA else "cpu"
REPO = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: the interpreter truncates fp32->bf16 casts and multiplies "
                                             "bf16 tl.dot operands wrongly, so bf16 is checked compiled only")

# Tolerances for torch.testing.assert_close (|actual - expected| <= atol + rtol * |expected|); half precision
# elsewhere follows the 2x-the-reference's-error rule of assert_matches_reference.
FP32 = {"rtol": 1e-5, "atol": 1e-5}  # fp32: a few ulps; the summation orders differ
FP16 = {"rtol": 2e-3, "atol": 1e-3}  # fp16 (eps 9.8e-4): two ulps
BF16 = {"rtol": 1.6e-2, "atol": 1e-2}  # bf16 (eps 7.8e-3): two ulps
TOLERANCES = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """While this module's tests run (when interpreting): TRITON_INTERPRET=1, and triton.language's @jit helpers
    (tl.sum, tl.max, tl.zeros...) as interpreter functions if triton was first imported compiled; undone after."""
    if not INTERPRET:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    swapped, made = [], {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                swapped.append((module, attr, value))
                setattr(module, attr, made.setdefault(id(value), InterpretedFunction(value.fn)))
    assert triton_common.interpreter_problem() is None
    yield
    for module, attr, value in swapped:
        setattr(module, attr, value)
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(autouse=True)
def _default_backends():
    """Leave the process-wide kernel defaults as found, whatever a test configured."""
    yield
    kernels.configure()


def randn(*shape, dtype=torch.float32, scale=1.0, requires_grad=True):
    """Random leaf tensor on the test device."""
    t = (torch.randn(*shape, dtype=torch.float32) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def run_both(fn, inputs: list[torch.Tensor], exact: bool = False):
    """fn(*inputs, backend=b) for b in torch, triton (and `exact`: torch on the inputs upcast to float64):
    {name: (output, gradients of every input that requires grad)}, all from the same output gradient."""
    results = {}
    grad_out = None
    runs = [("torch", "torch", lambda t: t), ("triton", "triton", lambda t: t)]
    if exact:
        runs.append(("exact", "torch", lambda t: t.double()))
    for name, backend, cast in runs:
        leaves = [cast(t.detach()).requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves, backend=backend)
        if grad_out is None:
            grad_out = torch.randn(out.shape, dtype=torch.float32).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], cast(grad_out))
        results[name] = (out, grads)
    return results


def assert_matches_reference(fn, inputs: list[torch.Tensor]) -> None:
    """Triton's output and every input's gradient have the reference's dtypes and agree with its values.

    fp32: within FP32 of the PyTorch reference. fp16/bf16: error against the reference computed in float64 from the
    same inputs at most twice the same-dtype reference's own error plus one ulp (of the largest value): the reference
    is not always the more accurate one (a half-precision reference rounds its intermediates; the Triton kernels
    keep them in fp32), and rounding steps that are part of its semantics (RMSNorm rounds x * rstd to x's dtype
    before the weight scales it) make both differ from float64 alike.
    """
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in inputs)
    results = run_both(fn, inputs, exact=half)
    (out, grads), (ref, ref_grads) = results["triton"], results["torch"]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert len(grads) == len(ref_grads) > 0
    assert [g.dtype for g in grads] == [r.dtype for r in ref_grads]
    if not half:
        for a, r in zip([out, *grads], [ref, *ref_grads], strict=True):
            torch.testing.assert_close(a, r, **FP32)
        return
    exact_out, exact_grads = results["exact"]
    for i, (a, r, e) in enumerate(zip([out, *grads], [ref, *ref_grads], [exact_out, *exact_grads], strict=True)):
        err, ref_err = (a.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        ulp = torch.finfo(a.dtype).eps * e.abs().max().item()
        assert err <= 2 * ref_err + ulp, f"{'output' if i == 0 else f'gradient {i}'}: error {err:.3g} vs " \
                                         f"reference's {ref_err:.3g} (+ ulp {ulp:.3g})"


# --- norms -----------------------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 33), (3, 5, 48), (2, 2, 3, 100), (70, 24)]  # leading dims 1..3; hidden not a power of two


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(shape, dtype):
    torch.manual_seed(0)
    x, w = randn(*shape, dtype=dtype, scale=3), randn(shape[-1])  # fp32 weight, as the model's
    assert_matches_reference(lambda x, w, backend: kernels.rms_norm(x, w, 1e-5, backend=backend), [x, w])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_layer_norm(shape, dtype):
    torch.manual_seed(1)
    x, w, b = randn(*shape, dtype=dtype, scale=3), randn(shape[-1]), randn(shape[-1])
    x = (x.detach() + 2).requires_grad_()  # a non-zero mean to subtract
    assert_matches_reference(lambda x, w, b, backend: kernels.layer_norm(x, w, b, 1e-5, backend=backend), [x, w, b])


# --- rotary ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "seq", "heads", "dim"), [(1, 7, 3, 24), (2, 9, 5, 64), (2, 1, 1, 8)])
def test_apply_rotary(batch, seq, heads, dim, dtype):
    torch.manual_seed(2)
    x = randn(batch, seq, heads, dim, dtype=dtype)
    cos, sin = (t.to(DEVICE) for t in kernels.rope_cache(seq, dim, 10000.0))
    assert_matches_reference(lambda x, backend: kernels.apply_rotary(x, cos, sin, backend=backend), [x])


def test_apply_rotary_strided_input_and_angle_gradients():
    """x a transposed view (not contiguous); cos/sin arbitrary tensors with gradients of their own."""
    torch.manual_seed(3)
    x = randn(2, 3, 5, 16).detach().transpose(1, 2).requires_grad_()  # (batch, seq=5, heads=3, dim)
    assert not x.is_contiguous()
    cos, sin = randn(5, 16), randn(5, 16)
    assert_matches_reference(lambda x, c, s, backend: kernels.apply_rotary(x, c, s, backend=backend), [x, cos, sin])


# --- activations -----------------------------------------------------------------------------------------------------

ACT_SHAPES = [(1, 1, 77), (3, 5, 77), (2, 700)]  # 1155 and 1400 elements: more than one 1024-element block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_swiglu(shape, dtype):
    torch.manual_seed(4)
    gate, up = randn(*shape, dtype=dtype, scale=4), randn(*shape, dtype=dtype)
    assert_matches_reference(lambda g, u, backend: kernels.swiglu(g, u, backend=backend), [gate, up])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_gelu_tanh(shape, dtype):
    torch.manual_seed(5)
    x = randn(*shape, dtype=dtype, scale=4)  # into both tails, where tanh saturates
    assert_matches_reference(lambda x, backend: kernels.gelu_tanh(x, backend=backend), [x])


# --- cross-entropy ---------------------------------------------------------------------------------------------------

def _targets(shape, vocab, ignore_index, ignored_fraction=0.3):
    targets = torch.randint(0, vocab, shape)
    targets[torch.rand(shape) < ignored_fraction] = ignore_index
    return targets.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("shape", "vocab", "ignore_index"), [
    ((3, 5), 1000, -100),  # several 128-wide chunks when interpreted, and a ragged last one
    ((1, 7), 517, -1),
    ((2, 4), 300, 0),  # the ignored value is also a real column
])
def test_cross_entropy(shape, vocab, ignore_index, dtype):
    torch.manual_seed(6)
    logits = randn(*shape, vocab, dtype=dtype, scale=4)
    targets = _targets(shape, vocab, ignore_index)
    assert (targets == ignore_index).any() and (targets != ignore_index).any()
    results = run_both(lambda x, backend: kernels.cross_entropy(x, targets, ignore_index, backend=backend), [logits])
    (loss, (grad,)), (ref, (ref_grad,)) = results["triton"], results["torch"]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref, **FP32)  # fp32 statistics whatever the logits' dtype
    torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])
    assert (grad.reshape(-1, vocab)[(targets == ignore_index).reshape(-1)] == 0).all()


def test_cross_entropy_logits_far_apart():
    """A row whose first chunk holds logits ~100 above the rest: the running max must rescale, not overflow."""
    torch.manual_seed(14)
    logits = randn(4, 600, scale=4).detach()
    logits[:2, :50] += 100.0  # rows 0-1: the maximum sits in the first chunk
    logits[2:, -50:] += 100.0  # rows 2-3: in the last one
    targets = torch.tensor([3, 560, 10, 599], device=DEVICE)
    results = run_both(lambda x, backend: kernels.cross_entropy(x, targets, backend=backend),
                       [logits.requires_grad_()])
    assert results["triton"][0].isfinite()
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **FP32)
    torch.testing.assert_close(results["triton"][1][0], results["torch"][1][0], **FP32)


def test_cross_entropy_all_ignored_is_nan_like_the_reference():
    logits = randn(2, 3, 50)
    targets = torch.full((2, 3), -100, device=DEVICE)
    assert kernels.cross_entropy(logits, targets, backend="torch").isnan()
    assert kernels.cross_entropy(logits, targets, backend="triton").isnan()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_cross_entropy_statistics(backend):
    """Three shards' statistics, combined as the all-reduces would, give the full loss and the full gradient."""
    torch.manual_seed(7)
    vocab, ignore_index, bounds = 1000, 5, [0, 300, 700, 1000]  # ignore_index a real column (a pad id)
    logits = randn(3, 5, vocab, scale=4)
    targets = _targets((3, 5), vocab, ignore_index)
    shards = [logits.detach()[..., a:b] for a, b in itertools.pairwise(bounds)]
    stats = [kernels.cross_entropy_shard_stats(s, targets, a, ignore_index, backend=backend)
             for s, a in zip(shards, bounds, strict=False)]
    maxes, sums, picked = (torch.stack(t) for t in zip(*stats, strict=True))  # each (shards, rows)
    global_max = maxes.max(0).values  # all_reduce(MAX)
    lse = global_max + torch.log((sums * torch.exp(maxes - global_max)).sum(0))  # all_reduce(SUM)
    valid = targets.reshape(-1) != ignore_index
    loss = ((lse - picked.sum(0))[valid]).mean()  # picked: all_reduce(SUM), one shard holds each target
    assert (picked[:, ~valid] == 0).all()  # ignored rows pick nothing, even where ignore_index is a column

    ref_logits = logits.detach().clone().requires_grad_()
    ref = kernels.cross_entropy(ref_logits, targets, ignore_index, backend="torch")
    ref.backward()
    torch.testing.assert_close(loss, ref, **FP32)
    grad_rows = torch.where(valid, 1.0 / valid.sum(), 0.0)  # d mean / d row loss
    grads = [kernels.cross_entropy_shard_grad(s, targets, a, lse, grad_rows, ignore_index, backend=backend)
             for s, a in zip(shards, bounds, strict=False)]
    torch.testing.assert_close(torch.cat(grads, dim=-1), ref_logits.grad, **FP32)
    # Any per-row gradient, ignored rows included (they get no one-hot term), as the other backend computes it.
    grad_rows = torch.rand(15, device=DEVICE)
    other = "torch" if backend == "triton" else "triton"
    for s, a in zip(shards, bounds, strict=False):
        torch.testing.assert_close(
            kernels.cross_entropy_shard_grad(s, targets, a, lse, grad_rows, ignore_index, backend=backend),
            kernels.cross_entropy_shard_grad(s, targets, a, lse, grad_rows, ignore_index, backend=other), **FP32)


# --- attention -------------------------------------------------------------------------------------------------------

def _attention_errors(batch, seq_q, seq_k, heads, kv_heads, dim, causal, dtype):
    """Max |error| of Triton and of the same-dtype reference against float64, for the output and dq, dk, dv."""
    q = randn(batch, seq_q, heads, dim, dtype=dtype)
    k, v = randn(batch, seq_k, kv_heads, dim, dtype=dtype), randn(batch, seq_k, kv_heads, dim, dtype=dtype)
    grad_out = randn(batch, seq_q, heads, dim, dtype=dtype, requires_grad=False)

    def run(backend, cast):
        leaves = [cast(t.detach()).requires_grad_() for t in (q, k, v)]
        out = kernels.attention(*leaves, causal=causal, backend=backend)
        return [out, *torch.autograd.grad(out, leaves, cast(grad_out))]

    exact = run("sdpa", lambda t: t.double())
    ours, ref = run("triton", lambda t: t), run("sdpa", lambda t: t)
    assert all(a.dtype == dtype and a.shape == e.shape for a, e in zip(ours, exact, strict=True))
    err = [(a.double() - e).abs().max().item() for a, e in zip(ours, exact, strict=True)]
    ref_err = [(a.double() - e).abs().max().item() for a, e in zip(ref, exact, strict=True)]
    return err, ref_err


ATTENTION_CASES = [
    # batch, seq_q, seq_k, heads, kv_heads, dim, causal
    (1, 37, 37, 4, 4, 16, True),  # 3 blocks of 16, ragged
    (2, 33, 33, 4, 2, 32, True),  # GQA 2
    (2, 20, 20, 4, 1, 64, False),  # GQA 4, no mask
    (1, 19, 19, 2, 2, 128, True),
    (1, 13, 29, 4, 2, 16, False),  # more keys than queries
    (2, 29, 13, 2, 1, 16, True),  # more queries than keys; causal top-left aligned as SDPA's
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "seq_q", "seq_k", "heads", "kv_heads", "dim", "causal"), ATTENTION_CASES)
def test_attention(batch, seq_q, seq_k, heads, kv_heads, dim, causal, dtype):
    """FlashAttention's rule: error vs float64 at most 2x the same-dtype reference's, for out, dq, dk, dv.

    fp32 adds 1e-6 to the bound: both errors are then a few ulps, and 2x of one lucky ulp is noise, not a bug.
    """
    torch.manual_seed(8)
    err, ref_err = _attention_errors(batch, seq_q, seq_k, heads, kv_heads, dim, causal, dtype)
    slack = 1e-6 if dtype == torch.float32 else 0.0
    for name, e, r in zip(("out", "dq", "dk", "dv"), err, ref_err, strict=True):
        assert e <= 2 * r + slack, f"{name}: triton error {e:.3g} vs reference {r:.3g}"


def test_attention_rejects_unsupported_head_dim():
    q = randn(1, 4, 2, 24)
    with pytest.raises(ValueError, match=r"kernels\.attention='triton' supports head dims 16, 32, 64 and 128"):
        kernels.attention(q, q, q, backend="triton")


# --- bf16, compiled only ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
def test_bf16_elementwise_and_norms():
    torch.manual_seed(9)
    bf = torch.bfloat16
    x, w, b = randn(4, 33, 4096, dtype=bf), randn(4096), randn(4096)
    assert_matches_reference(lambda x, w, backend: kernels.rms_norm(x, w, 1e-5, backend=backend), [x, w])
    assert_matches_reference(lambda x, w, b, backend: kernels.layer_norm(x, w, b, 1e-5, backend=backend), [x, w, b])
    g, u = randn(4, 33, 1000, dtype=bf, scale=4), randn(4, 33, 1000, dtype=bf)
    assert_matches_reference(lambda g, u, backend: kernels.swiglu(g, u, backend=backend), [g, u])
    assert_matches_reference(lambda g, backend: kernels.gelu_tanh(g, backend=backend), [g])
    q = randn(2, 65, 8, 128, dtype=bf)
    cos, sin = (t.to(DEVICE) for t in kernels.rope_cache(65, 128, 500000.0))
    assert_matches_reference(lambda q, backend: kernels.apply_rotary(q, cos, sin, backend=backend), [q])
    logits, targets = randn(3, 70, 32001, dtype=bf, scale=4), _targets((3, 70), 32001, -100)
    results = run_both(lambda x, backend: kernels.cross_entropy(x, targets, backend=backend), [logits])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **FP32)
    torch.testing.assert_close(results["triton"][1][0], results["torch"][1][0], **BF16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("seq", "heads", "kv_heads", "dim"), [(1000, 8, 2, 128), (257, 4, 4, 64), (129, 4, 1, 16)])
def test_bf16_attention(seq, heads, kv_heads, dim):
    torch.manual_seed(10)
    err, ref_err = _attention_errors(2, seq, seq, heads, kv_heads, dim, True, torch.bfloat16)
    for name, e, r in zip(("out", "dq", "dk", "dv"), err, ref_err, strict=True):
        assert e <= 2 * r, f"{name}: triton error {e:.3g} vs reference {r:.3g}"


# --- the model -------------------------------------------------------------------------------------------------------

def _tiny_gpt(arch: str, layers: int = 2) -> GPT:
    # head_dim 16, the smallest the Triton attention takes; 2 kv heads for 4 query heads on Llama.
    cfg = ModelConfig(arch=arch, num_layers=layers, hidden_size=64, num_heads=4,
                      num_kv_heads=2 if arch == "llama" else 4, max_seq_len=32)
    torch.manual_seed(11)
    model = GPT(fill_defaults(Config(model=cfg), world_size=1, vocab_size=97).model).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():  # norms and biases random too, so a wrong gradient cannot hide behind ones
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_gpt_forward_backward_matches_torch_backend(arch):
    """Loss and every parameter's gradient with kernels.backend=triton, kernels.attention=triton vs torch/sdpa."""
    tokens = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    results = {}
    for backend, attention in (("torch", "sdpa"), ("triton", "triton")):
        kernels.configure(backend=backend, attention=attention)
        model = _tiny_gpt(arch)
        loss = model(tokens[:, :-1], tokens[:, 1:])  # 13 positions: not a multiple of the block
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    loss, grads = results["triton"]
    ref_loss, ref_grads = results["torch"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        # Gradients pass through 2 layers of fp32 kernels in different summation orders: a few ulps more.
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tiny_llama_optimizer_steps_match_torch_backend():
    """Three AdamW steps give the same losses with the Triton kernels as with the references."""
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    losses = {}
    for backend, attention in (("torch", "sdpa"), ("triton", "triton")):
        kernels.configure(backend=backend, attention=attention)
        model = _tiny_gpt("llama", layers=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(3):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)


# --- dispatch --------------------------------------------------------------------------------------------------------

def test_configured_triton_routes_every_kernel(monkeypatch):
    """kernels.backend=triton / kernels.attention=triton send each call through the Triton modules."""
    calls = []
    for module, name in [(triton_norms, "rms_norm"), (triton_norms, "layer_norm"), (triton_rope, "apply_rotary"),
                         (triton_activations, "swiglu"), (triton_activations, "gelu_tanh"),
                         (triton_cross_entropy, "cross_entropy"), (triton_attention, "attention")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    kernels.configure(backend="triton", attention="triton")
    x, w = randn(2, 16), randn(16)
    kernels.rms_norm(x, w, 1e-5)
    kernels.layer_norm(x, w, w, 1e-5)
    kernels.swiglu(x, x)
    kernels.gelu_tanh(x)
    kernels.cross_entropy(x, torch.tensor([1, 2], device=DEVICE))
    q = randn(1, 4, 2, 16)
    kernels.apply_rotary(q, *(t.to(DEVICE) for t in kernels.rope_cache(4, 16, 10000.0)))
    kernels.attention(q, q, q)
    assert sorted(calls) == sorted(["rms_norm", "layer_norm", "swiglu", "gelu_tanh", "cross_entropy",
                                    "apply_rotary", "attention"])


def test_auto_keeps_to_the_references_and_sdpa(monkeypatch):
    """`auto` picks the PyTorch references and SDPA (flash-attn for half precision on CUDA when it imports); our
    Triton kernels run only when asked for (on an H200 they beat the references for some kernels only)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dispatch.resolve_backend("auto", cpu) == "torch"  # even with the interpreter available
    assert dispatch.resolve_backend("auto", cuda) == "torch"
    assert dispatch.resolve_attention("auto", cpu, torch.bfloat16, 128) == "sdpa"
    monkeypatch.setattr(dispatch, "flash_attn_available", lambda: False)
    assert dispatch.resolve_attention("auto", cuda, torch.bfloat16, 128) == "sdpa"
    assert dispatch.resolve_attention("auto", cuda, torch.float32, 128) == "sdpa"
    monkeypatch.setattr(dispatch, "flash_attn_available", lambda: True)
    assert dispatch.resolve_attention("auto", cuda, torch.bfloat16, 128) == "flash_attn"
    assert dispatch.resolve_attention("auto", cuda, torch.float32, 128) == "sdpa"


def test_auto_never_looks_for_flash_attn_off_cuda(monkeypatch):
    def forbidden():
        raise AssertionError("flash_attn looked up for a CPU tensor")

    monkeypatch.setattr(dispatch, "flash_attn_available", forbidden)
    q = torch.randn(1, 4, 2, 16)
    kernels.attention(q, q, q)


def test_dispatch_compiles_without_graph_breaks(monkeypatch):
    """torch.compile(fullgraph=True) through kernels.* with the Triton backend configured: the resolvers' imports and
    environment reads must not break the graph. (The interpreted launch itself cannot be traced, so the Triton
    function is swapped for a PyTorch one; dynamo traces compiled Triton launches natively.)"""
    monkeypatch.setattr(triton_norms, "rms_norm", lambda x, w, eps: x * w)
    kernels.configure(backend="triton", attention="sdpa")
    x, w = torch.randn(3, 8, device=DEVICE), torch.randn(8, device=DEVICE)  # CPU tensors refuse Triton on CUDA
    compiled = torch.compile(lambda x, w: kernels.rms_norm(x, w, 1e-5), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), x * w)

    # `auto` for CUDA tensors looks for flash-attn, which is not installed here: that failed import neither.
    monkeypatch.setattr(dispatch, "_flash_attn_cache", {})
    cuda = torch.device("cuda")
    resolve = torch.compile(lambda x: x + len(dispatch.resolve_attention("auto", cuda, torch.bfloat16, 128)),
                            backend="eager", fullgraph=True)
    expected = "flash_attn" if importlib.util.find_spec("flash_attn") else "sdpa"
    torch.testing.assert_close(resolve(torch.zeros(1)), torch.full((1,), float(len(expected))))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"kernels\.backend='triton': tensors on cpu.*set TRITON_INTERPRET=1"):
        kernels.gelu_tanh(torch.randn(3), backend="triton")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match=r"kernels\.attention='triton': tensors on cpu.*TRITON_INTERPRET=1"):
        kernels.attention(q, q, q, backend="triton")


# --- the benchmark ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(ON_CUDA, reason="checks the no-CUDA path")
def test_bench_without_cuda_says_so_and_exits_0():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="checks the interpreter path; on CUDA `make gpu-check` runs the real benchmark")
def test_bench_cpu_sanity_runs_every_kernel():
    """The whole benchmark script at tiny shapes through the interpreter (~20 s): every kernel, both passes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--cpu-sanity", "--no-compile"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    summaries = [line.split()[0] for line in r.stdout.splitlines() if "triton speedup" in line]
    assert sorted(summaries) == sorted(2 * ["rms_norm", "layer_norm", "rope", "swiglu", "gelu_tanh", "cross_entropy",
                                            "attention"])  # fwd and fwd+bwd, one tiny shape each
    assert "failed" not in r.stdout


def test_flop_count_helper_is_consistent():
    """The benchmark's causal attention FLOPs: half of 4 * batch * heads * seq^2 * dim forward."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_kernels
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert bench_kernels.attention_flops(2, 3, 1024, 64, causal=True) == 4 * 2 * 3 * 1024**2 * 64 // 2
    assert bench_kernels.attention_flops(2, 3, 1024, 64, causal=False) == 4 * 2 * 3 * 1024**2 * 64
    assert math.isclose(bench_kernels.attention_flops(1, 1, 8, 16, causal=True, backward=True),
                        2.5 * bench_kernels.attention_flops(1, 1, 8, 16, causal=True))
