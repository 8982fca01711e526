"""Ways to compile the blocks (`compile_blocks`) side by side: what each costs the compiled forward, on one GPU.

A server's batches vary in size, so its compiled blocks see many shapes. Static graphs (torch's
default: the first shape static, later ones dynamic) or all-dynamic graphs (`dynamic=True`)? And the
attention call, a graph break inside nested calls (block -> attention layer -> backend), splits each
block into a graph per nesting level unless dynamo's `nested_graph_breaks` resumes inside the inner
frame (`nested`: two graphs a block, one each side of the attention call, instead of five or six).
Per mode, in a process of its own (a clean compile cache), random weights from the published
configs, bf16: the FLUX.1-dev forward at 1024x1024, a packed FLUX forward of 1024+768+512+256 px
and of 1024+1024+512 px (`forward_packed`), the Wan2.1-1.3B forward at 480x832x81 (batch 1 and
the CFG pair), and the first call of each FLUX layout (compile time included). CUDA events,
median of --repeats after warm-up.

    python bench/compile_shapes.py [--markdown docs/performance.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from flux import FLUX_DEV, TEXT_LEN, forward_inputs  # noqa: E402  (bench/flux.py)
from report import publish, shown_args  # noqa: E402  (bench/report.py)
from wan import COMMON, WAN_CONFIGS, time_ms  # noqa: E402  (bench/wan.py)

MODES = {  # mode -> (compile_blocks' `dynamic`, torch._dynamo.config values set in the mode's process)
    "static": (None, {}),
    "dynamic": (True, {}),
    "nested": (None, {"nested_graph_breaks": True}),
}
COLUMNS = ("flux_graphs", "flux_first_s", "flux_1024_ms", "packed_first_s", "packed_4_sizes_ms", "packed_3_ms", "wan_1_3b_ms",
           "wan_1_3b_cfg_ms")


def flux_sample(side: int, device: torch.device):
    """One FLUX.1-dev sample of a packed forward: `side` x `side` pixels, 512 T5 tokens (bench/flux.py's inputs)."""
    from ditserve.models.flux import FluxSample

    inputs = forward_inputs(side // 16, device)
    return FluxSample(latents=inputs["hidden_states"][0], text=inputs["encoder_hidden_states"][0],
                      pooled=inputs["pooled_projections"][0], timestep=inputs["timestep"][0], img_ids=inputs["img_ids"],
                      txt_ids=inputs["txt_ids"], guidance=inputs["guidance"][0])


def our_flux_dev(device: torch.device):
    """Our FLUX.1-dev transformer alone, random weights (seed 0), bf16, on `device`."""
    from ditserve.models.flux import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        return FluxTransformer2DModel.from_config(dict(FLUX_DEV)).to(torch.bfloat16).eval()


def first_call_s(fn) -> float:
    began = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - began


def flux_columns(device: torch.device, dynamic: bool | None, repeats: int) -> dict:
    """The FLUX.1-dev columns: dense 1024x1024 and two packs, first calls and medians."""
    model = our_flux_dev(device)
    model.compile_blocks(dynamic=dynamic)
    dense = forward_inputs(64, device)
    four = [flux_sample(side, device) for side in (1024, 768, 512, 256)]
    three = [flux_sample(side, device) for side in (1024, 1024, 512)]
    with torch.inference_mode():
        return {"flux_first_s": first_call_s(lambda: model(**dense)),
                "flux_1024_ms": time_ms(lambda: model(**dense), repeats),
                "packed_first_s": first_call_s(lambda: model.forward_packed(four)),
                "packed_4_sizes_ms": time_ms(lambda: model.forward_packed(four), repeats),
                "packed_3_ms": time_ms(lambda: model.forward_packed(three), repeats),
                "flux_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def wan_columns(device: torch.device, dynamic: bool | None, repeats: int) -> dict:
    """The Wan2.1-1.3B columns: one sample and the CFG pair at 480x832x81."""
    from ditserve.models.wan import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**COMMON, **WAN_CONFIGS["1.3b"]).to(torch.bfloat16).eval()
    model.fuse_qkv_projections()
    model.compile_blocks(dynamic=dynamic)
    latents = torch.randn(2, 16, 21, 60, 104, device=device, dtype=torch.bfloat16)
    text = torch.randn(2, TEXT_LEN, 4096, device=device, dtype=torch.bfloat16)
    timestep = torch.tensor([999.0, 999.0], device=device)
    with torch.inference_mode():
        return {"wan_1_3b_ms": time_ms(lambda: model(latents[:1], timestep[:1], text[:1], return_dict=False), repeats, 3),
                "wan_1_3b_cfg_ms": time_ms(lambda: model(latents, timestep, text, return_dict=False), repeats, 3)}


def measure(mode: str, repeats: int) -> dict:
    """This process's row: every column for one compile mode (each model freed before the next)."""
    device, (dynamic, config) = torch.device("cuda"), MODES[mode]
    for name, value in config.items():
        setattr(torch._dynamo.config, name, value)
    row = {"mode": mode, **flux_columns(device, dynamic, repeats)}
    torch.cuda.empty_cache()
    return {**row, **wan_columns(device, dynamic, repeats)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="static,nested", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this mode, print JSON
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    if not torch.cuda.is_available():
        print("bench/compile_shapes.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return 0
    rows = []
    for mode in modes:
        child = subprocess.run([sys.executable, __file__, "--one", mode, "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name()
    lines = [f"#### `compile_blocks` modes side by side — {datetime.date.today()}, {device}, torch {torch.__version__}",
             "", f"Command: `python bench/compile_shapes.py {shown_args()}`. Random weights (published configs), bf16; "
             "each mode in its own process; first calls include compiling.", "",
             "| mode | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    cell = {"s": "{:.2f}", "ms": "{:.1f}", "graphs": "{}"}
    lines += [f"| {r['mode']} | " + " | ".join(cell[c.rsplit("_", 1)[1]].format(r[c]) for c in COLUMNS)
              + " |" for r in rows]
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
