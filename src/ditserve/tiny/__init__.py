"""The embedded tiny Wan2.1 model: a default model that really generates, with its own test bench.

- `data`: the prompt grammar ("a red circle moving left on a blue background"), the
  held-out split, and a procedural renderer of 32x32, 17-frame clips (deterministic per seed);
- `score`: decides object colour, background colour and direction from pixels (no model);
- `train`: trains the VAE, text encoder and DiT from a seed (tools/train_tiny.py);
- `evaluate`: generates clips and reports adherence (`ditserve eval-tiny`).

The trained folder ships as package data (src/ditserve/assets/tiny-wan); `default_model_path()`
finds it, and `ditserve generate` / `serve` use it when no --model is given. README.md,
"The embedded tiny model", says how it was trained and how well it follows its prompts.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ditserve.tiny.arch import GENERATION, Generation
from ditserve.tiny.data import Scene, all_scenes, held_out_scenes, parse_prompt, render_clip, train_scenes
from ditserve.tiny.evaluate import EvalReport, eval_tiny, evaluate
from ditserve.tiny.score import ClipScore, score_clip

__all__ = [
    "GENERATION",
    "ClipScore",
    "EvalReport",
    "Generation",
    "Scene",
    "all_scenes",
    "default_model_path",
    "eval_tiny",
    "evaluate",
    "held_out_scenes",
    "parse_prompt",
    "render_clip",
    "score_clip",
    "train_scenes",
]


def default_model_path() -> Path:
    """The embedded tiny model's pipeline folder (`ditserve/assets/tiny-wan`, installed as package data)."""
    path = Path(str(files("ditserve").joinpath("assets", "tiny-wan")))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path}: the embedded tiny model is missing (no model_index.json); reinstall ditserve, or rebuild it "
            "with `python tools/train_tiny.py --out src/ditserve/assets/tiny-wan --seed 0 --threads 1`"
        )
    return path
