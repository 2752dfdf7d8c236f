"""Compare two runs' loss curves step by step: did a change of layout (TP, DP, SP) or kernels change training?

    python tools/compare_runs.py runs/demo/train runs/demo_tp2/train --rtol 1e-4

Prints the training and validation losses of the steps both runs logged, side by side with their relative
difference, and exits 1 when the largest exceeds --rtol (0 when within, 2 when the runs share no step).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def read_losses(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """{"loss": {step: value}, "val_loss": {step: value}} from a run's metrics.jsonl (later lines win)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl; pass a run directory (train.run_dir)")
    out: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, series in out.items():
            if record.get(key) is not None:
                series[record["step"]] = record[key]
    return out


def relative_difference(a: float, b: float) -> float:
    """|a - b| / |b| (0 when both are 0)."""
    return abs(a - b) / abs(b) if b else float(a != b)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", help="a run directory (with metrics.jsonl)")
    p.add_argument("run_b", help="the run to compare it with (the reference of the relative differences)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative difference accepted (default 1e-4)")
    args = p.parse_args(argv)
    try:
        a, b = read_losses(args.run_a), read_losses(args.run_b)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worst = 0.0
    print(f"{'metric':>8} {'step':>6} {'run_a':>12} {'run_b':>12} {'rel diff':>9}")
    for key in ("loss", "val_loss"):
        for step in sorted(a[key].keys() & b[key].keys()):
            diff = relative_difference(a[key][step], b[key][step])
            worst = max(worst, diff)
            print(f"{key:>8} {step:>6} {a[key][step]:>12.6f} {b[key][step]:>12.6f} {diff:>9.2e}")
    if not (a["loss"].keys() & b["loss"].keys()):
        print("error: the runs have no logged training step in common", file=sys.stderr)
        return 2
    verdict = "within" if worst <= args.rtol else "EXCEEDS"
    print(f"largest relative difference {worst:.2e}: {verdict} --rtol {args.rtol:g}")
    return 0 if worst <= args.rtol else 1
