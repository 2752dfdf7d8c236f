"""What the Triton kernels share: whether they run interpreted, and launch sizing.

Imported only when a call resolves to a Triton kernel (or by tests/benchmarks), never by plain-PyTorch runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction

# How this process's @triton.jit decorators ran: the interpreter (CPU, TRITON_INTERPRET=1 before import) or compiled.
INTERPRETED: bool = bool(knobs.runtime.interpret)

# The widest row a norm keeps in registers; wider rows would spill (hidden sizes in practice are <= 16k).
MAX_FUSED_COLS = 65536

# Types tl.dot multiplies in hardware. The interpreter multiplies bf16 operands' raw bits (a bug in 3.7/3.9), so
# interpreted kernels upcast their dot operands to fp32 first (see UPCAST_DOT in the attention kernels).
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels in this process, or None if it can."""
    if not INTERPRETED:
        return "the Triton kernels were imported before TRITON_INTERPRET=1 was set"
    # triton.language's own @jit helpers (tl.sum, tl.max, tl.zeros) are decorated when triton is first imported,
    # which torch._dynamo does early; compiled-mode helpers cannot be called by an interpreted kernel.
    if not isinstance(tl.standard.sum, InterpretedFunction):
        return "triton was imported (torch._dynamo imports it) before TRITON_INTERPRET=1 was set"
    return None


def row_tile(n_cols: int) -> tuple[int, int, int]:
    """(rows per program, padded columns, warps) for a row-wise kernel over n_cols columns."""
    if n_cols > MAX_FUSED_COLS:
        raise ValueError(f"the Triton row kernels keep a row in registers: at most {MAX_FUSED_COLS} columns, "
                         f"got {n_cols}; use kernels.backend=torch")
    block_n = triton.next_power_of_2(n_cols)
    # Several short rows per program so each program moves a few thousand elements (and the interpreter, which costs
    # milliseconds per program, runs few of them).
    block_m = max(1, min(64, 4096 // block_n))
    tile = block_m * block_n
    # ~16 elements per thread: the backward keeps x, dy and their products live (sm_90 build: 220+ registers per
    # thread at 8192 columns on 8 warps, 128 on 16). Rows wider than 8192 spill registers in the backward (32 warps
    # would cap them at 64 registers): correct, slower; a chunked two-pass kernel would suit them better.
    warps = min(16, max(4, tile // 512))
    return block_m, block_n, warps


def reduction_programs(device: torch.device, row_blocks: int) -> int:
    """Programs for a kernel that also reduces over rows (weight gradients): enough to fill the GPU, no more."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(row_blocks, 2 * sms))
    return max(1, min(row_blocks, 4))  # interpreted: every program costs milliseconds


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (rows, last dim) matrix; copies only when x is not already laid out that way."""
    return x.reshape(-1, x.shape[-1]).contiguous()
