"""A directory of index arrays keyed by a hash of everything they were built from.

Many ranks (and many runs) ask for the same indices; the first to take the lock builds them, the rest wait on the
lock and then memory-map the result. Files are written under temporary names and published by rename, with the
description written last as the completion marker, so a crash mid-build never leaves a half index that looks whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Bump when the index construction changes, so stale caches are rebuilt rather than misread.
INDEX_FORMAT_VERSION = 1


def user_cache_dir() -> Path:
    """$WEFT_CACHE_DIR, else $XDG_CACHE_HOME/weft, else ~/.cache/weft."""
    if os.environ.get("WEFT_CACHE_DIR"):
        return Path(os.environ["WEFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "weft"


def default_cache_dir(shard_prefix: str) -> Path:
    """`index-cache/` beside the shards when that directory is writable, else the user cache directory."""
    beside = Path(shard_prefix).resolve().parent / "index-cache"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    fallback = user_cache_dir() / "index-cache"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def available_host_memory() -> int:
    """Bytes of host memory new allocations can take now (Linux's MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def description_hash(description: dict) -> str:
    """A stable short hash of a JSON-able description."""
    blob = json.dumps({"version": INDEX_FORMAT_VERSION, **description}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_arrays(
    cache_dir: str | os.PathLike,
    kind: str,
    description: dict,
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
    log: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays `names` for `description`, memory-mapped from the cache, built by `build()` on a miss."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = f"{kind}-{description_hash(description)}"
    done = cache / f"{key}.json"
    for attempt in range(2):
        if not done.exists():
            with open(cache / f"{key}.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # others block here until the builder is finished
                except OSError as e:  # e.g. a Lustre client mounted with noflock
                    raise OSError(f"cannot lock the index cache {cache} ({e.strerror}); its file system does not "
                                  "support flock: set data.cache_dir to a node-local directory") from e
                if not done.exists():
                    if log:
                        log(f"building {kind} indices in {cache} ({key})")
                    arrays = build()
                    for name in names:
                        tmp = cache / f"{key}-{name}.tmp.npy"
                        np.save(tmp, arrays[name], allow_pickle=False)
                        os.replace(tmp, cache / f"{key}-{name}.npy")
                    tmp = cache / f"{key}.json.tmp"
                    tmp.write_text(json.dumps(description, indent=1, sort_keys=True))
                    os.replace(tmp, done)
        try:
            return {n: np.load(cache / f"{key}-{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}
        except (OSError, ValueError) as e:
            # A file of the entry was deleted or damaged after it was published: rebuild it once.
            if attempt:
                raise
            if log:
                log(f"cached {kind} indices {key} unreadable ({e}); rebuilding")
            done.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def stderr_log(msg: str) -> None:
    """Default progress logger for index building."""
    print(msg, file=sys.stderr)
