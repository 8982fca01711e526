"""Per-row FP8 quantization of a linear layer's input: inductor's kernel vs ours, at Wan2.1-14B 720p rows.

Inductor's kernel is what `torch.compile` makes of the torch arithmetic (`quantize_rows_reference`,
with the FFN's tanh-GELU in front where the row is the FFN's hidden one); ours is
`kernels.fp8_rows` (one pass a row). Effective bandwidth counts one read of the bf16 rows and one
write of the e4m3 values. CUDA events, median of --repeats.

    python bench/fp8_rows.py [--tokens 75600] [--markdown docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args  # noqa: E402  (bench/report.py)
from wan import time_ms  # noqa: E402  (bench/wan.py)

ROWS = (  # (width, GELU first): a block's input and attention-output rows, the FFN's hidden rows
    (5120, False),
    (13824, True),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=75600)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/fp8_rows.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from ditserve.kernels.fp8_rows import FP8_DTYPE, quantize_rows, quantize_rows_reference, quantize_rows_triton

    inductor = torch.compile(quantize_rows_reference, dynamic=False)
    rows = []
    for width, gelu in ROWS:
        x = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(x.shape, dtype=FP8_DTYPE, device="cuda")
        scale = torch.empty(args.tokens, dtype=torch.float32, device="cuda")
        runs = {"inductor": lambda: inductor(x, gelu), "ours (default launch)": lambda: quantize_rows(x, gelu)}
        for warps in (4, 8, 16):
            runs[f"ours, {warps} warps"] = lambda warps=warps: quantize_rows_triton(x, out, scale, gelu, warps)
        base = None
        for variant, run in runs.items():
            ms = time_ms(run, args.repeats, warmup=3)
            base = base or ms
            row = {"width": width, "gelu": gelu, "variant": variant, "ms": ms,
                   "tb_s": x.numel() * 3 / (ms * 1e-3) / 1e12, "vs_inductor": base / ms}  # 2 bytes read, 1 written
            rows.append(row)
            print(row, flush=True)
        ours, theirs = quantize_rows(x, gelu), inductor(x, gelu)
        print({"width": width, "scales_equal": bool(torch.equal(ours[1], theirs[1])),
               "values_max_step": int((ours[0].view(torch.uint8).int() - theirs[0].view(torch.uint8).int()).abs().max())},
              flush=True)
    lines = [f"#### FP8 row quantization, inductor vs ours — {datetime.date.today()}, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}", "",
             f"Command: `python bench/fp8_rows.py {shown_args()}`. {args.tokens} rows of bf16 in, e4m3 and a float32 "
             "scale a row out; TB/s counts one read and one write.", "",
             "| row width | GELU first | variant | ms | TB/s | vs inductor |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['width']} | {'yes' if row['gelu'] else 'no'} | {row['variant']} | {row['ms']:.3f} | "
                     f"{row['tb_s']:.2f} | {row['vs_inductor']:.2f}x |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
