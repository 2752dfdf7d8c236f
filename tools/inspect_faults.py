#!/usr/bin/env python3
"""Show what each rank was doing when a job failed. Run with --help; the logic lives in
engine.training.inspect_faults."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.training.inspect_faults import main

if __name__ == "__main__":
    sys.exit(main())
