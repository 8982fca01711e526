"""Attention backends side by side on one GPU: TFLOP/s per backend and for `auto`, per shape.

TFLOP/s = 4·Σ(H·Sq·Sk·D) / time (CUDA events, median of --repeats after a warm-up). Each
backend's bf16 output is checked against float32 math on a slice of queries (max error /
max |ref| <= 2e-2) before it is timed. Run on the GPU (flash-attn-4 installed for `fa4`):

    python bench/attention.py --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass

import torch

from ditserve.attention import Attention, AttentionMetadata, AttentionSelector
from ditserve.attention.backends import create_backends, describe_call
from ditserve.attention.backends.reference import dense_attention_math
from report import publish  # bench/report.py
from wan import time_ms  # bench/wan.py

SLOW = {"reference", "sdpa_math"}  # materialise Sq x Sk scores: out of reach at these sizes


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    head_dim: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...] | None = None  # None: self-attention
    packed: bool = False

    @property
    def flops(self) -> float:
        k_lens = self.k_lens or self.q_lens
        return 4.0 * self.heads * self.head_dim * sum(q * k for q, k in zip(self.q_lens, k_lens))


SHAPES = [
    Shape("Wan2.1-1.3B 480p x81f self (B1 H12 S32760 D128)", 12, 128, (32760,)),
    Shape("Wan2.1-14B 720p x81f self (B1 H40 S75600 D128)", 40, 128, (75600,)),
    Shape("Flux 1024^2 (B1 H24 S4608 D128)", 24, 128, (4608,)),
    Shape("head_dim 64 (B1 H16 S4096 D64)", 16, 64, (4096,)),
    Shape("cross-attention (H12 Sq32760 Sk512 D128)", 12, 128, (32760,), (512,)),
    Shape("packed 8000+6000+4000+2000 (H12 D128)", 12, 128, (8000, 6000, 4000, 2000), packed=True),
    # a FLUX serving step of 8 256x256 and 7 512x512 images (512 text tokens each): sizes interleaved, and
    # grouped as FLUX's packed layout orders them (per-sample attention: 15 calls, or one per size)
    Shape("FLUX pack 8x(256^2) + 7x(512^2) interleaved (H24 D128)", 24, 128, (768, 1536) * 7 + (768,), packed=True),
    Shape("FLUX pack 8x(256^2) + 7x(512^2) grouped (H24 D128)", 24, 128, (768,) * 8 + (1536,) * 7, packed=True),
]


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    k_lens = shape.k_lens or shape.q_lens

    def rand(n):
        return torch.randn(n, shape.heads, shape.head_dim, device=device, dtype=dtype, generator=gen)

    if shape.packed:
        q, k, v = rand(sum(shape.q_lens)), rand(sum(k_lens)), rand(sum(k_lens))
        md = AttentionMetadata.from_lengths(shape.q_lens, shape.k_lens, device=device)
    else:
        q, k, v = rand(shape.q_lens[0])[None], rand(k_lens[0])[None], rand(k_lens[0])[None]
        md = None
    return q, k, v, md


def check(out: torch.Tensor, q, k, v, shape: Shape) -> float:
    """max |out - ref| / max |ref| on the first 256 queries of each sample, float32 reference."""
    k_lens = shape.k_lens or shape.q_lens
    worst, q0, k0 = 0.0, 0, 0
    for nq, nk in zip(shape.q_lens, k_lens):
        n = min(nq, 256)
        if shape.packed:
            qs, ks, vs, os_ = q[None, q0 : q0 + n], k[None, k0 : k0 + nk], v[None, k0 : k0 + nk], out[None, q0 : q0 + n]
        else:
            qs, ks, vs, os_ = q[:, :n], k, v, out[:, :n]
        ref = dense_attention_math(qs.float(), ks.float(), vs.float(), shape.head_dim**-0.5)
        worst = max(worst, ((os_.float() - ref).abs().max() / ref.abs().max()).item())
        q0, k0 = q0 + nq, k0 + nk
    return worst


def run_shape(shape: Shape, device: torch.device, repeats: int) -> dict:
    q, k, v, md = make_inputs(shape, device, torch.bfloat16, seed=0)
    filled = (md or AttentionMetadata.dense_for(q, k)).filled(q, k)
    call = describe_call(q, k, v, filled)
    row: dict = {"shape": shape.name, "tflops": {}, "errors": {}, "skipped": {}}
    for name, backend in create_backends().items():
        reason = backend.why_not(call, device)
        if reason is None and name in SLOW:
            reason = "materialises the full score matrix"
        if reason is not None:
            row["skipped"][name] = reason
            continue
        layer = Attention(name)
        try:
            out = layer(q, k, v, md)
            row["errors"][name] = check(out, q, k, v, shape)
            ms = time_ms(lambda: layer(q, k, v, md), repeats, warmup=1)
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch here is a result
            row["skipped"][name] = f"failed: {str(err).splitlines()[0][:160]}"
            continue
        row["tflops"][name] = shape.flops / (ms * 1e-3) / 1e12
        del out
        torch.cuda.empty_cache()
    selector = AttentionSelector("auto")
    auto = Attention(selector=selector)
    out = auto(q, k, v, md)  # first call: the selector's timed trial for this shape bucket
    row["errors"]["auto"] = check(out, q, k, v, shape)
    ms = time_ms(lambda: auto(q, k, v, md), repeats, warmup=1)
    row["tflops"]["auto"] = shape.flops / (ms * 1e-3) / 1e12
    row["auto_choice"] = next(iter(selector.choices.values()))
    lossy = {n for n, b in create_backends().items() if b.capabilities.lossy}
    best = max(v for n, v in row["tflops"].items() if n != "auto" and n not in lossy)  # auto's choices are exact
    row["auto_vs_best"] = row["tflops"]["auto"] / best
    return row


def markdown(rows: list[dict], header: str) -> str:
    names = sorted({n for r in rows for n in r["tflops"] if n != "auto"})
    lines = [header, "", "| shape | " + " | ".join(names) + " | auto (choice) | auto / best |", "|---" * (len(names) + 3) + "|"]
    for r in rows:
        cells = [f"{r['tflops'][n]:.0f}" if n in r["tflops"] else "–" for n in names]
        lines.append(
            f"| {r['shape']} | " + " | ".join(cells) + f" | {r['tflops']['auto']:.0f} ({r['auto_choice']}) | {r['auto_vs_best']:.1%} |"
        )
    lossy = {n for n, b in create_backends().items() if b.capabilities.lossy}
    worst = max(e for r in rows for n, e in r["errors"].items() if n not in lossy)
    lines += ["", f"Worst bf16 error vs float32 math over all rows and exact backends: {worst:.2e} (limit 2e-2). '–': cannot "
              "serve the shape or not installed."]
    for name in sorted(lossy & {n for r in rows for n in r["errors"]}):
        errors = ", ".join(f"{r['errors'][name]:.2e}" for r in rows if name in r["errors"])
        lines.append(f"{name} (lossy, pinned only) error vs float32 math per row: {errors}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    parser.add_argument("--markdown", help="append a results section to this file")
    parser.add_argument("--json", help="write raw results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = []
    for shape in shapes:
        row = run_shape(shape, device, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = (
        f"### Attention backends, TFLOP/s (bf16) — {datetime.date.today()}, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}\n\nCommand: `python bench/attention.py --repeats {args.repeats}`"
    )
    publish(markdown(rows, header), rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
