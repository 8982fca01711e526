"""FP8 attention (ours, in Triton) against bf16 cuDNN attention at Wan's shapes: TFLOP/s and error, per launch.

For each shape: torch's cuDNN kernel in bf16 (the exact path `auto` takes there), then
`kernels.fp8_attention` with both products in FP8 over a few launch options (queries per tile, warps,
stages, tiles loaded by tensor descriptors, a register cap so that more tiles share an SM), and with
only q kᵀ in FP8 once; SageAttention 1 (a peer's Triton kernel: INT8 q kᵀ, fp16 P·V) where
`sageattention` is installed. Error = max |out - ref| / max |ref| and mean |out - ref| / mean |ref| on
the first 512 queries, against float32 math. CUDA events, median of --repeats.
`bench/fp8_attention_sass.py` compiles the same launch options without a GPU and shows their registers
and tiles an SM.

    python bench/fp8_attention.py [--shapes 1.3b,14b,14b-cross] [--markdown docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args  # noqa: E402  (bench/report.py)
from wan import time_ms  # noqa: E402  (bench/wan.py)

SHAPES = {  # name -> (heads, query tokens, key tokens, head_dim): Wan2.1 attention, one sample
    "1.3b": (12, 32760, 32760, 128),
    "14b": (40, 75600, 75600, 128),
    "14b-cross": (40, 75600, 512, 128),  # cross-attention to the 512 text tokens: pinned triton_fp8 runs it too
}
# fp8_attention's launch options per row; the first is its default on Hopper
LAUNCH = (
    dict(block_m=64, num_warps=4, num_stages=2, tma=True, max_registers=168),
    dict(block_m=64, num_warps=4, num_stages=3, tma=True, max_registers=None),
    dict(block_m=64, num_warps=4, num_stages=3, tma=True, max_registers=168),
    dict(block_m=64, num_warps=4, num_stages=2, tma=True, max_registers=160),
    dict(block_m=64, num_warps=4, num_stages=2, tma=True, max_registers=None),
    dict(block_m=128, num_warps=8, num_stages=3, tma=True, max_registers=None),
    dict(block_m=128, num_warps=4, num_stages=3, tma=False, max_registers=None),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.3b,14b,14b-cross")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/fp8_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from ditserve.attention.backends.reference import dense_attention_math
    from ditserve.attention.backends.sdpa import SdpaBackend
    from ditserve.attention.metadata import AttentionMetadata
    from ditserve.kernels.fp8_attention import fp8_attention

    try:
        from sageattention import sageattn
    except ImportError:
        sageattn = None
    cudnn = SdpaBackend("cudnn")
    rows = []
    for name in args.shapes.split(","):
        heads, tokens, keys, dim = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(1, keys, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        scale, flops = dim**-0.5, 4.0 * heads * tokens * keys * dim
        ref = dense_attention_math(q[:, :512].float(), k.float(), v.float(), scale, False)
        md = AttentionMetadata.dense_for(q, k)
        runs = {"bf16 cuDNN": lambda: cudnn.forward(q, k, v, md, scale)}
        runs["fp8 q·k only, default launch"] = lambda: fp8_attention(q, k, v, scale, fp8_pv=False)
        if sageattn is not None:  # a peer's quantized kernel where it installs: SageAttention 1 (Triton, INT8 q·k)
            runs["SageAttention 1.0.6: int8 q·k, fp16 p·v"] = lambda: sageattn(q, k, v, tensor_layout="NHD", sm_scale=scale)
        for launch in LAUNCH:
            label = (f"fp8 q·k + p·v, {launch['block_m']} queries, 128 keys, "
                     f"{launch['num_warps']} warps, "
                     f"{launch['num_stages']} stages{', tma' if launch['tma'] else ''}"
                     f"{', ≤ ' + str(launch['max_registers']) + ' registers' if launch.get('max_registers') else ''}")
            runs[label] = lambda launch=launch: fp8_attention(q, k, v, scale, **launch)
        for variant, run in runs.items():
            try:
                out = run()
                ms = time_ms(run, args.repeats, warmup=1)
            except Exception as err:  # noqa: BLE001 - a launch option that does not fit is a result
                print(f"{name} {variant}: {type(err).__name__}: {str(err)[:160]}", flush=True)
                continue
            err = (out[:, :512].float() - ref).abs()
            row = {"shape": name, "variant": variant, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                   "max_err": (err.max() / ref.abs().max()).item(), "mean_err": (err.mean() / ref.abs().mean()).item()}
            rows.append(row)
            print(row, flush=True)
            del out
    lines = [f"#### FP8 attention (ours) vs bf16 cuDNN, Wan2.1 self-attention shapes — {datetime.date.today()}, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             f"Command: `python bench/fp8_attention.py {shown_args()}`. Random inputs, one sample; errors on the first "
             "512 queries against float32 math.", "",
             "| shape | variant | ms | TFLOP/s | vs bf16 cuDNN | max err | mean err |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next((r for r in rows if r["shape"] == row["shape"] and r["variant"] == "bf16 cuDNN"), None)
        speed = "–" if base is None else f"{base['ms'] / row['ms']:.2f}x"
        lines.append(f"| {row['shape']} | {row['variant']} | {row['ms']:.1f} | {row['tflops']:.0f} | {speed} | "
                     f"{row['max_err']:.2e} | {row['mean_err']:.2e} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
