"""W&B logging, offline: what lands in the run's `.wandb` file, resuming, secrets, and no process left behind.

The offline run directory holds a binary `run-<id>.wandb`: a LevelDB-style log (a 7-byte `:W&B` header, then
32 KiB blocks of records, each with a 7-byte header: CRC-32 of type byte + payload, uint16 length, uint8 type
FULL/FIRST/MIDDLE/LAST) whose payloads are `wandb_internal_pb2.Record` messages. wandb 0.31 ships no reader for it
in Python, so `read_records` below is ours.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import LoggingConfig
from engine.training.metrics import metric_key
from engine.training.wandb_logger import REDACTED, WandbRun, wandb_row

SECRET = "weftdummysecret0123456789abcdef0123456789"  # 40 characters, like a real W&B API key

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------- the offline file reader
def read_records(path: Path) -> list:
    """Every Record in an offline `.wandb` file, CRC-checked."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log (header {data[:HEADER]!r})"
    out, pending, pos = [], None, HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        assert len(payload) == length, f"{path}: truncated record at byte {pos}"
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pending + payload)
            pending = None
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {pos}")
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _items(items) -> dict:
    """{key: value} from repeated {key | nested_key, value_json} items."""
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_offline_run(path: Path) -> dict:
    """What one offline `.wandb` file says: run id, name, project, config, metric definitions, history rows."""
    run, metrics, rows = None, [], []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "metric":
            metrics.append(record.metric)
        elif kind == "history":
            rows.append(_items(record.history.item))
    assert run is not None, f"{path}: no run record"
    return {"id": run.run_id, "name": run.display_name, "project": run.project,
            "config": _items(run.config.update), "metrics": metrics, "rows": rows}


def offline_files(run_dir: Path) -> list[Path]:
    """The `.wandb` files under run_dir/wandb/, oldest run first (one per start of the run)."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime_ns)


def by_step(rows: list[dict]) -> dict[int, dict]:
    return {row["trainer/step"]: row for row in rows}


# ----------------------------------------------------------------------------------------------- checks and setup
def wandb_core_descendants() -> list[str]:
    """Command lines of this process's descendants that are wandb-core (from /proc)."""
    parent, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    ours, me = [], os.getpid()
    for pid, line in cmd.items():
        p = pid
        while p in parent and p not in (0, 1, me):
            p = parent[p]
        if p == me and pid != me and "wandb-core" in line:
            ours.append(line)
    return ours


def assert_no_wandb_core(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := wandb_core_descendants()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"wandb-core still running after finish(): {left}"


def assert_secret_nowhere(root: Path) -> None:
    """The dummy API key is in no file under `root` (binary files too; symlinks are followed by the targets)."""
    checked = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), f"the API key was written to {path}"
            checked += 1
    assert checked, f"no files under {root}"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Iterator[Path]:
    """Offline W&B with every directory it writes inside tmp_path and a dummy API key in the environment."""
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    import wandb

    if wandb.run is not None:  # a test that failed before finish(): leave no run or wandb-core to the next one
        wandb.run.finish(exit_code=1)
    wandb.teardown()


def logging_cfg() -> LoggingConfig:
    return LoggingConfig(wandb=True, wandb_project="weft-test", wandb_mode="offline")


def train_record(step: int) -> dict:
    return {"step": step, "loss": 5.0 / step, "lr": 1e-4 * step, "grad_norm": 0.5 + step, "tokens_per_s": 1000.0 * step,
            "mfu": None, "consumed_samples": 8 * step, "tokens_seen": 1024 * step}


def eval_record(step: int) -> dict:
    return {"step": step, "val_loss": 4.0 / step, "val_ppl": math.exp(4.0 / step), "consumed_samples": 8 * step,
            "tokens_seen": 1024 * step}


# -------------------------------------------------------------------------------------------------------- tests
def test_record_mapping():
    fields = ("loss", "tokens_seen", "val_loss", "val_ppl", "step_time_s", "data_s", "memory_allocated_gib",
              "peak_memory_gib", "skipped_steps", "straggler_ratio")
    assert [metric_key(k) for k in fields] == [
        "train/loss", "train/tokens_seen", "val/loss", "val/ppl", "perf/step_time_s", "perf/data_s",
        "memory/allocated_gib", "memory/peak_memory_gib", "system/skipped_steps", "system/straggler_ratio"]
    row = wandb_row({"step": 7, "loss": 2.5, "mfu": None, "grad_norm": math.inf, "skipped_steps": 0})
    assert row == {"trainer/step": 7, "train/loss": 2.5, "system/skipped_steps": 0}
    with pytest.raises(KeyError, match="no group"):  # a new field must be given a section, not guessed one
        wandb_row({"step": 1, "new_field": 1.0})


def test_missing_wandb_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(RuntimeError, match=r"logging\.wandb"):
        WandbRun.start(logging_cfg(), tmp_path / "run", {}, None)


def test_offline_run_holds_config_metric_definitions_and_rows(wandb_env):
    run_dir = wandb_env / "demo_run"
    config = {"model": {"name": "gpt2_tiny", "num_layers": 2}, "train": {"steps": 3, "seq_len": 128},
              "optim": {"lr": 3e-4}, "probe": SECRET, "api_key": "not-logged"}
    run = WandbRun.start(logging_cfg(), run_dir, config, None)
    import wandb

    assert run.run_id and wandb.run.settings.api_key == SECRET  # wandb did see the key it must not write
    run.log({"step": 0, "val_loss": 9.0, "val_ppl": math.exp(9.0), "consumed_samples": 0, "tokens_seen": 0})
    for step in (1, 2, 3):
        run.log(train_record(step))
    run.log(eval_record(3))
    run.finish()
    assert_no_wandb_core()

    (path,) = offline_files(run_dir)
    data = read_offline_run(path)
    assert (data["id"], data["name"], data["project"]) == (run.run_id, "demo_run", "weft-test")
    cfg = data["config"]
    assert cfg["model"] == {"name": "gpt2_tiny", "num_layers": 2}
    assert cfg["train"] == {"steps": 3, "seq_len": 128}
    assert cfg["optim"] == {"lr": 3e-4}
    assert cfg["probe"] == REDACTED and "api_key" not in cfg

    step_metrics = {m.glob_name or m.name: m.step_metric for m in data["metrics"]}
    assert "trainer/step" in step_metrics
    for glob in ("train/*", "val/*", "perf/*", "memory/*", "system/*"):
        assert step_metrics[glob] == "trainer/step"

    rows = data["rows"]
    assert [r["trainer/step"] for r in rows] == [0, 1, 2, 3, 3]
    assert rows[0]["val/loss"] == 9.0
    for row, step in zip(rows[1:4], (1, 2, 3), strict=True):
        want = train_record(step)
        assert row["train/loss"] == pytest.approx(want["loss"])
        assert row["train/lr"] == pytest.approx(want["lr"])
        assert row["train/grad_norm"] == pytest.approx(want["grad_norm"])
        assert row["perf/tokens_per_s"] == pytest.approx(want["tokens_per_s"])
        assert row["train/consumed_samples"] == want["consumed_samples"]
        assert row["train/tokens_seen"] == want["tokens_seen"]
        assert "perf/mfu" not in row  # None is left out
        assert not any(k.startswith("val/") for k in row)
    assert rows[4]["val/loss"] == pytest.approx(4.0 / 3)
    assert rows[4]["val/ppl"] == pytest.approx(math.exp(4.0 / 3))
    assert rows[4]["train/tokens_seen"] == 3 * 1024
    assert_secret_nowhere(wandb_env)


def test_resume_keeps_every_row(wandb_env):
    run_dir = wandb_env / "resumed"
    first = WandbRun.start(logging_cfg(), run_dir, {"train": {"steps": 5}}, None)
    for step in (1, 2, 3):
        first.log(train_record(step))
    first.finish()
    assert_no_wandb_core()

    # A trainer resumed from the step-1 checkpoint re-logs steps 2 and 3 before going on.
    second = WandbRun.start(logging_cfg(), run_dir, {"train": {"steps": 5}}, first.run_id)
    assert second.run_id == first.run_id
    for step in (2, 3, 4, 5):
        second.log(train_record(step))
    second.finish()
    assert_no_wandb_core()

    files = offline_files(run_dir)
    assert len(files) == 2, files
    segments = [read_offline_run(f) for f in files]
    assert {s["id"] for s in segments} == {first.run_id}
    assert [[r["trainer/step"] for r in s["rows"]] for s in segments] == [[1, 2, 3], [2, 3, 4, 5]]
    for segment in segments:
        assert ("trainer/step" in {m.name for m in segment["metrics"]})
        for step, row in by_step(segment["rows"]).items():
            assert row["train/loss"] == pytest.approx(5.0 / step)
    assert_secret_nowhere(wandb_env)


def test_a_new_start_never_reuses_an_active_run(wandb_env):
    """A run left unfinished in this process (a crashed fit) is finished, not handed to the next start."""
    old = WandbRun.start(logging_cfg(), wandb_env / "crashed", {}, None)
    old.log(train_record(1))
    with WandbRun.start(logging_cfg(), wandb_env / "next", {}, None) as new:
        assert new.run_id != old.run_id
        new.log(train_record(1))
    assert_no_wandb_core()
    for name, run in (("crashed", old), ("next", new)):
        (path,) = offline_files(wandb_env / name)
        data = read_offline_run(path)
        assert data["id"] == run.run_id and [r["trainer/step"] for r in data["rows"]] == [1]


def test_trainer_logs_to_wandb_and_keeps_the_run_id_across_resume(wandb_env):
    """A training run logs the config and every metric; the id goes into the checkpoint and a resume reuses it."""
    import torch

    from engine.parallel.state import ParallelState
    from engine.training.checkpoint import latest_checkpoint, read_meta
    from engine.training.trainer import Trainer
    from tests.test_trainer import tiny_config, write_pattern_shard

    shard = write_pattern_shard(wandb_env / "shard")
    state = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    run_dir = wandb_env / "run"
    run_dir.mkdir()

    def trainer(steps: int) -> Trainer:
        cfg = tiny_config(shard, str(wandb_env / "cache"))
        cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.decay_steps = steps, 1, 10
        cfg.logging.wandb, cfg.logging.wandb_mode = True, "offline"
        return Trainer(cfg, state, run_dir)

    first = trainer(3)
    first.fit()
    run_id = read_meta(latest_checkpoint(run_dir))["wandb_run_id"]
    assert run_id and first.wandb_run_id == run_id
    second = trainer(5)
    second.resume(latest_checkpoint(run_dir))
    second.fit()
    runs = [read_offline_run(f) for f in offline_files(run_dir)]
    assert [r["id"] for r in runs] == [run_id, run_id]
    assert runs[0]["config"]["train"]["steps"] == 3 and runs[1]["config"]["train"]["steps"] == 5
    train_rows = {s: r for run in runs for s, r in by_step([x for x in run["rows"] if "train/loss" in x]).items()}
    assert sorted(train_rows) == [1, 2, 3, 4, 5]
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert {s: row["train/loss"] for s, row in train_rows.items()} == pytest.approx(losses, rel=1e-12)
    assert any("val/loss" in x for x in runs[0]["rows"])
    assert_secret_nowhere(wandb_env)
    assert_no_wandb_core()


def test_a_run_stopped_by_a_signal_is_marked_preempted(wandb_env):
    """SIGUSR1 mid-run (Slurm's time-limit warning): the W&B run is marked preempting and ends with exit code 75, so
    W&B shows it preempted, not finished or crashed."""
    import signal

    import torch

    from engine.parallel.state import ParallelState
    from engine.training.preemption import EXIT_STOPPED
    from engine.training.trainer import Trainer
    from tests.test_preemption import signal_after
    from tests.test_trainer import tiny_config, write_pattern_shard

    cfg = tiny_config(write_pattern_shard(wandb_env / "shard"), str(wandb_env / "cache"))
    cfg.logging.wandb, cfg.logging.wandb_mode = True, "offline"
    (wandb_env / "run").mkdir()
    trainer = Trainer(cfg, ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu")), wandb_env / "run")
    signal_after(trainer, 2, signal.SIGUSR1)
    trainer.fit()
    assert trainer.stopped_by == "SIGUSR1" and trainer.step == 2
    records = read_records(offline_files(wandb_env / "run")[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "preempting" in kinds and kinds[-1] == "exit"
    assert records[-1].exit.exit_code == EXIT_STOPPED  # W&B shows "preempted" only for a non-zero exit
    assert_no_wandb_core()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
