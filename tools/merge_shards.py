#!/usr/bin/env python3
"""Concatenate token shards into one. Run with --help; the logic lives in engine.data.merge_shards."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data.merge_shards import main

if __name__ == "__main__":
    sys.exit(main())
