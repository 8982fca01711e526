"""Prompt adherence of a tiny-model folder: generate clips, score them, and report.

`evaluate` generates one clip per prompt (seed `seed + i` for the i-th prompt) with
ditserve's own `Pipeline` (or diffusers' `WanPipeline`, `runner="diffusers"`, as a reference)
and scores each with `ditserve.tiny.score`. Adherence is the share of clips whose object
colour, background colour and direction all match their prompt. `eval_tiny` is the `ditserve eval-tiny`
command: held-out prompts, at the model's default guidance and at 1.0 (no guidance), and the
seconds each clip took.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ditserve.tiny.data import all_scenes, held_out_scenes, parse_prompt, render_clip, train_scenes
from ditserve.tiny.embedded import GENERATION, default_model_path
from ditserve.tiny.score import ClipScore, score_clip

__all__ = ["PROMPT_SETS", "EvalReport", "eval_tiny", "evaluate", "load_generator", "vae_roundtrip"]

Generate = Callable[[str, float, int, int], np.ndarray]  # (prompt, guidance, steps, seed) -> frames


@dataclass
class EvalReport:
    """Scores of one evaluation run and how long the clips took."""

    guidance_scale: float
    steps: int
    scores: list[ClipScore] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def _share(self, attr: str) -> float:
        return sum(bool(getattr(s, attr)) for s in self.scores) / max(1, len(self.scores))

    @property
    def adherence(self) -> float:
        """Share of clips with object colour, background and motion all as prompted."""
        return self._share("adherent")

    @property
    def accuracy(self) -> dict[str, float]:
        """Share of clips right on each attribute (shape is reported, not part of adherence)."""
        return {a: self._share(a + "_ok") for a in ("colour", "background", "direction", "shape")}

    @property
    def seconds_per_clip(self) -> float:
        return float(np.mean(self.seconds)) if self.seconds else 0.0


def load_generator(model_path: str | os.PathLike[str], *, device: str = "cpu", runner: str = "ditserve",
                   levers: Mapping[str, Any] | None = None) -> Generate:
    """A function generating one clip with the model at `model_path`, at the model's size and frame count.

    runner: "ditserve" (`ditserve.Pipeline`) or "diffusers" (`diffusers.WanPipeline`, the reference).
    levers: ditserve's opt-in speed levers as `Pipeline.from_pretrained` arguments (`cache`, `quantize`,
    `vae_dtype`); None or unset values: off.
    """
    g = GENERATION
    levers = {key: value for key, value in (levers or {}).items() if value is not None}
    if runner != "ditserve" and levers:
        raise ValueError(f"{', '.join(levers)}: ditserve's levers; the diffusers runner has none")
    if runner == "ditserve":
        from ditserve.pipelines import Pipeline

        pipe = Pipeline.from_pretrained(model_path, device=device, dtype="float32", **levers)

        def generate(prompt: str, guidance: float, steps: int, seed: int) -> np.ndarray:
            return pipe.generate(prompt, negative_prompt=g.negative_prompt, height=g.height, width=g.width,
                                 num_frames=g.num_frames, num_inference_steps=steps, guidance_scale=guidance,
                                 seed=seed).frames

        return generate
    if runner == "diffusers":
        from diffusers import WanPipeline

        ref = WanPipeline.from_pretrained(model_path, torch_dtype=torch.float32).to(device)  # stored as float16
        ref.set_progress_bar_config(disable=True)

        def generate(prompt: str, guidance: float, steps: int, seed: int) -> np.ndarray:
            out = ref(prompt=prompt, negative_prompt=g.negative_prompt, height=g.height, width=g.width,
                      num_frames=g.num_frames, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator(device).manual_seed(seed), output_type="np")
            return np.asarray(out.frames[0], dtype=np.float32)

        return generate
    raise ValueError(f"runner must be 'ditserve' or 'diffusers', got {runner!r}")


def evaluate(
    model_path: str | os.PathLike[str] | None = None,
    prompts: Sequence[str] | None = None,
    guidance_scale: float = GENERATION.guidance_scale,
    steps: int = GENERATION.num_inference_steps,
    seed: int = 0,
    *,
    device: str = "cpu",
    runner: str = "ditserve",
    generate: Generate | None = None,
    progress: bool = False,
) -> EvalReport:
    """Generate and score one clip per prompt (default: the held-out prompts) with the model at `model_path`.

    model_path None: the embedded model. `generate` (from `load_generator`) reuses a loaded model.
    progress: a tqdm bar over the prompts (on stderr).
    """
    if prompts is None:
        prompts = [s.prompt for s in held_out_scenes()]
    if generate is None:
        generate = load_generator(model_path or default_model_path(), device=device, runner=runner)
    report = EvalReport(guidance_scale=guidance_scale, steps=steps)
    for i, prompt in enumerate(tqdm(prompts, desc=f"guidance {guidance_scale:g}", unit="clip", disable=not progress)):
        start = time.perf_counter()
        frames = generate(prompt, guidance_scale, steps, seed + i)
        report.seconds.append(time.perf_counter() - start)
        report.scores.append(score_clip(prompt, frames))
    return report


@torch.no_grad()
def vae_roundtrip(
    model_path: str | os.PathLike[str], prompts: Sequence[str], seed: int = 0, *, device: str = "cpu"
) -> EvalReport:
    """Scores of rendered ground-truth clips after a VAE encode/decode: the adherence the VAE alone allows."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(Path(model_path) / "vae").to(device).eval()
    report = EvalReport(guidance_scale=float("nan"), steps=0)
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        clip = torch.from_numpy(render_clip(parse_prompt(prompt), seed=seed + i)).to(device)
        x = clip.permute(3, 0, 1, 2)[None] * 2.0 - 1.0
        out = vae.decode(vae.encode(x).latent_dist.mode(), return_dict=False)[0]
        frames = (out[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).float().cpu().numpy()
        report.seconds.append(time.perf_counter() - start)
        report.scores.append(score_clip(prompt, frames))
    return report


PROMPT_SETS = {"held-out": held_out_scenes, "train": train_scenes, "all": all_scenes}


def _row(report: EvalReport, label: str | None = None) -> str:
    acc = report.accuracy
    return (f"{label or f'{report.guidance_scale:g}':>8} {report.adherence:>9.1%} {acc['colour']:>7.1%} "
            f"{acc['background']:>10.1%} {acc['direction']:>7.1%} {acc['shape']:>7.1%} {report.seconds_per_clip:>8.2f}")


def eval_tiny(
    model: str | os.PathLike[str],
    *,
    prompt_set: str = "held-out",
    limit: int | None = None,
    guidance_scale: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    runner: str = "ditserve",
    min_adherence: float | None = None,
    vae_ceiling: bool = False,
    json_path: str | None = None,
    progress: bool = True,
    levers: Mapping[str, Any] | None = None,
) -> int:
    """`ditserve eval-tiny`: adherence at `guidance_scale` (default: the model's) and at 1.0; prints a table.

    Returns the exit status: 1 when `min_adherence` is given and adherence at `guidance_scale`
    is below it, else 0. `json_path`: also write every clip's scores there. `levers`: as `load_generator`.
    """
    guidance_scale = GENERATION.guidance_scale if guidance_scale is None else guidance_scale
    steps = GENERATION.num_inference_steps if steps is None else steps
    prompts = [s.prompt for s in PROMPT_SETS[prompt_set]()][:limit]
    levers = {key: value for key, value in (levers or {}).items() if value is not None}
    generate = load_generator(model, device=device, runner=runner, levers=levers)
    generate(prompts[0], guidance_scale, 2, 0)  # warm-up: first-call costs are not per-clip costs
    reports = [evaluate(prompts=prompts, guidance_scale=gs, steps=steps, seed=seed, generate=generate,
                        progress=progress)
               for gs in dict.fromkeys((guidance_scale, 1.0))]
    print(f"model {model}: {len(prompts)} {prompt_set} prompts, {steps} steps, {runner} on {device} "
          f"({torch.get_num_threads()} threads)" + "".join(f", {key} {value}" for key, value in levers.items()))
    print(f"{'guidance':>8} {'adherence':>9} {'colour':>7} {'background':>10} {'motion':>7} {'shape':>7} {'s/clip':>8}")
    for report in reports:
        print(_row(report))
    if vae_ceiling:
        print(_row(vae_roundtrip(model, prompts, seed, device=device), label="vae"))
    if len(reports) == 2:
        print(f"guidance {guidance_scale:g} vs 1.0: adherence {reports[0].adherence - reports[1].adherence:+.1%}")
    if json_path is not None:
        record = [{"guidance_scale": r.guidance_scale, "steps": r.steps, "adherence": r.adherence,
                   "accuracy": r.accuracy, "seconds_per_clip": r.seconds_per_clip,
                   "clips": [dict(s.as_dict(), seed=seed + i) for i, s in enumerate(r.scores)]} for r in reports]
        Path(json_path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 1 if min_adherence is not None and reports[0].adherence < min_adherence else 0
