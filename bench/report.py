"""How the bench scripts report: the command line they show, where their results go, and the PSNR
they compare frames by."""

from __future__ import annotations

import json
import math
import shlex
import sys
from typing import Any

import numpy as np

__all__ = ["psnr", "publish", "shown_args"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of frames `a` against `b` (values in [0, 1]); inf when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def shown_args() -> str:
    """This run's arguments without output paths (they point into a scratch folder), quoted for a shell."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--json", "--markdown"):
            skip = True
        else:
            args.append(arg)
    return shlex.join(args)


def publish(text: str, results: Any, markdown: str | None, json_path: str | None) -> None:
    """Print the markdown section; append it to `markdown` and write `results` to `json_path` if given."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
