"""FlashAttention-2-style attention in Triton, forward and backward, matching kernels.attention.attention.

Layout (batch, seq, heads, head_dim) as the model produces it; k and v may have fewer heads (grouped-query: query
head h reads kv head h // group). Causal masking is top-left aligned, as SDPA's is_causal.

Forward: one program per (query block, batch x head) streams key/value blocks through an online softmax (running
row max m and sum l, accumulator rescaled when m grows), never forming the seq x seq matrix, and saves the per-row
log-sum-exp. Scores are kept in base 2 (scale folded with log2(e)) so the exponentials are exp2.
Backward (no atomics): delta = rowsum(dO * O); one kernel per key block accumulates dK, dV over every query block and
every query head of its group; another per query block accumulates dQ over the key blocks. Both recompute the
probabilities from the saved log-sum-exp.
Blocks wholly below the causal diagonal (and inside the sequence) run a loop without the mask.
"""

# Triton convention: upper-case kernel arguments are pointers and compile-time constants.

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_common import INTERPRETED

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b; interpreted kernels upcast operands first (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi, seq_k, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < seq_k
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        qk = _dot(q, k_t, tl.zeros((q.shape[0], BLOCK_N), tl.float32), UPCAST, PRECISION) * qk_scale
        if MASK:  # the diagonal / ragged-end blocks: keys past the sequence (and future keys) score -inf
            keep = kv_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_block(n_heads, group, seq_q, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's (batch x head index, batch, head, KV head, query rows, head-dim columns, valid rows)."""
    bh = tl.program_id(1)
    h = bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return bh, (bh // n_heads).to(tl.int64), h, h // group, offs_m, tl.arange(0, HEAD_DIM), offs_m < seq_q


@triton.jit
def _load_rows(BASE, b, h, offs_m, offs_d, ok, s_b, s_s, s_h):
    """The (rows, head_dim) tile of a (batch, seq, heads, head_dim) tensor at batch b, head h; invalid rows 0."""
    return tl.load(BASE + b * s_b + h * s_h + offs_m[:, None] * s_s + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _key_bounds(start_m, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_end, end): key blocks [0, full_end) need no mask (whole, inside seq_k and, causal, left of this query
    block); [full_end, end) are masked (the diagonal and the ragged last block). BLOCK_M is a multiple of BLOCK_N."""
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    end = seq_k
    if CAUSAL:
        full_end = tl.minimum(start_m, full_end)
        end = tl.minimum(start_m + BLOCK_M, seq_k)
    return full_end, end


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, seq_q, seq_k, n_heads, group, qk_scale,
              sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh, b, h, kvh, offs_m, offs_d, q_ok = _query_block(n_heads, group, seq_q, BLOCK_M, HEAD_DIM)
    q = _load_rows(Q, b, h, offs_m, offs_d, q_ok, sq_b, sq_s, sq_h)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    full_end, end = _key_bounds(tl.program_id(0) * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_d, 0, full_end, seq_k,
                               qk_scale, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_d, full_end, end, seq_k,
                               qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)

    out = acc / l_i[:, None]
    tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=q_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, m_i + tl.log2(l_i), mask=q_ok)  # base-2 log-sum-exp


@triton.jit
def _attn_bwd_delta(OUT, DO, DELTA, seq_q, n_heads, so_b, so_s, so_h, sdo_b, sdo_s, sdo_h,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d O_id dO_id = sum_j P_ij dP_ij: the softmax backward's row term, computed once.
    bh, b, h, _, offs_m, offs_d, ok = _query_block(n_heads, 1, seq_q, BLOCK_M, HEAD_DIM)
    o = _load_rows(OUT, b, h, offs_m, offs_d, ok, so_b, so_s, so_h)
    do = _load_rows(DO, b, h, offs_m, offs_d, ok, sdo_b, sdo_s, sdo_h)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, delta, mask=ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n, offs_d,
                    lo, hi, seq_q, qk_scale, BLOCK_M: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = offs_m < seq_q
        q_t = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None], mask=q_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        # Padding queries get lse = +inf, so their probabilities (and so their dK, dV terms) are exactly 0.
        lse = tl.load(lse_base + offs_m, mask=q_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
        # Transposed scores S^T (keys x queries) so dK and dV come out row-major without moving P.
        qk_t = _dot(k, q_t, tl.zeros((k.shape[0], BLOCK_M), tl.float32), UPCAST, PRECISION) * qk_scale
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, UPCAST, PRECISION)
        dp_t = _dot(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), tl.float32), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, seq_q, seq_k, n_heads, n_kv_heads, group, qk_scale, sm_scale,
                   sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
                   sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // n_kv_heads).to(tl.int64)
    kvh = bkv % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ok = offs_n < seq_k
    # Padding keys load as zeros; their dK, dV rows are computed but never stored.
    k = tl.load(K + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_s + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
    v = tl.load(V + b * sv_b + kvh * sv_h + offs_n[:, None] * sv_s + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)

    # Query blocks before lo see none of these keys (causal). [lo, diag_end) straddle the diagonal and are masked;
    # from diag_end on every query is at or after every key of this block.
    lo = 0
    diag_end = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(((start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, seq_q)
        diag_end = tl.maximum(diag_end, lo)
    # Every query head of the group reads this kv head: accumulate all of them here instead of atomics.
    for g in range(0, group):
        bh = b * n_heads + kvh * group + g
        q_base = Q + b * sq_b + (kvh * group + g) * sq_h
        do_base = DO + b * sdo_b + (kvh * group + g) * sdo_h
        lse_base = LSE + bh * seq_q
        delta_base = DELTA + bh * seq_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_s, sdo_s, offs_n, offs_d,
                                 lo, diag_end, seq_q, qk_scale, BLOCK_M, True, UPCAST, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_s, sdo_s, offs_n, offs_d,
                                 tl.maximum(diag_end, lo), seq_q, seq_q, qk_scale, BLOCK_M, False, UPCAST, PRECISION)
    dk = dk * sm_scale  # the scores' scale, applied once instead of per block
    tl.store(DK + b * sdk_b + kvh * sdk_h + offs_n[:, None] * sdk_s + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_ok[:, None])
    tl.store(DV + b * sdv_b + kvh * sdv_h + offs_n[:, None] * sdv_s + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo, hi, seq_k,
                  qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < seq_k
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        qk = _dot(q, k_t, tl.zeros((q.shape[0], BLOCK_N), tl.float32), UPCAST, PRECISION) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if MASK:  # padding keys would otherwise get probability exp2(-lse) > 0
            keep = kv_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, v_t, tl.zeros((q.shape[0], BLOCK_N), tl.float32), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k_t.dtype), tl.trans(k_t), dq, UPCAST, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, seq_q, seq_k, n_heads, group, qk_scale, sm_scale,
                 sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h, sdq_b, sdq_s, sdq_h,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh, b, h, kvh, offs_m, offs_d, q_ok = _query_block(n_heads, group, seq_q, BLOCK_M, HEAD_DIM)
    q = _load_rows(Q, b, h, offs_m, offs_d, q_ok, sq_b, sq_s, sq_h)
    do = _load_rows(DO, b, h, offs_m, offs_d, q_ok, sdo_b, sdo_s, sdo_h)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_q + offs_m, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_q + offs_m, mask=q_ok, other=0.0)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    full_end, end = _key_bounds(tl.program_id(0) * BLOCK_M, seq_k, BLOCK_M, BLOCK_N, CAUSAL)  # as the forward
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_d, 0, full_end, seq_k,
                       qk_scale, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_d, full_end, end, seq_k,
                       qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, by (16-bit?, head_dim <= 64?). Chosen so that the sm_90 build
# neither spills registers nor exceeds shared memory (checked with `tools/bench_kernels.py --compile-check`); not yet
# tuned for speed on a GPU. BLOCK_M is a multiple of BLOCK_N for "fwd" and "dq" (their mask-free split needs it).
_CONFIGS = {
    (True, True): {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 8, 2)},
    (True, False): {"fwd": (128, 64, 8, 3), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 8, 2)},
    # fp32 tiles are twice as large and their exact (ieee) products run without tensor cores: small blocks.
    (False, True): {"fwd": (32, 32, 4, 2), "dkdv": (32, 64, 8, 2), "dq": (32, 32, 4, 2)},
    (False, False): {"fwd": (16, 16, 4, 2), "dkdv": (16, 16, 4, 2), "dq": (16, 16, 4, 2)},
}
# Interpreted: the smallest tiles tl.dot takes, so short test sequences still span several blocks.
_INTERPRETED_CONFIG = {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}


def _config(head_dim: int, dtype: torch.dtype) -> dict[str, tuple[int, int, int, int]]:
    """Block sizes and launch options per pass for this head size and dtype."""
    if INTERPRETED:
        return _INTERPRETED_CONFIG
    return _CONFIGS[(dtype != torch.float32, head_dim <= 64)]


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        batch, seq_q, heads, dim = q.shape
        seq_k, kv_heads = k.shape[1], k.shape[2]
        sm_scale = 1.0 / math.sqrt(dim)
        block_m, block_n, warps, stages = _config(dim, q.dtype)["fwd"]
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(seq_q, block_m), batch * heads)
        _attn_fwd[grid](q, k, v, o, lse, seq_q, seq_k, heads, heads // kv_heads, sm_scale * LOG2E,
                        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
                        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, UPCAST=INTERPRETED,
                        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        do = _unit_last(do)
        batch, seq_q, heads, dim = q.shape
        seq_k, kv_heads = k.shape[1], k.shape[2]
        group = heads // kv_heads
        sm_scale = 1.0 / math.sqrt(dim)
        cfg = _config(dim, q.dtype)
        delta = torch.empty_like(lse)
        _attn_bwd_delta[(triton.cdiv(seq_q, 64), batch * heads)](o, do, delta, seq_q, heads, *_strides3(o),
                                                                  *_strides3(do), HEAD_DIM=dim, BLOCK_M=64)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = {"HEAD_DIM": dim, "CAUSAL": ctx.causal, "UPCAST": INTERPRETED, "PRECISION": _precision(q.dtype)}
        block_m, block_n, warps, stages = cfg["dkdv"]
        _attn_bwd_dkdv[(triton.cdiv(seq_k, block_n), batch * kv_heads)](
            q, k, v, do, lse, delta, dk, dv, seq_q, seq_k, heads, kv_heads, group, sm_scale * LOG2E, sm_scale,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
        block_m, block_n, warps, stages = cfg["dq"]
        _attn_bwd_dq[(triton.cdiv(seq_q, block_m), batch * heads)](
            q, k, v, do, lse, delta, dq, seq_q, seq_k, heads, group, sm_scale * LOG2E, sm_scale,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
        return dq, dk, dv, None


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would lose ~3 decimal digits); 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) [+ causal mask]) v; k, v may have fewer heads, a divisor of q's (Triton)."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not "
                         f"(batch, seq, heads, head_dim) with matching k/v")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if q.shape[3] not in (16, 32, 64, 128):
        raise ValueError(f"attention: Triton supports head dims 16, 32, 64 and 128, not {q.shape[3]}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    return _Attention.apply(q, k, v, causal)
