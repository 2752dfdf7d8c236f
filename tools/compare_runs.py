#!/usr/bin/env python3
"""Compare two runs' loss curves. Run with --help; the logic lives in engine.training.compare_runs."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.training.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
