"""slurm/submit_preprocess.sh on a real two-node Slurm cluster started on this machine (see tests/slurm_cluster.py).

The array of per-file tasks plus the merge job must give the very bytes a single tools/preprocess_data.py run gives,
and a failed task must leave the merge job unrun and no merged shard behind. Skipped unless root with Slurm installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.data.builtin_corpus import build_corpus
from tests.slurm_cluster import slurm_cluster

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """One local cluster for the module; jobs run this interpreter (WEFT_PYTHON) so they see its packages."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield {**env, "WEFT_PYTHON": sys.executable}


def split_corpus(out_dir: Path, parts: int = 3, max_bytes: int = 600_000) -> list[Path]:
    """A slice of the built-in corpus cut into `parts` jsonl files, named so that sorted order is corpus order."""
    whole = out_dir / "whole.jsonl.tmp"
    build_corpus(whole, max_bytes=max_bytes)
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    whole.unlink()
    step = -(-len(lines) // parts)
    files = []
    for i in range(parts):
        f = out_dir / f"corpus_{i}.jsonl"
        f.write_text("".join(lines[i * step:(i + 1) * step]), encoding="utf-8")
        files.append(f)
    return files


def submit(env: dict[str, str], inputs: str, prefix: Path, extra_env: dict[str, str] | None = None) -> tuple[str, str]:
    """Run submit_preprocess.sh (1 CPU per task: the nodes have 1 each); return (array job id, merge job id)."""
    out = subprocess.run(
        [str(REPO / "slurm" / "submit_preprocess.sh"), "--input", inputs, "--output-prefix", str(prefix),
         "--tokenizer", "byte", "--", "--cpus-per-task=1"],
        env={**env, **(extra_env or {})}, cwd=prefix.parent.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    m = re.search(r"as job (\d+) and the merge as job (\d+)", out.stdout)
    assert m, out.stdout
    return m.group(1), m.group(2)


def job_states(env: dict[str, str], job: str) -> list[tuple[str, str]]:
    """(JobState, Reason) of a job, one pair per array task."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [(re.search(r"JobState=(\S+)", line).group(1), re.search(r"Reason=(\S+)", line).group(1))
            for line in out.splitlines() if line.strip()]


def wait_for_merge(env: dict[str, str], array_job: str, merge_job: str, timeout: float = 300.0) -> tuple[str, str]:
    """Wait until every array task ended and the merge job ended or can never start; return its (state, reason)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = job_states(env, array_job)
        (merge,) = job_states(env, merge_job)
        tasks_done = tasks and all(state in TERMINAL for state, _ in tasks)
        if tasks_done and (merge[0] in TERMINAL or merge[1] == "DependencyNeverSatisfied"):
            return merge
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not done after {timeout:.0f} s: array {tasks}, merge {merge}")
        time.sleep(1)


def logs(prefix: Path) -> str:
    """Every job log under the prefix's slurm-logs directory, for failure messages."""
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')}"
                     for f in sorted((prefix.parent / "slurm-logs").glob("*.out")))


def test_array_and_merge_match_a_single_run(slurm_env, tmp_path):
    files = split_corpus(tmp_path)
    prefix = tmp_path / "shards" / "corpus"
    array_job, merge_job = submit(slurm_env, str(tmp_path / "corpus_*.jsonl"), prefix)
    state, reason = wait_for_merge(slurm_env, array_job, merge_job)
    assert (state, reason) == ("COMPLETED", "None"), logs(prefix)
    assert [s for s, _ in job_states(slurm_env, array_job)] == ["COMPLETED"] * len(files)
    assert not list(prefix.parent.glob("corpus_part_*")), "the merge job left its parts behind"

    direct = tmp_path / "direct" / "corpus"
    subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", *map(str, files),
                    "--output-prefix", str(direct), "--tokenizer", "byte", "--no-progress"],
                   check=True, capture_output=True, timeout=300)
    for ext in (".bin", ".idx"):
        assert Path(f"{prefix}{ext}").read_bytes() == Path(f"{direct}{ext}").read_bytes(), ext


def test_failed_task_blocks_the_merge(slurm_env, tmp_path):
    files = split_corpus(tmp_path, max_bytes=200_000)
    with open(files[1], "a", encoding="utf-8") as f:
        f.write("{not json\n" + json.dumps({"text": "after the bad line"}) + "\n")
    prefix = tmp_path / "shards" / "corpus"
    array_job, merge_job = submit(slurm_env, str(tmp_path / "corpus_*.jsonl"), prefix,
                                  {"WEFT_PREPROCESS_ARGS": "--strict"})
    try:
        state, reason = wait_for_merge(slurm_env, array_job, merge_job)
        tasks = job_states(slurm_env, array_job)
        assert [s for s, _ in tasks].count("FAILED") == 1, (tasks, logs(prefix))
        assert state == "CANCELLED" or (state, reason) == ("PENDING", "DependencyNeverSatisfied"), (state, reason)
        assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()
        assert not (prefix.parent / "slurm-logs" / f"merge-{merge_job}.out").exists(), "the merge job ran"
        assert "malformed_json" in logs(prefix) and "stopping (--strict)" in logs(prefix), logs(prefix)
    finally:
        subprocess.run(["scancel", merge_job], env=slurm_env, capture_output=True, timeout=30)
