"""Train the tiny Wan2.1 model: `python tools/train_tiny.py --out DIR --seed 0 [--threads 1 | --device cuda]`.

A thin wrapper around `tiny.train.main` (the training code in tools/tiny/, beside this file);
`--help` lists every setting. README.md, "The embedded tiny model", has the recipe and results.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent / "src")]  # tools/tiny, and ditserve from a source checkout
    from tiny.train import main

    raise SystemExit(main())
