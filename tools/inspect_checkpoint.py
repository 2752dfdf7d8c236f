#!/usr/bin/env python3
"""Describe and verify a checkpoint. Run with --help; the logic lives in engine.training.inspect_checkpoint."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.training.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
