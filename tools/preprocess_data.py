#!/usr/bin/env python3
"""Tokenize a corpus into .bin/.idx token shards. Run with --help; the logic lives in engine.data.preprocess."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
