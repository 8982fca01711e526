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
    from ditserve.kernels.fp8_rows import quantize_rows, quantize_rows_reference

    inductor = torch.compile(quantize_rows_reference, dynamic=False)
    rows = []
    for width, gelu in ROWS:
        x = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16)
        moved = x.numel() * 3  # bytes: 2 read, 1 written
        for variant, run in (("inductor", lambda: inductor(x, gelu)), ("ours", lambda: quantize_rows(x, gelu))):
            ms = time_ms(run, args.repeats, warmup=3)
            row = {"width": width, "gelu": gelu, "variant": variant, "ms": ms, "tb_s": moved / (ms * 1e-3) / 1e12}
            rows.append(row)
            print(row, flush=True)
        ours, theirs = quantize_rows(x, gelu), inductor(x, gelu)
        rows[-1]["scales_equal"] = bool(torch.equal(ours[1], theirs[1]))
        rows[-1]["values_max_step"] = int((ours[0].view(torch.uint8).int() - theirs[0].view(torch.uint8).int())
                                          .abs().max())
        print(rows[-1], flush=True)
    lines = [f"#### FP8 row quantization, inductor vs ours — {datetime.date.today()}, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}", "",
             f"Command: `python bench/fp8_rows.py {shown_args()}`. {args.tokens} rows of bf16 in, e4m3 and a float32 "
             "scale a row out; TB/s counts one read and one write.", "",
             "| row width | GELU first | inductor (ms) | ours (ms) | speedup | ours (TB/s) | largest difference (e4m3 steps) |",
             "|---|---|---|---|---|---|---|"]
    for theirs, ours in zip(rows[::2], rows[1::2]):
        lines.append(f"| {ours['width']} | {'yes' if ours['gelu'] else 'no'} | {theirs['ms']:.3f} | {ours['ms']:.3f} | "
                     f"{theirs['ms'] / ours['ms']:.2f}x | {ours['tb_s']:.2f} | {ours['values_max_step']} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
