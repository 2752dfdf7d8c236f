#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer on a corpus. Run with --help; the logic lives in engine.data.train_tokenizer."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
