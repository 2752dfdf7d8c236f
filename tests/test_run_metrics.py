"""Metrics that explain a run: phase times, memory and counters in metrics.jsonl, the offline W&B run and the
TensorBoard event files, every step once across a stop and a resume."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest

from engine.training.metrics import GROUPS, metric_key
from engine.training.timers import PHASES, PhaseTimer
from tests.distributed import run_ranks
from tests.test_preemption import signal_after
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard
from tests.test_wandb_logger import offline_files, read_jsonl, read_offline_run, wandb_env  # noqa: F401

STEPS, STOP_AT, EVAL_EVERY = 6, 3, 2
PHASE_FIELDS = [f"{phase}_s" for phase in PHASES] + ["other_s"]


def stop_and_resume(rank: int, world_size: int, shard: str, cache: str, run_dir: str) -> str:
    """dp 2 with W&B (offline) and TensorBoard: stopped by SIGUSR1 after step STOP_AT, then resumed to STEPS in new
    trainers; returns the W&B run id the checkpoint recorded."""
    from engine.training.checkpoint import latest_checkpoint, read_meta
    from engine.training.trainer import Trainer

    def config():
        cfg = tiny_config(shard, cache, global_batch=8, micro=2, dp=world_size)
        cfg.train.steps, cfg.train.eval_interval = STEPS, EVAL_EVERY
        cfg.optim.warmup_steps, cfg.optim.decay_steps = 1, 10
        cfg.logging.wandb, cfg.logging.wandb_mode, cfg.logging.tensorboard = True, "offline", True
        return cfg

    first = start_trainer(config(), Path(run_dir))
    if rank == world_size - 1:  # the other rank learns of it through the stop flag's all-reduce
        signal_after(first, STOP_AT, signal.SIGUSR1)
    first.fit()
    assert first.stopped_by == "SIGUSR1" and first.step == STOP_AT
    second = Trainer(config(), first.state, run_dir)
    second.resume(latest_checkpoint(run_dir))
    second.fit()
    assert second.step == STEPS and second.stopped_by is None
    return read_meta(latest_checkpoint(run_dir))["wandb_run_id"]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_stopped_and_resumed_run_logs_every_step_once_everywhere(wandb_env):  # noqa: F811
    """dp 2, stopped after step 3 and resumed to 6: metrics.jsonl, W&B and TensorBoard each hold steps 1-6 once, in
    the groups train/ val/ perf/ memory/ system/, with the same values; one W&B run id; phases sum to the step."""
    pytest.importorskip("tensorboard")
    run_dir = wandb_env / "run"
    run_id = run_ranks(2, stop_and_resume, write_pattern_shard(wandb_env / "shard"), str(wandb_env / "cache"),
                       str(run_dir))[0]

    lines = read_jsonl(run_dir / "metrics.jsonl")
    rows = {r["step"]: r for r in lines if "loss" in r}
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in lines if "val_loss" in r] == list(range(0, STEPS + 1, EVAL_EVERY))
    saved = {STOP_AT, STEPS}
    for step, r in rows.items():
        # The phases and `other` add up to the step time; evaluation and checkpoint land on the steps that did them.
        assert sum(r[f] for f in PHASE_FIELDS) == pytest.approx(r["step_time_s"], rel=1e-9), r
        assert r["other_s"] >= 0 and r["forward_backward_s"] > 0 and r["data_s"] > 0 and r["dp_comm_s"] > 0, r
        assert (r["eval_s"] > 0) == (step % EVAL_EVERY == 0), r
        assert (r["checkpoint_s"] > 0) == (step in saved), r
        assert r["pipeline_bubble_s"] == 0  # no pipeline
        assert 0 < r["memory_allocated_gib"] <= r["peak_memory_gib"]  # CPU: resident set now and at its peak
        assert r["straggler_ratio"] >= 1 and (r["skipped_steps"], r["nonfinite_steps"]) == (0, 0)
        assert "loss_scale" not in r  # fp32: no loss scaler

    # W&B: one run over two starts; the steps of both together are 1-6, once each, every value as in the file.
    segments = [read_offline_run(f) for f in offline_files(run_dir)]
    assert len(segments) == 2 and {s["id"] for s in segments} == {run_id}
    train_rows = [row for s in segments for row in s["rows"] if "train/loss" in row]
    assert [row["trainer/step"] for row in train_rows] == list(range(1, STEPS + 1))
    for row in train_rows:
        want = rows[row["trainer/step"]]
        ours = {k: v for k, v in row.items() if not k.startswith("_")}  # less W&B's own _step, _runtime, ...
        assert ours == pytest.approx({"trainer/step": want["step"],
                                      **{metric_key(k): v for k, v in want.items() if k != "step" and v is not None}})
    all_rows = [{k: v for k, v in row.items() if not k.startswith("_")} for s in segments for row in s["rows"]]
    assert {key.split("/")[0] for row in all_rows for key in row} == {"trainer", *GROUPS}
    assert all("train/tokens_seen" in row for row in all_rows)  # the tokens-seen axis, in every row
    for segment in segments:
        step_metric = {m.glob_name: m.step_metric for m in segment["metrics"] if m.glob_name}
        assert step_metric == {f"{group}/*": "trainer/step" for group in GROUPS}

    # TensorBoard: two event files in one directory; as TensorBoard reads them, each tag's steps are once each.
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert {tag.split("/")[0] for tag in scalars} == set(GROUPS)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert [step for step, _ in scalars["val/loss"]] == list(range(0, STEPS + 1, EVAL_EVERY))
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), tag
    for field in ("loss", "step_time_s", "memory_allocated_gib", "straggler_ratio"):
        assert [v for _, v in scalars[metric_key(field)]] == pytest.approx([rows[s][field] for s in rows], rel=1e-6)


def test_tensorboard_hides_the_steps_a_resume_redoes(tmp_path):
    """A run that logged steps 1-5 and died after its step-2 checkpoint: the resumed writer's steps 3-6 replace the
    old 3-5, as TensorBoard reads the directory."""
    pytest.importorskip("tensorboard")
    from engine.training.tensorboard_logger import TensorBoardRun

    crashed = TensorBoardRun(tmp_path, 0)
    for step in range(1, 6):
        crashed.log({"step": step, "loss": float(step), "mfu": None, "grad_norm": math.nan})
    crashed.close()
    resumed = TensorBoardRun(tmp_path, 2)
    for step in range(3, 7):
        resumed.log({"step": step, "loss": 100.0 + step})
    resumed.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {"train/loss": [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0), (6, 106.0)]}


def test_nested_phases_are_carved_out_and_the_rest_is_other():
    """A phase inside another is taken out of it; what no phase covers is `other`; per step over the window."""
    import torch

    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("forward_backward"):
            time.sleep(0.02)
            with timer.phase("pipeline_bubble"):
                time.sleep(0.2)
        time.sleep(0.05)
        timer.count_step()
    r = timer.read()
    assert r["pipeline_bubble_s"] >= 0.2 and 0.02 <= r["forward_backward_s"] < 0.15, r
    assert r["other_s"] >= 0.05 and sum(r[f] for f in PHASE_FIELDS) == pytest.approx(r["step_time_s"])
    assert timer.read()["step_time_s"] < 0.05  # a new window: nothing carried over
    with pytest.raises(ValueError, match="unknown phase"), timer.phase("backward"):
        pass
