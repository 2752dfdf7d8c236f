"""Checkpoint integrity: the manifest that marks a step directory complete, and the checks made against it.

`manifest.json` lists every other file of a step directory with its size and SHA-256 (the digest `sha256sum`
prints, so a file can be checked by hand). Each rank fsyncs and hashes the files it wrote; rank 0 writes the
manifest from their reports, so it exists only once every rank's files are durable, and it is written last: a step
directory without it (where meta.json says there is one) is not a complete checkpoint. Loading always checks that
every listed file is there with its size (cheap); `verify` also re-hashes them (reads every byte).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from engine.training.reshard import CheckpointError

MANIFEST = "manifest.json"
ALGORITHM = "sha256"
_CHUNK = 16 * 2**20

FileRecord = dict  # {"bytes": int, "sha256": str}


def _process_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask alone must set one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _process_umask()


def honour_umask(path: Path) -> None:
    """Give a file the mode the umask asks for: safetensors writes 0600 whatever it is, which locks a shared run's
    teammates out of its checkpoints and exports."""
    os.chmod(path, 0o666 & ~UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """The file's SHA-256, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    """Make `path` durable and describe it: its size and SHA-256 (read back from the page cache)."""
    fsync_path(path)
    return {"bytes": path.stat().st_size, ALGORITHM: sha256_of(path)}


def write_manifest(step_dir: Path, records: dict[str, FileRecord]) -> None:
    """Write and fsync `manifest.json` over `records` (every other file of `step_dir`)."""
    path = step_dir / MANIFEST
    path.write_text(json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(records.items()))}, indent=1))
    fsync_path(path)


def read_json(path: Path):
    """A checkpoint's JSON file, parsed; CheckpointError naming it when it is not JSON (FileNotFoundError passes)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
    except RecursionError:  # json's parser recurses per nesting level
        raise CheckpointError(f"{path}: JSON nested too deeply to be ours; the checkpoint is damaged") from None


def read_manifest(step_dir: Path) -> dict[str, FileRecord] | None:
    """The manifest's file records, or None when the directory has no manifest."""
    path = step_dir / MANIFEST
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("bytes"), int)
                                              and isinstance(r.get(ALGORITHM), str) for r in files.values()):
        raise CheckpointError(f"{path}: not a manifest of file sizes and {ALGORITHM} digests; the checkpoint is "
                              "damaged")
    return files


def check_sizes(step_dir: Path, sizes: dict[str, int]) -> None:
    """Every file of `sizes` is in `step_dir` with that size; else CheckpointError naming the first that is not."""
    for name, size in sizes.items():
        f = step_dir / name
        if not f.exists():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, but {size} were written; the file is truncated "
                                  "or was replaced")


def checksum_problems(step_dir: Path, records: dict[str, FileRecord], names: list[str]) -> list[str]:
    """Re-hash the files `names` of the manifest `records`; a line naming each file that differs."""
    problems = []
    for name in names:
        try:
            actual = sha256_of(step_dir / name)
        except OSError as e:
            problems.append(f"{step_dir / name}: cannot be read ({e})")
            continue
        if actual != records[name][ALGORITHM]:
            problems.append(f"{step_dir / name}: {ALGORITHM} {actual[:16]}... differs from the manifest's "
                            f"{records[name][ALGORITHM][:16]}...; the file is corrupt")
    return problems
