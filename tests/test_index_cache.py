"""The index cache: built once however many processes ask at the same time, rebuilt when damaged."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from engine.data.index_cache import cached_arrays


def _slow_build(marker_dir: str) -> dict[str, np.ndarray]:
    Path(marker_dir, f"built-{mp.current_process().pid}").touch()
    time.sleep(0.5)  # long enough that every racer reaches the lock while the first one builds
    return {"a": np.arange(1000), "b": np.ones(3)}


def _racer(cache_dir: str, marker_dir: str) -> list[int]:
    arrays = cached_arrays(cache_dir, "race", {"x": 1}, ("a", "b"), lambda: _slow_build(marker_dir))
    return arrays["a"][:5].tolist()


def test_concurrent_processes_build_once(tmp_path):
    """Four processes asking for the same entry at once: one builds, all get the same arrays."""
    markers = tmp_path / "markers"
    markers.mkdir()
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_racer, [(str(tmp_path / "cache"), str(markers))] * 4)
    assert results == [[0, 1, 2, 3, 4]] * 4
    assert len(list(markers.iterdir())) == 1


def test_damaged_entry_is_rebuilt_and_never_misread(tmp_path):
    """A truncated array file of a published entry is detected and rebuilt, not served."""
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(10)}

    cached_arrays(tmp_path, "t", {"k": 1}, ("a",), build)
    (npy,) = tmp_path.glob("t-*-a.npy")
    npy.write_bytes(npy.read_bytes()[:40])
    arrays = cached_arrays(tmp_path, "t", {"k": 1}, ("a",), build)
    assert len(calls) == 2 and arrays["a"].tolist() == list(range(10))
    cached_arrays(tmp_path, "t", {"k": 1}, ("a",), build)
    assert len(calls) == 2  # the rebuilt entry is reused
    assert isinstance(arrays["a"], np.memmap)


def test_description_keys_the_entry(tmp_path):
    """A different description is a different entry; the same description is the same one."""
    a = cached_arrays(tmp_path, "t", {"seed": 1}, ("a",), lambda: {"a": np.zeros(2)})
    b = cached_arrays(tmp_path, "t", {"seed": 2}, ("a",), lambda: {"a": np.ones(2)})
    c = cached_arrays(tmp_path, "t", {"seed": 1}, ("a",), lambda: {"a": np.full(2, 7.0)})
    assert a["a"].tolist() == [0, 0] and b["a"].tolist() == [1, 1] and c["a"].tolist() == [0, 0]


def test_file_system_without_flock_gives_a_clear_error(tmp_path, monkeypatch):
    """A cache on a file system that refuses flock (Lustre mounted noflock) names the fix, not a bare errno."""
    def refuse(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(OSError, match=r"set data\.cache_dir to a node-local directory"):
        cached_arrays(tmp_path, "t", {"k": 1}, ("a",), lambda: {"a": np.zeros(2)})
