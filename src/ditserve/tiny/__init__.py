"""The embedded tiny Wan2.1 model: a default model that really generates, with its own test bench.

- `data`: the prompt grammar ("a red circle moving left on a blue background"), the
  held-out split, and a procedural renderer of 32x32, 17-frame clips (deterministic per seed);
- `score`: decides object colour, background colour and direction from pixels (no model);
- `evaluate`: generates clips and reports adherence (`ditserve eval-tiny`);
- `embedded`: where the shipped folder is (`default_model_path()`) and how to sample it (`GENERATION`).

The training code is not part of the package: `tools/train_tiny.py` (with `tools/tiny/`) trains
the VAE, text encoder and DiT from a seed. The trained folder ships as package data
(src/ditserve/assets/tiny-wan); `ditserve generate` / `serve` use it when no --model is given.
README.md, "The embedded tiny model", says how it was trained and how well it follows its prompts.
"""

from __future__ import annotations

from ditserve.tiny.data import Scene, all_scenes, held_out_scenes, parse_prompt, render_clip, train_scenes
from ditserve.tiny.embedded import GENERATION, Generation, default_model_path
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

