#!/usr/bin/env python3
"""Write a Hugging Face transformers model as a checkpoint. Run with --help; the logic lives in engine.hf."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.hf import import_main

if __name__ == "__main__":
    sys.exit(import_main())
