"""The speed levers on the embedded tiny model: time, DiT calls, PSNR against the exact path, and prompt adherence.

The embedded model is the one trained model here, so it is where a quality cost can be read as
more than PSNR: each held-out prompt's clip is scored for colour, background and motion
(`ditserve.tiny.score`), exactly as `ditserve eval-tiny` does. Every setting generates the same
prompts with the same seeds, the settings alternating prompt by prompt; PSNR is against the
first setting's clip of the same prompt; time is the median seconds per clip (on a CPU: FP8
products are emulated there, so read FP8's time on a GPU, bench/fp8.py).

A setting is `key=value` pairs joined by `;` (`cache`, `quantize`, `vae_dtype`, `attention_backend`, as
`Pipeline.from_pretrained` takes them), `off` for none, or a bare `--cache` value.

    python bench/levers.py --settings "off,0.1,uniform:3,quantize=fp8,vae_dtype=bf16,quantize=fp8;cache=0.1" \
        --steps 50 --markdown docs/performance.md
    python bench/levers.py --device cuda --settings "off,attention_backend=triton_fp8,quantize=fp8;attention_backend=triton_fp8"
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="off,0.1,uniform:3,quantize=fp8,vae_dtype=bf16",
                        help="comma-separated settings (see above); the first is the reference")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
    parser.add_argument("--device", default="cpu", help="cuda: every setting in bf16 there (FP8 attention needs a GPU)")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    from ditserve import Pipeline
    from ditserve.engine.step_cache import parse_step_cache
    from ditserve.tiny.data import held_out_scenes
    from ditserve.tiny.embedded import GENERATION, default_model_path
    from ditserve.tiny.score import score_clip

    g = GENERATION
    prompts = [s.prompt for s in held_out_scenes()][: args.limit]
    calls: list[int] = []
    request = dict(negative_prompt=g.negative_prompt, height=g.height, width=g.width, num_frames=g.num_frames,
                   num_inference_steps=args.steps, guidance_scale=g.guidance_scale)
    settings = args.settings.split(",")
    levers = {setting: _levers(setting) for setting in settings}
    pipes = {}  # one pipeline per set of load options; the step cache is set per generation
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    for options in levers.values():
        key = tuple(sorted((k, v) for k, v in options.items() if k != "cache"))
        if key not in pipes:
            pipe = Pipeline.from_pretrained(default_model_path(), device=args.device, dtype=dtype, **dict(key))
            predict = pipe.predict
            pipe.predict = lambda samples, interrupt=None, predict=predict: calls.append(1) or predict(samples, interrupt)
            pipe.generate(prompts[0], **dict(request, num_inference_steps=2), seed=0)  # warm-up
            pipes[key] = pipe
    pipe_for = {s: pipes[tuple(sorted((k, v) for k, v in o.items() if k != "cache"))] for s, o in levers.items()}
    clips = {s: [] for s in settings}
    seconds = {s: [] for s in settings}
    forwards = {s: [] for s in settings}
    for i, prompt in enumerate(prompts):  # settings alternate per prompt: a shared machine's load falls on all alike
        for setting in settings:
            pipe = pipe_for[setting]
            pipe.step_cache = parse_step_cache(levers[setting].get("cache"))
            calls.clear()
            start = time.perf_counter()
            clips[setting].append(pipe.generate(prompt, **request, seed=i).frames)
            seconds[setting].append(time.perf_counter() - start)
            forwards[setting].append(len(calls))
    reference = clips[settings[0]]
    rows = []
    for setting in settings:
        scores = [score_clip(p, c) for p, c in zip(prompts, clips[setting])]
        row = {"setting": setting, "dit_calls": statistics.mean(forwards[setting]),
               "seconds_per_clip": statistics.median(seconds[setting]),
               "psnr_db": statistics.mean(psnr(c, r) for c, r in zip(clips[setting], reference)),
               "max_err": max(float(np.abs(np.asarray(c, np.float64) - np.asarray(r, np.float64)).max())
                              for c, r in zip(clips[setting], reference)),
               "adherence": sum(s.adherent for s in scores) / len(scores)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    lines = [
        f"#### Speed levers on the embedded tiny model, {len(prompts)} held-out prompts, {args.steps} steps, "
        f"guidance {g.guidance_scale} — {datetime.date.today()}, "
        + (f"CPU ({torch.get_num_threads()} threads)" if args.device == "cpu" else torch.cuda.get_device_name()),
        "",
        f"Command: `python bench/levers.py {shown_args()}`. PSNR: mean over the prompts against the "
        f"`{base['setting']}` clip of the same prompt and seed; adherence: share of clips whose colour, background "
        "and motion match their prompt (`ditserve eval-tiny`'s score).",
        "",
        "| setting | DiT calls per clip | time vs first row | PSNR (dB) | max error | adherence | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shown = "–" if r is base else f"{r['psnr_db']:.1f}"
        worst = "–" if r is base else f"{r['max_err']:.3f}"
        lines.append(f"| {r['setting']} | {r['dit_calls']:.1f} of {args.steps} | "
                     f"{base['seconds_per_clip'] / r['seconds_per_clip']:.2f}x | {shown} | {worst} | {r['adherence']:.1%} | "
                     f"{(r['adherence'] - base['adherence']) * 100:+.1f} points |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


def _levers(setting: str) -> dict[str, str]:
    """`from_pretrained` lever arguments of one setting ("off", a bare --cache value, or key=value;key=value)."""
    from ditserve.ab import check_config

    if "=" not in setting:
        return {"cache": setting}
    pairs = dict(part.split("=", 1) for part in setting.split(";"))
    unknown = set(pairs) - {"cache", "quantize", "vae_dtype", "attention_backend"}
    if unknown:
        raise SystemExit(f"bench/levers.py: unknown lever(s) {sorted(unknown)} in {setting!r}; "
                         "use cache, quantize, vae_dtype, attention_backend")
    return {key: str(value) for key, value in check_config(pairs, f"setting {setting!r}").items()}


if __name__ == "__main__":
    sys.exit(main())
