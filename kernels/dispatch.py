"""Which implementation the kernels use: a process-wide default from `kernels.*` config, overridable per call.

`auto` means the PyTorch references (and SDPA for attention) in this build; the Triton and flash-attn paths arrive
later and slot in here without the model changing.
"""

from __future__ import annotations

from engine.config import ATTENTION_BACKENDS, KERNEL_BACKENDS

_defaults = {"backend": "auto", "attention": "auto"}


def configure(backend: str = "auto", attention: str = "auto") -> None:
    """Set the process-wide defaults (config keys `kernels.backend`, `kernels.attention`); raises if unavailable."""
    # Resolve before storing so a bad request fails at startup and leaves the previous defaults in place.
    resolve_backend(backend)
    resolve_attention(attention)
    _defaults.update(backend=backend, attention=attention)


def resolve_backend(backend: str | None = None) -> str:
    """The implementation for the non-attention kernels: `backend`, or the configured default when None."""
    backend = _defaults["backend"] if backend is None else backend
    _check_choice("kernels.backend", backend, KERNEL_BACKENDS)
    if backend == "triton":
        raise RuntimeError("kernels.backend='triton': the Triton kernels are not available in this build; "
                           "use kernels.backend=auto or kernels.backend=torch")
    return "torch"


def resolve_attention(attention: str | None = None) -> str:
    """The implementation for attention: `attention`, or the configured default when None."""
    attention = _defaults["attention"] if attention is None else attention
    _check_choice("kernels.attention", attention, ATTENTION_BACKENDS)
    fix = "use kernels.attention=auto or kernels.attention=sdpa"
    if attention == "flash_attn":
        try:
            import flash_attn  # noqa: F401  (imported only when asked for: it is heavy and often absent)
        except ImportError:
            raise RuntimeError(f"kernels.attention='flash_attn': the flash_attn package is not installed; {fix}") \
                from None
        raise RuntimeError(f"kernels.attention='flash_attn': flash-attn attention is not available in this build; "
                           f"{fix}")
    if attention == "triton":
        raise RuntimeError(f"kernels.attention='triton': Triton attention is not available in this build; {fix}")
    return "sdpa"


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}")
