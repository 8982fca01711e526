"""The shipped tiny model: where its folder is and how it is meant to be sampled.

Its own module so that `evaluate` (and the CLI) can find the folder without importing the
`ditserve.tiny` package, which imports `evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ditserve.tiny.data import FRAMES, SIZE

__all__ = ["GENERATION", "Generation", "default_model_path"]


@dataclass(frozen=True)
class Generation:
    """How the tiny model is meant to be sampled (pass these to `Pipeline.generate`)."""

    height: int = SIZE
    width: int = SIZE
    num_frames: int = FRAMES
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    negative_prompt: str = ""  # the encoding the DiT was trained with when the text was dropped


GENERATION = Generation()


def default_model_path() -> Path:
    """The embedded tiny model's pipeline folder (`ditserve/assets/tiny-wan`, installed as package data)."""
    path = Path(str(files("ditserve").joinpath("assets", "tiny-wan")))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path}: the embedded tiny model is missing (no model_index.json); reinstall ditserve, or rebuild it "
            "with `python tools/train_tiny.py --out src/ditserve/assets/tiny-wan --seed 0 --threads 1`"
        )
    return path
