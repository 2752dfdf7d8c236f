#!/usr/bin/env python3
"""Continue a prompt with a trained checkpoint. Run with --help; the logic lives in engine.inference."""

import sys
from pathlib import Path

# Runnable by path from any directory, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.inference import main

if __name__ == "__main__":
    sys.exit(main())
