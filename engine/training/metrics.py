"""Throughput, MFU and memory arithmetic, and the logging rank's outputs: console lines, metrics.jsonl, a progress bar,
and the names every field has in W&B and TensorBoard.

MFU = achieved model FLOP/s per device / the device's peak for the run's precision. The peak comes from
`train.peak_tflops` or the table below (dense tensor-core peaks from the vendors' datasheets); on a CPU or a device
not in the table MFU is logged as null, with one warning naming `train.peak_tflops`. Never a silent guess.

Names. A metrics.jsonl field belongs to one group of GROUPS (a W&B section, a TensorBoard tag prefix) and is logged
there as `<group>/<field>`, less the field's own `<group>_` prefix: `loss` -> `train/loss`, `val_loss` ->
`val/loss`, `memory_allocated_gib` -> `memory/allocated_gib`. docs/monitoring.md lists them all.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from engine.training.timers import PHASES

# Dense peak TFLOP/s per device by (name fragment of torch.cuda.get_device_name, precision); the H100 SXM reports
# itself as "H100 80GB HBM3". fp32 means true fp32 (no TF32), as torch defaults to.
PEAK_TFLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989.4, ("H200", "fp16"): 989.4, ("H200", "fp32"): 66.9,
    ("H100 80GB HBM3", "bf16"): 989.4, ("H100 80GB HBM3", "fp16"): 989.4, ("H100 80GB HBM3", "fp32"): 66.9,
    ("H100 PCIe", "bf16"): 756.5, ("H100 PCIe", "fp16"): 756.5, ("H100 PCIe", "fp32"): 51.2,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 19.5,
    ("L40S", "bf16"): 362.1, ("L40S", "fp16"): 362.1, ("L40S", "fp32"): 91.6,
}


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Per-device peak TFLOP/s for `precision`: the override, else the table, else None."""
    if override is not None:
        return override
    name = device_name(device)
    for (fragment, prec), value in PEAK_TFLOPS.items():
        if fragment in name and prec == precision:
            return value
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s_per_device / (peak * 1e12)


def memory_gib(device: torch.device) -> dict[str, float]:
    """This process's memory now and at its peak, in GiB: on CUDA the caching allocator's allocated, reserved and
    peak allocated bytes; on CPU the resident set size now and at its peak (there is no allocator pool to report)."""
    if device.type == "cuda":
        return {"memory_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "memory_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    # Linux reports KiB, and updates the high-water mark lazily: it can lag the resident size just read.
    peak = max(resident, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"memory_allocated_gib": resident, "peak_memory_gib": peak}


# Every metrics.jsonl field of a training or evaluation row, by group (see the module docstring); `step` is the axis.
GROUPS: dict[str, tuple[str, ...]] = {
    "train": ("loss", "lr", "grad_norm", "loss_scale", "consumed_samples", "tokens_seen"),
    "val": ("val_loss", "val_ppl"),
    "perf": ("step_time_s", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
             *(f"{phase}_s" for phase in PHASES), "other_s"),
    "memory": ("memory_allocated_gib", "memory_reserved_gib", "peak_memory_gib", "model_state_bytes"),
    "system": ("skipped_steps", "nonfinite_steps", "loss_spikes", "straggler_ratio", "compute_s_median",
               "compute_s_max", "slowest_rank", "straggler_rank"),
}
_KEYS = {field: f"{group}/{field.removeprefix(group + '_')}" for group, fields in GROUPS.items() for field in fields}


def metric_key(field: str) -> str:
    """The W&B and TensorBoard name of a metrics.jsonl field: `<group>/<name>`."""
    try:
        return _KEYS[field]
    except KeyError:
        raise KeyError(f"metrics field {field!r} is in no group of engine.training.metrics.GROUPS") from None


def scalars(record: dict) -> dict[str, float]:
    """A metrics record's values under their W&B / TensorBoard names, without `step`, None or non-finite values
    (metrics.jsonl writes those as null)."""
    return {metric_key(field): value for field, value in record.items()
            if field != "step" and value is not None and not (isinstance(value, float) and not math.isfinite(value))}


class MetricsLogger:
    """Console lines, metrics.jsonl and a progress bar, on the logging rank only (a no-op elsewhere)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, total_steps: int, start_step: int = 0,
                 progress_bar: bool | None = None, peak: float | None = None, device_label: str = "cpu",
                 console: bool = True):
        self.enabled, self.console = enabled, console
        self._file = None
        self._bar = None
        if not enabled:
            return
        self._file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        if peak is None:
            print(f"warning: no peak TFLOP/s known for '{device_label}': MFU is logged as null; set "
                  "train.peak_tflops=<per-device peak> to report it", file=sys.stderr)
        if progress_bar if progress_bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def log(self, record: dict) -> None:
        """Write one record to metrics.jsonl and, formatted, to the console."""
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (an fp16 overflow step's gradient norm) is written as null.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._file.write(json.dumps(finite, allow_nan=False) + "\n")
        if not self.console:
            return
        line = format_record(record)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1, loss: float | None = None) -> None:
        """Move the progress bar."""
        if self._bar is not None:
            self._bar.update(steps)
            if loss is not None:
                self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

    def close(self) -> None:
        """Flush and close."""
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()


def format_record(r: dict) -> str:
    """One human-readable console line for a metrics record."""
    parts = [f"step {r['step']:>6}"]
    if "loss" in r:
        parts += [f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}", f"grad {r['grad_norm']:.3f}",
                  f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tokens_per_s_per_device']:,.0f} tok/s/dev",
                  f"{r['tflops_per_device']:.2f} TFLOP/s/dev",
                  "mfu " + ("n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
                  f"mem {r['peak_memory_gib']:.2f} GiB"]
        for key, label in (("skipped_steps", "skipped"), ("nonfinite_steps", "non-finite"), ("loss_spikes", "spikes")):
            if r.get(key):
                parts.append(f"{label} {r[key]}")
    if "val_loss" in r:
        parts += [f"val_loss {r['val_loss']:.4f}", f"val_ppl {r['val_ppl']:.2f}"]
    return " | ".join(parts)


class Throughput:
    """Tokens per second over the steps since the last reading."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        """Count tokens processed."""
        self._tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of non-training work (evaluation) out of the current window."""
        self._t += seconds

    def read(self) -> float:
        """Tokens/s since the previous read, and restart the window."""
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        return rate


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    return math.exp(loss) if loss < 700 else math.inf
