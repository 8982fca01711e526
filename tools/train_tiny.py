"""Train the tiny Wan2.1 model: `python tools/train_tiny.py --out DIR --seed 0 [--threads 1 | --device cuda]`.

A thin wrapper around `ditserve.tiny.train.main` (also `python -m ditserve.tiny.train`); `--help`
lists every setting. README.md, "The embedded tiny model", has the recipe and results.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # run from a source checkout
    from ditserve.tiny.train import main

    raise SystemExit(main())
