"""Look at a checkpoint without loading it: what it holds, in which layout, and whether it is intact.

    python tools/inspect_checkpoint.py runs/exp1                      # the step `latest` names
    python tools/inspect_checkpoint.py runs/exp1 --all                # every step directory and its state
    python tools/inspect_checkpoint.py runs/exp1/checkpoints/step_00000100 --verify   # re-hash every file

Exit status: 0 intact, 1 damaged or incomplete (the message names the file), 2 not a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.data.progress import format_bytes
from engine.training.checkpoint import STEP_DIR, checkpoints_dir, latest_checkpoint, read_meta, resolve_checkpoint
from engine.training.integrity import ALGORITHM, checksum_problems, read_manifest
from engine.training.reshard import CheckpointError


def describe(step_dir: Path) -> list[str]:
    """The report on one step directory (its sizes checked); raises CheckpointError if it is damaged."""
    meta = read_meta(step_dir)
    records = read_manifest(step_dir)
    model = meta.get("config", {}).get("model", {})
    lines = [f"{step_dir}: step {meta['step']}, format {meta['format']}, written by tp {meta['tp']} x pp {meta['pp']} "
             f"x dp {meta['dp']} ({meta['world_size']} ranks), ZeRO stage {meta.get('zero_stage', 0)}"]
    if model:
        lines.append(f"  model {model.get('name')} ({model.get('arch')}): {model.get('num_layers')} layers, hidden "
                     f"{model.get('hidden_size')}, vocab {model.get('vocab_size')}")
    lines.append(f"  consumed samples {meta.get('consumed_samples')}, skipped steps {meta.get('skipped_steps')}, "
                 f"non-finite steps {meta.get('nonfinite_steps', 0)}, loss spikes {meta.get('loss_spikes', 0)}; "
                 f"tokenizer {meta.get('tokenizer')}")
    sizes = {n: r["bytes"] for n, r in records.items()} if records is not None else meta["files"]
    how = f"sizes checked, {ALGORITHM} in manifest.json" if records is not None else \
        "sizes checked; no manifest (written before manifests), so no checksums"
    lines.append(f"  {len(sizes)} files, {format_bytes(sum(sizes.values()))} ({how}):")
    width = max(map(len, sizes))
    for name, size in sorted(sizes.items()):
        digest = f"  {ALGORITHM} {records[name][ALGORITHM]}" if records is not None else ""
        lines.append(f"    {name:<{width}}  {format_bytes(size):>10}{digest}")
    return lines


def verify(step_dir: Path) -> list[str]:
    """Re-hash every file against the manifest: the problems, one line each (empty: intact)."""
    records = read_manifest(step_dir)
    if records is None:
        raise CheckpointError(f"{step_dir}: no manifest.json (written before manifests): only sizes can be checked")
    return checksum_problems(step_dir, records, sorted(records))


def survey(run_dir: Path) -> tuple[list[str], bool]:
    """One line per step directory (and interrupted save) of a run, and whether every step directory is intact."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints directory")
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError as e:
        latest, problem = None, str(e)
    else:
        problem = None
    lines, ok = [], problem is None
    if problem:
        lines.append(f"latest: {problem}")
    for d in sorted(root.iterdir()):
        if d.name.startswith(".tmp-"):
            lines.append(f"  {d.name}  incomplete: an interrupted save, never loaded (the next save of that step "
                         "removes it)")
        elif STEP_DIR.match(d.name):
            tag = "  <- latest" if latest is not None and d.name == latest.name else ""
            try:
                read_meta(d)
                lines.append(f"  {d.name}  intact (sizes){tag}")
            except CheckpointError as e:
                ok = False
                lines.append(f"  {d.name}  DAMAGED: {e}{tag}")
    return lines, ok


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/inspect_checkpoint.py."""
    p = argparse.ArgumentParser(prog="inspect_checkpoint.py", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 intact, 1 damaged or incomplete, 2 not a checkpoint. "
                                       "docs/checkpoints.md describes the layout and the manifest.")
    p.add_argument("path", help="a step directory, or a run directory (its checkpoints/latest)")
    p.add_argument("--verify", action="store_true",
                   help=f"re-hash every file and compare with the manifest's {ALGORITHM} (reads every byte)")
    p.add_argument("--all", action="store_true", help="list every step directory of the run and whether it is intact")
    args = p.parse_args(argv)
    path = Path(args.path)
    try:
        if args.all:
            lines, ok = survey(path if not STEP_DIR.match(path.name) else path.parent.parent)
            print("\n".join(lines))
            return 0 if ok else 1
        step_dir = resolve_checkpoint(path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print("\n".join(describe(step_dir)))
        if args.verify:
            t0 = time.perf_counter()
            problems = verify(step_dir)
            if problems:
                print("\n".join(f"error: {line}" for line in problems), file=sys.stderr)
                return 1
            records = read_manifest(step_dir)
            print(f"verified {len(records)} files, {format_bytes(sum(r['bytes'] for r in records.values()))}: every "
                  f"{ALGORITHM} matches the manifest ({time.perf_counter() - t0:.1f} s)")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
