"""Progress reporting for long offline jobs: a tqdm bar on a terminal, a plain line every 30 s in a log file."""

from __future__ import annotations

import re
import sys
import time

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1e9' or '1000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 1000000, 512MB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Bytes in the largest decimal unit that keeps the number at least 1."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Bytes, documents and tokens processed, with rates; `total` bytes may be None when unknown."""

    LOG_EVERY_S = 30.0

    def __init__(self, total: int | None, enabled: bool | None = None, desc: str = "preprocess"):
        self.total, self.start = total, time.perf_counter()
        self.nbytes = self.docs = self.tokens = 0
        self._last_log = self.start
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._quiet = enabled is False
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def _rates(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return f"{self.docs / dt:,.0f} docs/s, {self.nbytes / dt / 1e6:.2f} MB/s, {self.tokens / dt:,.0f} tok/s"

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        """Account for one processed batch."""
        self.nbytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(self._rates(), refresh=False)
        elif not self._quiet and time.perf_counter() - self._last_log >= self.LOG_EVERY_S:
            self._last_log = time.perf_counter()
            done = format_bytes(self.nbytes) + (f" of {format_bytes(self.total)}" if self.total else "")
            print(f"progress: {done}, {self.docs:,} docs, {self.tokens:,} tokens ({self._rates()})", file=sys.stderr)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
