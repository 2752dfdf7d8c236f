"""Put a failed launch's fault dumps side by side: what each rank was doing when the job went down.

    python tools/inspect_faults.py runs/exp1                 # the newest launch's dumps
    python tools/inspect_faults.py runs/exp1 --launch torchrun-<id>-0

Each rank that failed or hung wrote `run_dir/faults/<launch>/rank-NNNNN.json` (engine/training/watchdog.py); a
rank without one was killed before it could write it, and is usually the one the others name as lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.training.watchdog import describe_call


def report(launch_dir: Path) -> list[str]:
    """One line per rank of the launch, then the ranks without a dump and the ranks named lost."""
    dumps = {}
    for path in sorted(launch_dir.glob("rank-*.json")):
        try:
            dumps[int(path.stem.split("-")[1])] = json.loads(path.read_text())
        except (ValueError, json.JSONDecodeError) as e:
            print(f"warning: {path}: unreadable ({e})", file=sys.stderr)
    if not dumps:
        return [f"{launch_dir}: no fault dumps"]
    world = max(d["world_size"] for d in dumps.values())
    lines = [f"{launch_dir.name}: {len(dumps)} of {world} ranks left a dump"]
    lost: set[int] = set()
    for rank in range(world):
        d = dumps.get(rank)
        if d is None:
            lines.append(f"  rank {rank:>5}: no dump (killed before it could write one?)")
            continue
        waits = "; ".join(describe_call(c, d["time"]) for c in d["open"]) or "in no collective"
        lines.append(f"  rank {rank:>5} (pp {d['pp']}, dp {d['dp']}, tp {d['tp']}) step {d['step']}: {waits}")
        lines.append(f"               {d['error'][:150]}")
        lost |= {x["rank"] for x in d.get("lost_ranks", [])}
    if lost:
        lines.append(f"lost (heartbeat stopped, no error reported): ranks {', '.join(map(str, sorted(lost)))}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/inspect_faults.py."""
    p = argparse.ArgumentParser(prog="inspect_faults.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run directory (train.run_dir)")
    p.add_argument("--launch", help="which launch under run_dir/faults/ (default: the newest)")
    args = p.parse_args(argv)
    root = Path(args.run_dir) / "faults"
    launches = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime) \
        if root.is_dir() else []
    if args.launch:
        launches = [d for d in launches if d.name == args.launch]
    if not launches:
        print(f"error: no fault dumps under {root}" + (f" for launch {args.launch}" if args.launch else ""),
              file=sys.stderr)
        return 1
    print("\n".join(report(launches[-1])))
    return 0
