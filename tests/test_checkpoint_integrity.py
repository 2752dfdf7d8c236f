"""Verified checkpoints (engine/training/integrity.py): the manifest lists every file with the SHA-256 `sha256sum`
would print; a flipped byte (with verification), a truncated and a deleted file each give an error naming the file,
and train.resume_fallback resumes from the newest intact checkpoint before it, whose losses then continue the
uninterrupted run's. Verification is split over the ranks and agreed. tools/inspect_checkpoint.py reports the same.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.parallel.state import ParallelState
from engine.training.checkpoint import (
    CheckpointError,
    checkpoints_dir,
    find_resume_checkpoint,
    latest_checkpoint,
    read_meta,
    step_dir_name,
)
from tests.distributed import run_ranks
from tests.test_train_cli import REPO, TINY, train
from tests.test_train_cli import shard as cli_shard  # noqa: F401 (the CLI tests' shard fixture)
from tests.test_trainer import start_trainer, tiny_config, write_pattern_shard

SINGLE = ParallelState(tp=1, pp=1, dp=1, rank=0, device=torch.device("cpu"))
MODEL = "model-pp00-tp00.safetensors"


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("integrity")
    return write_pattern_shard(root / "shard"), str(root / "cache")


@pytest.fixture
def run(tmp_path, shard) -> Path:
    """A run with checkpoints at steps 2 and 4."""
    cfg = tiny_config(*shard)
    cfg.train.steps, cfg.train.save_interval, cfg.train.keep_last, cfg.train.eval_interval = 4, 2, 0, 0
    start_trainer(cfg, tmp_path).fit()
    return tmp_path


def damage(step_dir: Path, how: str) -> None:
    """Flip a byte in the middle of the model file, cut its end off, or delete it."""
    f = step_dir / MODEL
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "truncate":
        f.write_bytes(bytes(data[:-100]))
    else:
        f.unlink()


def test_the_manifest_lists_every_file_with_its_sha256(run):
    """Every file of the step directory but the manifest, with the size and digest sha256sum gives."""
    step = checkpoints_dir(run) / step_dir_name(4)
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert set(manifest["files"]) == {f.name for f in step.iterdir()} - {"manifest.json"}
    assert "meta.json" in manifest["files"] and MODEL in manifest["files"]
    for name, record in manifest["files"].items():
        data = (step / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((step / "meta.json").read_text())["manifest"] == "manifest.json"


@pytest.mark.parametrize(("how", "verify", "match"), [
    ("flip", True, rf"{MODEL}: sha256 [0-9a-f]{{16}}\.\.\. differs from the manifest's"),
    ("truncate", False, rf"{MODEL}: \d+ bytes, but \d+ were written"),
    ("delete", False, rf"{MODEL}: missing from the checkpoint"),
])
def test_a_damaged_latest_is_an_error_naming_the_file_or_falls_back(run, capsys, how, verify, match):
    """Without fallback: an error naming the file (and the fix); with it: the previous checkpoint, loudly."""
    damage(checkpoints_dir(run) / step_dir_name(4), how)
    with pytest.raises(CheckpointError, match=match) as error:
        find_resume_checkpoint(run, SINGLE, verify=verify)
    assert "train.resume_fallback=true" in str(error.value)
    picked = find_resume_checkpoint(run, SINGLE, verify=verify, fallback=True)
    assert picked == checkpoints_dir(run) / step_dir_name(2)
    err = capsys.readouterr().err
    assert "WARNING: resuming from" in err and MODEL in err


def test_a_flipped_byte_passes_the_size_check_alone(run):
    """Sizes are always checked, contents only with verification: the documented cost of a fast load."""
    damage(checkpoints_dir(run) / step_dir_name(4), "flip")
    assert find_resume_checkpoint(run, SINGLE) == checkpoints_dir(run) / step_dir_name(4)


def test_no_intact_checkpoint_and_an_incomplete_one(run):
    """Every checkpoint damaged: one error listing each; a published directory without its manifest is incomplete;
    `latest` naming anything but a step directory is refused."""
    root = checkpoints_dir(run)
    damage(root / step_dir_name(4), "delete")
    (root / step_dir_name(2) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*missing from the checkpoint.*manifest.json: "
                                              r"missing; .* is not a complete checkpoint"):
        find_resume_checkpoint(run, SINGLE, fallback=True)
    (root / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match=r"names '\.\./\.\./etc', not a step directory"):
        latest_checkpoint(run)


def verify_on_two_ranks(rank: int, world_size: int, shard: str, cache: str, root: str) -> dict:
    cfg = tiny_config(shard, cache, global_batch=8, micro=2)
    cfg.parallel.dp, cfg.parallel.zero_stage = world_size, 1  # each rank writes its own shard files
    cfg.train.steps, cfg.train.save_interval, cfg.train.keep_last, cfg.train.eval_interval = 4, 2, 0, 0
    trainer = start_trainer(cfg, Path(root))
    trainer.fit()
    torch.distributed.barrier()
    if rank == 0:
        damage_file = checkpoints_dir(root) / step_dir_name(4) / "optimizer-pp00-tp00-dp01.safetensors"
        data = bytearray(damage_file.read_bytes())
        data[-10] ^= 0xFF
        damage_file.write_bytes(bytes(data))
    torch.distributed.barrier()
    try:
        find_resume_checkpoint(root, trainer.state, verify=True)
        error = None
    except CheckpointError as e:
        error = str(e)
    picked = find_resume_checkpoint(root, trainer.state, verify=True, fallback=True)
    return {"error": error, "picked": picked.name}


def test_verification_is_shared_by_the_ranks_and_agreed(tmp_path, shard):
    """ZeRO dp 2: one rank's optimizer shard corrupted; whichever rank re-hashes it, both raise the same error and
    both fall back to the same step."""
    per_rank = run_ranks(2, verify_on_two_ranks, *shard, str(tmp_path), timeout=300)
    assert per_rank[0] == per_rank[1]
    assert "optimizer-pp00-tp00-dp01.safetensors: sha256" in per_rank[0]["error"]
    assert per_rank[0]["picked"] == step_dir_name(2)


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def test_resume_fallback_from_the_command_line(tmp_path, cli_shard):  # noqa: F811
    """An 8-step run whose last checkpoint is then corrupted: resuming it with verification stops with exit 1
    naming the file; with train.resume_fallback=true it resumes from step 6 and redoes steps 7-8 with the first
    run's losses, each logged once; inspect_checkpoint agrees."""
    run = tmp_path / "run"
    args = [*TINY, f"data.prefix={cli_shard}", "train.save_interval=2", "train.keep_last=0", "train.eval_interval=0",
            "train.log_interval=1", "optim.warmup_steps=1", "optim.decay_steps=10", "train.steps=8",
            f"train.run_dir={run}", "train.verify_checkpoint=true"]
    args = [a for a in args if not a.startswith(("train.steps=6", "train.log_interval=2", "train.eval_interval=3"))]
    assert train(args, tmp_path).returncode == 0
    uninterrupted = losses(run)
    damage(checkpoints_dir(run) / step_dir_name(8), "flip")
    r = train(args, tmp_path)
    assert r.returncode == 1 and f"step_00000008/{MODEL}: sha256" in r.stderr, r.stderr[-2000:]

    tool = [sys.executable, str(REPO / "tools" / "inspect_checkpoint.py")]
    checked = subprocess.run([*tool, str(run), "--verify"], capture_output=True, text=True)
    assert checked.returncode == 1 and f"{MODEL}: sha256" in checked.stderr
    survey = subprocess.run([*tool, str(run), "--all"], capture_output=True, text=True)
    assert survey.returncode == 0 and "step_00000008  intact (sizes)  <- latest" in survey.stdout  # sizes only
    intact = subprocess.run([*tool, str(checkpoints_dir(run) / step_dir_name(6)), "--verify"], capture_output=True,
                            text=True)
    assert intact.returncode == 0 and "verified 4 files" in intact.stdout and "step 6, format 2" in intact.stdout

    r = train([*args, "train.resume_fallback=true"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout and "step_00000006" in r.stdout
    assert "WARNING: resuming from" in r.stderr
    assert losses(run) == uninterrupted  # steps 7 and 8 logged once: the first run's lines rolled back
    rolled = [json.loads(x) for x in (run / "metrics.rolled_back.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rolled if "loss" in x] == [7, 8]


def rewrite(step_dir: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and update the manifest to match: damage that sizes and checksums cannot see."""
    (step_dir / name).write_bytes(data)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def edited_meta(step_dir: Path, edit) -> bytes:
    meta = json.loads((step_dir / "meta.json").read_text())
    return json.dumps(edit(meta)).encode()


@pytest.mark.parametrize(("name", "content", "match"), [
    ("meta.json", lambda d: b"[1, 2, 3]", r"meta.json: holds a JSON list, not an object"),
    ("meta.json", lambda d: edited_meta(d, lambda m: {k: v for k, v in m.items() if k != "step"}),
     r"meta.json: malformed \(no 'step'\)"),
    ("meta.json", lambda d: edited_meta(d, lambda m: {**m, "step": "four"}),
     r"meta.json: malformed \('step' is \"four\", not an integer\)"),
    ("meta.json", lambda d: edited_meta(d, lambda m: {**m, "consumed_samples": 1.5, "config": []}),
     r"meta.json: malformed \('consumed_samples' is 1.5, not an integer; 'config' is \[\], not an object\)"),
    ("meta.json", lambda d: b"[" * 100_000 + b"]" * 100_000, r"meta.json: JSON nested too deeply"),
    ("manifest.json", lambda d: b"{\"files\": " + b"[" * 100_000 + b"]" * 100_000 + b"}",
     r"manifest.json: JSON nested too deeply"),
    ("rng-rank00000.safetensors", lambda d: safetensors_bytes({"cpu": torch.zeros(3, dtype=torch.uint8)}),
     r"rng-rank00000.safetensors: not a saved random state"),
    ("rng-rank00000.safetensors", lambda d: safetensors_bytes({"state": torch.zeros(3)}),
     r"rng-rank00000.safetensors: not a saved random state"),
])
def test_malformed_metadata_names_the_file_and_falls_back(run, capsys, name, content, match):
    """meta.json of the wrong shape, JSON nested past the parser's recursion limit, an RNG file that is no random
    state: an error naming the file (not a KeyError or RecursionError traceback); with fallback, the step before."""
    step = checkpoints_dir(run) / step_dir_name(4)
    data = content(step)
    if name == "manifest.json":
        (step / name).write_bytes(data)
    else:
        rewrite(step, name, data)
    with pytest.raises(CheckpointError, match=match) as error:
        find_resume_checkpoint(run, SINGLE)
    assert "train.resume_fallback=true" in str(error.value)
    assert find_resume_checkpoint(run, SINGLE, fallback=True) == checkpoints_dir(run) / step_dir_name(2)
    assert "WARNING: resuming from" in capsys.readouterr().err


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def test_latest_may_not_lead_outside_the_checkpoints(run, tmp_path_factory):
    """`latest` as a symbolic link, or naming a step directory that is a link elsewhere, is refused."""
    root = checkpoints_dir(run)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "pointer").write_text("step_00000004\n")
    (root / "latest").unlink()
    (root / "latest").symlink_to(outside / "pointer")
    with pytest.raises(CheckpointError, match=r"latest: a symbolic link .*refusing to follow it"):
        find_resume_checkpoint(run, SINGLE)
    (root / "latest").unlink()
    (root / "latest").write_text("step_00000006\n")
    (root / "step_00000006").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"names step_00000006, a symbolic link to .*outside"):
        find_resume_checkpoint(run, SINGLE)


def step_dirs(run_dir: Path) -> list[int]:
    return sorted(int(d.name[5:]) for d in checkpoints_dir(run_dir).iterdir() if d.name.startswith("step_"))


def poison(trainer) -> list[torch.Tensor]:
    """Set the first parameter to NaN (from then on every loss is NaN and every update skipped); returns the weights
    from before."""
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    return before


def test_retention_keeps_the_checkpoint_a_resume_falls_back_to(tmp_path, shard):
    """keep_last=2; step 2 damaged after its save, steps 3-4 saved with NaN weights: step 1, the newest good one,
    survives the pruning (today it is deleted, leaving only bad ones), and a fallback resume takes it. Once a good
    checkpoint is newer, it goes."""
    cfg = tiny_config(*shard)
    cfg.train.steps, cfg.train.keep_last, cfg.train.eval_interval = 6, 2, 0
    trainer = start_trainer(cfg, tmp_path)
    for _ in range(2):
        trainer.train_step()
        trainer.save()
    damage(checkpoints_dir(tmp_path) / step_dir_name(2), "truncate")
    good = poison(trainer)
    for _ in range(2):
        trainer.train_step()
        trainer.save()
    assert trainer.nonfinite_steps == 2
    assert step_dirs(tmp_path) == [1, 3, 4]
    assert read_meta(checkpoints_dir(tmp_path) / step_dir_name(4))["finite_weights"] is False
    with pytest.raises(CheckpointError, match=r"step_00000004/meta.json: saved with non-finite \(NaN or Inf\) "
                                              r"weights.*train.resume_fallback=true"):
        find_resume_checkpoint(tmp_path, SINGLE)
    assert find_resume_checkpoint(tmp_path, SINGLE, fallback=True) == checkpoints_dir(tmp_path) / step_dir_name(1)
    with torch.no_grad():
        for p, g in zip(trainer.model.parameters(), good, strict=True):
            p.copy_(g)
    trainer.train_step()
    trainer.save()
    assert step_dirs(tmp_path) == [4, 5]


def test_retention_keeps_the_last_checkpoint_saved_with_a_finite_loss(tmp_path, shard):
    """A non-finite loss skips the update (the weights stay finite): keep_last=1 keeps the newest checkpoint, which a
    resume takes, and the newest one saved with a finite loss."""
    cfg = tiny_config(*shard)
    cfg.train.steps, cfg.train.keep_last, cfg.train.eval_interval = 6, 1, 0
    trainer = start_trainer(cfg, tmp_path)
    trainer.train_step()
    trainer.save()
    compute = trainer.compute_gradients
    trainer.compute_gradients = lambda: compute() * float("nan")
    for _ in range(2):
        trainer.train_step()
        trainer.save()
    assert step_dirs(tmp_path) == [1, 3]
    assert find_resume_checkpoint(tmp_path, SINGLE) == checkpoints_dir(tmp_path) / step_dir_name(3)
    trainer.compute_gradients = compute
    trainer.train_step()
    trainer.save()
    assert step_dirs(tmp_path) == [4]


def test_retention_judges_the_fallback_as_a_resume_does(tmp_path, shard):
    """keep_last=2; step 3's random state damaged after its save, step 4 saved with NaN weights: a resume would
    refuse both, so pruning must keep step 2 (taking step 3, by its metadata alone, for the fallback lost it)."""
    cfg = tiny_config(*shard)
    cfg.train.steps, cfg.train.keep_last, cfg.train.eval_interval = 4, 2, 0
    trainer = start_trainer(cfg, tmp_path)
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    rewrite(checkpoints_dir(tmp_path) / step_dir_name(3), "rng-rank00000.safetensors",
            safetensors_bytes({"cpu": torch.zeros(3, dtype=torch.uint8)}))
    poison(trainer)
    trainer.train_step()
    trainer.save()
    assert step_dirs(tmp_path) == [2, 3, 4]
    assert find_resume_checkpoint(tmp_path, SINGLE, fallback=True) == checkpoints_dir(tmp_path) / step_dir_name(2)
