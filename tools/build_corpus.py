#!/usr/bin/env python3
"""Write the built-in corpus (the Python standard library's sources) as jsonl.

Run with --help; the logic lives in engine.data.builtin_corpus.
"""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data.builtin_corpus import main

if __name__ == "__main__":
    sys.exit(main())
