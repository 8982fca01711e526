"""Step caching on the embedded tiny model: time, DiT calls, PSNR against the exact path, and prompt adherence.

The embedded model is the one trained model here, so it is where a quality cost can be read as
more than PSNR: each held-out prompt's clip is scored for colour, background and motion
(`ditserve.tiny.score`), exactly as `ditserve eval-tiny` does. Every setting generates the same
prompts with the same seeds, the settings alternating prompt by prompt; PSNR is against the
uncached clip of the same prompt; time is the median seconds per clip.

    python bench/step_cache.py --settings off,0.1,0.2,uniform:2,uniform:3 --steps 50 --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="off,0.1,0.2,uniform:2,uniform:3", help="--cache values; the first is the reference")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
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
    pipe = Pipeline.from_pretrained(default_model_path(), device="cpu", dtype="float32")
    calls: list[int] = []
    predict = pipe.predict
    pipe.predict = lambda samples, interrupt=None: calls.append(1) or predict(samples, interrupt)
    request = dict(negative_prompt=g.negative_prompt, height=g.height, width=g.width, num_frames=g.num_frames,
                   num_inference_steps=args.steps, guidance_scale=g.guidance_scale)
    pipe.generate(prompts[0], **dict(request, num_inference_steps=2), seed=0)  # warm-up
    settings = args.settings.split(",")
    clips = {s: [] for s in settings}
    seconds = {s: [] for s in settings}
    forwards = {s: [] for s in settings}
    for i, prompt in enumerate(prompts):  # settings alternate per prompt: a shared machine's load falls on all alike
        for setting in settings:
            pipe.step_cache = parse_step_cache(setting)
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
               "adherence": sum(s.adherent for s in scores) / len(scores)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    lines = [
        f"#### Step caching on the embedded tiny model, {len(prompts)} held-out prompts, {args.steps} steps, "
        f"guidance {g.guidance_scale} — {datetime.date.today()}, CPU ({torch.get_num_threads()} threads)",
        "",
        f"Command: `python bench/step_cache.py {shown_args()}`. PSNR: mean over the prompts against the "
        f"`{base['setting']}` clip of the same prompt and seed; adherence: share of clips whose colour, background "
        "and motion match their prompt (`ditserve eval-tiny`'s score).",
        "",
        "| --cache | DiT calls per clip | time vs first row | PSNR (dB) | adherence | change |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shown = "–" if r is base else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['setting']} | {r['dit_calls']:.1f} of {args.steps} | "
                     f"{base['seconds_per_clip'] / r['seconds_per_clip']:.2f}x | {shown} | {r['adherence']:.1%} | "
                     f"{(r['adherence'] - base['adherence']) * 100:+.1f} points |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
