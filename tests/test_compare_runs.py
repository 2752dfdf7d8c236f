"""tools/compare_runs.py: side-by-side loss curves, and an exit code that says whether they agree."""

from __future__ import annotations

import json
from pathlib import Path

from engine.training.compare_runs import main


def write_run(run_dir: Path, losses: dict[int, float], val: dict[int, float]) -> str:
    run_dir.mkdir(parents=True)
    lines = [{"step": s, "loss": v, "lr": 1e-3} for s, v in losses.items()]
    lines += [{"step": s, "val_loss": v} for s, v in val.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(run_dir)


def test_agreeing_and_disagreeing_runs(tmp_path, capsys):
    ref = write_run(tmp_path / "ref", {1: 2.0, 2: 1.5, 3: 1.2}, {3: 1.3})
    close = write_run(tmp_path / "close", {1: 2.0, 2: 1.50001, 4: 9.0}, {3: 1.3})
    far = write_run(tmp_path / "far", {1: 2.0, 2: 1.6}, {3: 1.3})
    assert main([close, ref, "--rtol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "6.67e-06" in out and "within" in out and "     4 " not in out  # only steps both runs logged
    assert main([far, ref, "--rtol", "1e-4"]) == 1
    assert "EXCEEDS" in capsys.readouterr().out


def test_missing_or_disjoint_runs_are_errors(tmp_path, capsys):
    ref = write_run(tmp_path / "ref", {1: 2.0}, {})
    other = write_run(tmp_path / "other", {2: 2.0}, {})
    assert main([other, ref]) == 2
    assert "no logged training step in common" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), ref]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
