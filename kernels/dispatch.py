"""Which implementation the kernels use: a process-wide default from `kernels.*` config, overridable per call.

kernels.backend (norms, rotary, activations, cross-entropy): `torch` = the PyTorch references; `triton` = the Triton
kernels; `auto` = the references, for now.
kernels.attention: `sdpa`, `triton`, `flash_attn` (flash-attn's flash_attn_func); `auto` = on CUDA with fp16/bf16
inputs flash-attn when it imports, SDPA otherwise.

`auto` leaves our Triton kernels out: they pass their tests compiled on an H200, but beat the references there only
for some kernels (docs/results.md); ask for them with `triton`.

On CPU the Triton kernels run only through Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are
imported): a correctness tool ~1000x slower than the references, so `auto` never picks it.
"""

from __future__ import annotations

import os

import torch

from engine.config import ATTENTION_BACKENDS, KERNEL_BACKENDS

_defaults = {"backend": "auto", "attention": "auto"}
# auto's flash-attn lookup, done once on the first CUDA call.
_flash_attn_cache: dict[str, bool] = {}


def configure(backend: str = "auto", attention: str = "auto") -> None:
    """Set the process-wide defaults (config keys `kernels.backend`, `kernels.attention`); raises if unavailable."""
    # Resolve before storing so a bad request fails at startup and leaves the previous defaults in place. No tensor
    # yet: an explicit choice must be usable on some device of this process.
    resolve_backend(backend)
    resolve_attention(attention)
    _defaults.update(backend=backend, attention=attention)


def resolve_backend(backend: str | None = None, device: torch.device | None = None) -> str:
    """`torch` or `triton` for the non-attention kernels on `device` (None: any device of this process)."""
    backend = _defaults["backend"] if backend is None else backend
    _check_choice("kernels.backend", backend, KERNEL_BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "torch"  # see the module docstring
    _require_triton("kernels.backend='triton'", device, "use kernels.backend=auto or kernels.backend=torch")
    return "triton"


def resolve_attention(attention: str | None = None, device: torch.device | None = None,
                      dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """`sdpa`, `triton` or `flash_attn` for attention on tensors of this device, dtype and head size."""
    attention = _defaults["attention"] if attention is None else attention
    _check_choice("kernels.attention", attention, ATTENTION_BACKENDS)
    fix = "use kernels.attention=auto or kernels.attention=sdpa"
    if attention == "sdpa":
        return "sdpa"
    if attention == "auto":
        if not _is_cuda(device):
            return "sdpa"
        if dtype in (torch.float16, torch.bfloat16) and (head_dim or 0) <= 256 and flash_attn_available():
            return "flash_attn"
        return "sdpa"  # see the module docstring: Triton joins `auto` once validated on a GPU
    if attention == "flash_attn":
        try:
            import flash_attn  # noqa: F401  (imported only when asked for: it is heavy and often absent)
        except ImportError:
            raise RuntimeError(f"kernels.attention='flash_attn': the flash_attn package is not installed; {fix}") \
                from None
        if not (_is_cuda(device) if device is not None else torch.cuda.is_available()):
            raise RuntimeError(f"kernels.attention='flash_attn' runs on CUDA only; {fix}")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"kernels.attention='flash_attn' needs fp16 or bf16 inputs, got {dtype} "
                               f"(train.precision=bf16 provides them); {fix}")
        return "flash_attn"
    _require_triton("kernels.attention='triton'", device, fix)
    if head_dim is not None and not triton_head_dim_ok(head_dim):
        raise ValueError(f"kernels.attention='triton' supports head dims 16, 32, 64 and 128, not {head_dim}; {fix}")
    return "triton"


def triton_head_dim_ok(head_dim: int) -> bool:
    """Whether the Triton attention kernel handles this head size (a power of two, 16..128)."""
    return head_dim in (16, 32, 64, 128)


# Under torch.compile this runs once while tracing instead of being traced: a failing import would break the graph.
@torch.compiler.assume_constant_result
def flash_attn_available() -> bool:
    """Whether flash_attn.flash_attn_func imports; tried once, on the first CUDA call under `auto`."""
    if "available" not in _flash_attn_cache:
        try:
            from flash_attn import flash_attn_func  # noqa: F401
        except ImportError:  # also a build that does not match this torch/CUDA: it raises ImportError too
            _flash_attn_cache["available"] = False
        else:
            _flash_attn_cache["available"] = True
    return _flash_attn_cache["available"]


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_error() -> str | None:
    """Why triton cannot be used, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton does not import ({e})"
    return None


def _require_triton(what: str, device: torch.device | None, fix: str) -> None:
    """Raise unless the Triton kernels can run on `device` (None: on some device of this process)."""
    error = _triton_error()
    if error is not None:
        raise RuntimeError(f"{what}: {error}; install triton (pip install triton) or {fix}")
    on_cuda = _is_cuda(device) or (device is None and torch.cuda.is_available())
    if on_cuda:
        return
    if not _interpreting():
        where = "no CUDA device" if device is None else f"tensors on {device.type}"
        raise RuntimeError(f"{what}: {where}, and the Triton kernels run on CUDA; set TRITON_INTERPRET=1 in the "
                           f"environment before starting to run them (slowly) through Triton's CPU interpreter, "
                           f"or {fix}")
    from kernels.triton_common import interpreter_problem

    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(f"{what}: {problem}; set TRITON_INTERPRET=1 in the environment before starting")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}")
