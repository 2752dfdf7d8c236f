"""Benchmark the Triton kernels against eager PyTorch, torch.compile of the same reference, and (attention) SDPA and
flash-attn when installed, forward and forward+backward, at shapes of a 7-8B-parameter model on one GPU.

    python tools/bench_kernels.py                       # every kernel, bf16, on the current CUDA device
    python tools/bench_kernels.py --kernels attention --no-compile
    python tools/bench_kernels.py --compile-check       # no GPU needed: build every kernel for sm_90, report
                                                        # registers / spills / shared memory per launch config
    python tools/bench_kernels.py --cpu-sanity --no-compile   # no GPU: the whole script at tiny shapes, interpreted

Prints, per kernel, shape, pass and implementation: time (median ms, triton.testing.do_bench), GB/s (memory-bound
kernels: bytes that must move at least once) or TFLOP/s (attention), peak extra memory of one call, and the Triton
kernel's speedup over each other implementation. Without CUDA (and without --cpu-sanity) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("rms_norm", "layer_norm", "rope", "swiglu", "gelu_tanh", "cross_entropy", "attention")


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool = False) -> float:
    """Matmul FLOPs of attention: 2 matmuls of 2*seq^2*d per head forward (half if causal); backward is 2.5x."""
    flops = 4 * batch * heads * seq * seq * head_dim // (2 if causal else 1)
    return 2.5 * flops if backward else flops


@dataclass
class Case:
    """One benchmark: how to build inputs, the implementations to time, and the work done per pass."""

    kernel: str
    shape: str
    make_inputs: Callable[[], list[torch.Tensor]]
    impls: dict[str, Callable[..., torch.Tensor]]
    bytes_fwd: float = 0.0  # memory-bound kernels: minimum bytes moved
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0  # attention
    flops_bwd: float = 0.0


# Shapes per kernel: a 7-8B model on one H100 ("gpu"), and tiny ones for --cpu-sanity (Triton's interpreter).
SHAPES = {
    "gpu": {"tokens": 16384,  # micro-batch 8 x 2048 or 4 x 4096
            "hidden": (4096, 8192), "rope": (4, 4096, 32, 128), "swiglu": 14336,  # Llama-3-8B FFN
            "gelu": 16384,  # GPT-2 style 4 x 4096
            "vocab": (8192, 128256),  # Llama-3 vocabulary
            "attention": ((8, 2048), (1, 16384)), "heads": (32, 8, 128)},
    "tiny": {"tokens": 64, "hidden": (96,), "rope": (2, 16, 4, 32), "swiglu": 200, "gelu": 200,
             "vocab": (64, 1000), "attention": ((1, 40),), "heads": (4, 2, 32)},
}


def build_cases(names: list[str], dtype: torch.dtype, compile_ref: bool, device: str = "cuda",
                size: str = "gpu") -> list[Case]:
    """The benchmark cases for the requested kernels."""
    import kernels

    dev = device
    shapes = SHAPES[size]
    es = torch.finfo(dtype).bits // 8
    cases: list[Case] = []
    # Every lambda below binds its sizes as defaults: later cases reuse the names.

    def rand(*shape, grad=True, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dt).requires_grad_(grad)

    def impls(ref: Callable, triton_fn: Callable, extra: dict | None = None, ref_name: str = "eager") -> dict:
        out = {ref_name: ref}
        if compile_ref:
            out["compile"] = torch.compile(ref, dynamic=False)
        out |= extra or {}
        out["triton"] = triton_fn
        return out

    tokens = shapes["tokens"]
    if "rms_norm" in names:
        for hidden in shapes["hidden"]:
            n = tokens * hidden
            cases.append(Case(
                "rms_norm", f"{tokens}x{hidden}", lambda h=hidden: [rand(tokens, h), rand(h)],
                impls(lambda x, w: kernels.rms_norm(x, w, 1e-5, backend="torch"),
                      lambda x, w: kernels.rms_norm(x, w, 1e-5, backend="triton")),
                bytes_fwd=2 * n * es, bytes_bwd=3 * n * es))  # read x, write y; read x, dy, write dx
    if "layer_norm" in names:
        for hidden in shapes["hidden"]:
            n = tokens * hidden
            cases.append(Case(
                "layer_norm", f"{tokens}x{hidden}",
                lambda h=hidden: [rand(tokens, h), rand(h), rand(h)],
                impls(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, backend="torch"),
                      lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, backend="triton")),
                bytes_fwd=2 * n * es, bytes_bwd=3 * n * es))
    if "rope" in names:
        batch, seq, heads, dim = shapes["rope"]
        cos, sin = (t.to(dev) for t in kernels.rope_cache(seq, dim, 500000.0))
        n = batch * seq * heads * dim
        cases.append(Case(
            "rope", f"{batch}x{seq}x{heads}x{dim}", lambda b=batch, s=seq, h=heads, d=dim: [rand(b, s, h, d)],
            impls(lambda x: kernels.apply_rotary(x, cos, sin, backend="torch"),
                  lambda x: kernels.apply_rotary(x, cos, sin, backend="triton")),
            bytes_fwd=2 * n * es, bytes_bwd=2 * n * es))
    if "swiglu" in names:
        ffn = shapes["swiglu"]
        n = tokens * ffn
        cases.append(Case(
            "swiglu", f"{tokens}x{ffn}", lambda f=ffn: [rand(tokens, f, scale=3), rand(tokens, f)],
            impls(lambda g, u: kernels.swiglu(g, u, backend="torch"),
                  lambda g, u: kernels.swiglu(g, u, backend="triton")),
            bytes_fwd=3 * n * es, bytes_bwd=5 * n * es))
    if "gelu_tanh" in names:
        ffn = shapes["gelu"]
        n = tokens * ffn
        cases.append(Case(
            "gelu_tanh", f"{tokens}x{ffn}", lambda f=ffn: [rand(tokens, f, scale=3)],
            impls(lambda x: kernels.gelu_tanh(x, backend="torch"),
                  lambda x: kernels.gelu_tanh(x, backend="triton")),
            bytes_fwd=2 * n * es, bytes_bwd=3 * n * es))
    if "cross_entropy" in names:
        rows, vocab = shapes["vocab"]
        targets = torch.randint(0, vocab, (rows,), device=dev)
        n = rows * vocab
        cases.append(Case(
            "cross_entropy", f"{rows}x{vocab}", lambda r=rows, v=vocab: [rand(r, v, scale=4)],
            impls(lambda x: kernels.cross_entropy(x, targets, backend="torch"),
                  lambda x: kernels.cross_entropy(x, targets, backend="triton")),
            bytes_fwd=n * es, bytes_bwd=2 * n * es))
    if "attention" in names:
        from kernels.dispatch import flash_attn_available

        flash = None
        if dev == "cuda" and flash_attn_available():
            from flash_attn import flash_attn_func as flash
        for batch, seq in shapes["attention"]:
            heads, kv_heads, dim = shapes["heads"]
            extra = {} if flash is None else {"flash_attn": lambda q, k, v, f=flash: f(q, k, v, causal=True)}
            ref_impls = impls(lambda q, k, v: kernels.attention(q, k, v, backend="sdpa"),
                              lambda q, k, v: kernels.attention(q, k, v, backend="triton"), extra, ref_name="sdpa")
            cases.append(Case(
                "attention", f"{batch}x{seq}x{heads}/{kv_heads}x{dim} causal",
                lambda b=batch, s=seq, h=heads, kv=kv_heads, d=dim: [rand(b, s, h, d), rand(b, s, kv, d),
                                                                      rand(b, s, kv, d)],
                ref_impls,
                flops_fwd=attention_flops(batch, heads, seq, dim, causal=True),
                flops_bwd=attention_flops(batch, heads, seq, dim, causal=True, backward=True)))
    return cases


def measure(call: Callable[[], None], inputs: list[torch.Tensor], warmup: int, rep: int) -> tuple[float, float]:
    """(median ms, peak extra MiB of one call); CUDA: triton.testing.do_bench; CPU (sanity mode): a few timed runs."""
    call()  # compiles (torch.compile, Triton) outside the measurement
    if not torch.cuda.is_available():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), float("nan")
    from triton.testing import do_bench

    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return do_bench(call, warmup=warmup, rep=rep, grad_to_none=inputs), peak


def run_case(case: Case, warmup: int, rep: int) -> list[str]:
    """Time every implementation of one case, forward and forward+backward; formatted table rows."""
    inputs = case.make_inputs()
    rows, times = [], {}
    for impl, fn in case.impls.items():
        for label in ("fwd", "fwd+bwd"):
            def call(fn=fn, backward=label == "fwd+bwd"):
                if backward:
                    out = fn(*inputs)
                    out.backward(torch.ones_like(out))
                else:
                    with torch.no_grad():
                        fn(*inputs)

            work = ((case.bytes_fwd, case.flops_fwd) if label == "fwd" else
                    (case.bytes_fwd + case.bytes_bwd, case.flops_fwd + case.flops_bwd))
            try:
                ms, peak = measure(call, inputs, warmup, rep)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. eager cross-entropy out of memory
                rows.append(f"{case.kernel:<14}{case.shape:<32}{label:<9}{impl:<12}failed: {str(e)[:60]}")
                continue
            finally:
                for t in inputs:
                    t.grad = None
            times[impl, label] = ms
            rate = (f"{work[0] / ms / 1e6:8.0f} GB/s" if work[0] else f"{work[1] / ms / 1e9:8.1f} TFLOP/s")
            memory = "n/a" if math.isnan(peak) else f"{peak:.0f} MiB"
            rows.append(f"{case.kernel:<14}{case.shape:<32}{label:<9}{impl:<12}{ms:9.3f} ms {rate:>16} {memory:>13}")
    for label in ("fwd", "fwd+bwd"):
        if ("triton", label) in times:
            versus = [f"{times[impl, label] / times['triton', label]:.2f}x vs {impl}"
                      for impl in case.impls if impl != "triton" and (impl, label) in times]
            rows.append(f"{case.kernel:<14}{case.shape:<32}{label:<9}triton speedup: {', '.join(versus)}")
    return rows


def compile_check(arch: int) -> int:
    """Build every Triton kernel for CUDA sm_<arch> on this machine (no GPU), printing registers, spills, smem."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import triton_activations as act
    from kernels import triton_attention as attn
    from kernels import triton_cross_entropy as ce
    from kernels import triton_norms as norms
    from kernels import triton_rope as rope
    from kernels.triton_common import row_tile

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    failures = 0

    def build(name: str, fn, pointer_types: dict[str, str], constexprs: dict, warps: int, stages: int = 3) -> None:
        nonlocal failures
        scalar = {"eps": "fp32", "qk_scale": "fp32", "sm_scale": "fp32"}
        signature = {a: "constexpr" if a in constexprs else pointer_types.get(a, scalar.get(a, "i32"))
                     for a in fn.arg_names}
        try:
            src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(compiled.asm["ptx"])
                f.flush()
                report = subprocess.run([str(ptxas), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v",
                                         f.name, "-o", os.devnull], capture_output=True, text=True).stderr
            regs = re.findall(r"Used (\d+) registers", report)
            spills = re.findall(r"(\d+) bytes spill stores", report)
            print(f"{name:<44} warps {warps:>2}  regs {regs[0] if regs else '?':>3}  "
                  f"spill {spills[0] if spills else '?':>5} B  smem {compiled.metadata.shared:>6} B")
        except Exception as e:  # noqa: BLE001  (report every kernel's failure, then exit 1)
            failures += 1
            print(f"{name:<44} FAILED: {str(e).splitlines()[0][:100]}")

    for dt in ("bf16", "fp32"):
        p = "*" + dt
        for hidden in (4096, 8192):
            bm, bn, w = row_tile(hidden)
            sizes = {"BLOCK_M": bm, "BLOCK_N": bn}
            build(f"rms_norm fwd {dt} h={hidden}", norms._rms_norm_fwd,
                  {"X": p, "W": "*fp32", "Y": p, "RSTD": "*fp32"}, sizes, w)
            build(f"rms_norm bwd {dt} h={hidden}", norms._rms_norm_bwd,
                  {"DY": p, "X": p, "W": "*fp32", "RSTD": "*fp32", "DX": p, "DW_PARTIAL": "*fp32"}, sizes, w)
            build(f"layer_norm fwd {dt} h={hidden}", norms._layer_norm_fwd,
                  {"X": p, "W": "*fp32", "B": "*fp32", "Y": p, "MEAN": "*fp32", "RSTD": "*fp32"}, sizes, w)
            build(f"layer_norm bwd {dt} h={hidden}", norms._layer_norm_bwd,
                  {"DY": p, "X": p, "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "DX": p, "DW_PARTIAL": "*fp32",
                   "DB_PARTIAL": "*fp32"}, sizes, w)
        for backward in (False, True):
            build(f"rope {'bwd' if backward else 'fwd'} {dt} 32x128", rope._rotary_kernel,
                  {"X": p, "COS": "*fp32", "SIN": "*fp32", "Y": p},
                  {"HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64, "BACKWARD": backward}, 8)
        build(f"swiglu fwd {dt}", act._swiglu_fwd, {"G": p, "U": p, "Y": p}, {"BLOCK": act.BLOCK}, 4)
        build(f"swiglu bwd {dt}", act._swiglu_bwd, {"DY": p, "G": p, "U": p, "DG": p, "DU": p}, {"BLOCK": act.BLOCK}, 4)
        build(f"gelu_tanh fwd {dt}", act._gelu_tanh_fwd, {"X": p, "Y": p},
              {"BLOCK": act.BLOCK, "K": act.SQRT_2_OVER_PI}, 4)
        build(f"gelu_tanh bwd {dt}", act._gelu_tanh_bwd, {"DY": p, "X": p, "DX": p},
              {"BLOCK": act.BLOCK, "K": act.SQRT_2_OVER_PI}, 4)
        block_v, w = ce._block_v(128256)
        build(f"cross_entropy stats {dt} V=128256", ce._stats_kernel,
              {"LOGITS": p, "TARGETS": "*i64", "MAX": "*fp32", "SUMEXP": "*fp32", "PICKED": "*fp32"},
              {"BLOCK_V": block_v}, w)
        build(f"cross_entropy grad {dt} V=128256", ce._grad_kernel,
              {"LOGITS": p, "TARGETS": "*i64", "LSE": "*fp32", "SCALE": "*fp32", "GRAD": p}, {"BLOCK_V": block_v}, w)
        for dim in (16, 32, 64, 128):
            cfg = attn._config(dim, DTYPES[dt])
            ptrs = {n: p for n in ("Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ")} | {"LSE": "*fp32",
                                                                                   "DELTA": "*fp32"}
            common = {"HEAD_DIM": dim, "CAUSAL": True, "UPCAST": False, "PRECISION": attn._precision(DTYPES[dt])}
            for name, fn in (("fwd", attn._attn_fwd), ("dkdv", attn._attn_bwd_dkdv), ("dq", attn._attn_bwd_dq)):
                bm, bn, w, st = cfg[name]
                build(f"attention {name} {dt} d={dim} {bm}x{bn}", fn, ptrs,
                      common | {"BLOCK_M": bm, "BLOCK_N": bn}, w, st)
            build(f"attention delta {dt} d={dim}", attn._attn_bwd_delta, ptrs, {"HEAD_DIM": dim, "BLOCK_M": 64}, 4)
    print(f"{failures} kernel(s) failed to build" if failures else "every kernel built")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement, ms")
    parser.add_argument("--rep", type=int, default=100, help="measurement time per measurement, ms")
    parser.add_argument("--compile-check", action="store_true",
                        help="no GPU needed: build every kernel for --arch and report registers, spills, smem")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-check")
    parser.add_argument("--cpu-sanity", action="store_true",
                        help="no GPU: run the whole benchmark at tiny shapes on CPU through Triton's interpreter "
                             "(checks the script, measures nothing meaningful)")
    args = parser.parse_args()
    if args.compile_check:
        return compile_check(args.arch)
    names = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(names) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernels {unknown}; choose from {', '.join(KERNELS)}")
    dtype = DTYPES[args.dtype]
    if args.cpu_sanity:
        if dtype == torch.bfloat16:
            dtype = torch.float32  # the interpreter's bf16 is unreliable (see docs/kernels.md)
        # Before the kernel modules (imported by build_cases) or triton are imported.
        os.environ["TRITON_INTERPRET"] = "1"
        device, size = "cpu", "tiny"
        print(f"CPU sanity run (Triton interpreter, tiny shapes, {dtype}): timings are meaningless")
    elif not torch.cuda.is_available():
        print("no CUDA device: the kernel benchmark measures GPUs only, nothing measured. (`--cpu-sanity` runs it "
              "at tiny shapes through Triton's interpreter; `--compile-check` builds the kernels for sm_90.)")
        return 0
    else:
        device, size = "cuda", "gpu"
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    print(f"{'kernel':<14}{'shape':<32}{'pass':<9}{'impl':<12}{'time':>12} {'rate':>16} {'peak extra':>13}")
    for case in build_cases(names, dtype, compile_ref=not args.no_compile, device=device, size=size):
        for row in run_case(case, args.warmup, args.rep):
            print(row, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
