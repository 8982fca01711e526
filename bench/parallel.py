"""One Wan generation on several GPUs: per-step time and scaling of each parallel layout, and PSNR vs one GPU.

Each layout (`SxQ`: CFG parallelism x Ulysses; `SxQr`: x ring; `SxUxR`: x Ulysses inside ring)
runs as its own `torchrun` of a
worker (this file with `--worker`), which builds the same random-weight pipeline on every rank
(published transformer config, a small UMT5, the Wan2.1 VAE; same seed, same weights), runs one
CFG generation and saves rank 0's frames and step times. The driver compares every layout with
the 1-GPU run of the same request.

    python bench/parallel.py --config 14b --layouts 1x1,2x1,1x2 --markdown docs/performance.md   # 2 GPUs
    python bench/parallel.py --config 14b --layouts 1x1,2x1,1x2,2x2,1x4,1x2x2 ...               # 4 GPUs
    python bench/parallel.py --config tiny --device cpu --layouts 1x1,2x1,1x2                    # CPU smoke run

A layout named twice runs twice (separate torchruns): the table says whether the second run's
frames are bit-identical to the first. `--out DIR` keeps each layout's result, so a long
comparison can be split over several invocations (a layout already in DIR is not run again).
The 1-step warm-up of each layout runs under torch's profiler: its NCCL kernel time is the
communication each step waits for (kernels that overlap compute included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "src")]
from report import psnr, publish, shown_args  # noqa: E402  (bench/report.py)
from wan import COMMON, SIZES, WAN_CONFIGS  # noqa: E402  (bench/wan.py)

SMALL_UMT5 = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=1024, num_layers=2, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def build_pipeline(config: str, device: torch.device):
    """The same random pipeline on every rank (seeded), or the tiny test folder's for `tiny`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from ditserve.models.wan import WanTransformer3DModel
    from ditserve.pipelines.wan import WanPipeline
    from helpers.checkpoints import build_tiny_t5_tokenizer, build_tiny_wan_pipeline

    if config == "tiny":
        import ditserve

        folder = Path(tempfile.gettempdir()) / "ditserve-parallel-tiny" / "pipeline"
        if not (folder / "model_index.json").exists():
            build_tiny_wan_pipeline(folder, seed=0)
        return ditserve.Pipeline.from_pretrained(folder, device=device, dtype="fp32")
    torch.manual_seed(0)
    tokenizer = build_tiny_t5_tokenizer()
    with torch.device(device):
        dit = WanTransformer3DModel(**{**COMMON, **WAN_CONFIGS[config]}).to(torch.bfloat16).eval()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **SMALL_UMT5)).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan().eval()
    scheduler = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0)
    return WanPipeline(transformers=[dit], text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                       new_scheduler=lambda: UniPCMultistepScheduler(**scheduler), device=device, dtype=torch.bfloat16)


def worker(args: argparse.Namespace) -> None:
    """One rank of one layout (under torchrun)."""
    from ditserve.distributed import ParallelLayout, build_groups, init_from_environment

    parts = args.layout.split("x")
    if len(parts) == 3:  # SxUxR: Ulysses inside ring
        layout = ParallelLayout(int(parts[0]), ulysses=int(parts[1]), ring=int(parts[2]))
    else:
        ring = parts[1].endswith("r")
        sequence = int(parts[1].rstrip("r"))
        layout = ParallelLayout(int(parts[0]), ulysses=1 if ring else sequence, ring=sequence if ring else 1)
    rank, device = 0, torch.device(args.device)
    if layout.world > 1:
        rank, rank_device = init_from_environment(layout, device.type)
        device = rank_device or device
    elif device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    pipe = build_pipeline(args.config, device)
    if layout.world > 1:
        sample_group, sequence = build_groups(layout, rank)
        pipe.parallelize(sample_group=sample_group, sequence=sequence)
    if args.compile:
        pipe.compile()  # the warm-up below compiles
    height, width, frames = (int(x) for x in args.size.split("x"))
    request = dict(prompt="a cat surfing a wave", negative_prompt="blurry", height=height, width=width,
                   num_frames=frames, num_inference_steps=args.steps, guidance_scale=5.0, seed=0)
    pipe.generate(**{**request, "num_inference_steps": 1})  # warm-up: kernels, the selector's trials
    communication_s = _profiled_communication(pipe, request, device) if layout.world > 1 else 0.0
    out = pipe.generate(**request)
    if rank == 0:
        np.save(Path(args.out) / f"{args.name}.npy", out.frames)
        (Path(args.out) / f"{args.name}.json").write_text(json.dumps({**out.timings, "nccl_per_step_s": communication_s}))


def _profiled_communication(pipe, request: dict, device: torch.device) -> float:
    """Seconds of NCCL kernels in one profiled step (on this rank; 0 off CUDA)."""
    if device.type != "cuda":
        return 0.0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.generate(**{**request, "num_inference_steps": 1})
    return sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower()) / 1e6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", *sorted(WAN_CONFIGS)], default="14b")
    parser.add_argument("--size", default=None, help="HEIGHTxWIDTHxFRAMES (default: the config's published size)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", default="1x1,2x1,1x2",
                        help="SAMPLESxSEQUENCE per run (SEQUENCE by Ulysses; with an 'r', e.g. 1x2r, by ring; "
                             "SAMPLESxULYSSESxRING for both, e.g. 1x2x2); the first is the baseline")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks on every rank (as --compile)")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="1x1", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder for each layout's frames and timings (kept; reused)")
    parser.add_argument("--name", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size is None:
        args.size = "32x48x9" if args.config == "tiny" else "x".join(str(v) for v in SIZES[args.config])
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ditserve-parallel-"))
    out.mkdir(parents=True, exist_ok=True)
    from ditserve.distributed import NO_MULTICAST_ENV  # NVLink multicast off, as `ditserve --num-gpus` sets it

    env = {**os.environ, "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **NO_MULTICAST_ENV}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    layouts = args.layouts.split(",")
    names = [layout if layouts[:i].count(layout) == 0 else f"{layout}.run{layouts[:i].count(layout) + 1}"
             for i, layout in enumerate(layouts)]
    for layout, name in zip(layouts, names):
        if (out / f"{name}.json").exists():
            print(f"layout {name}: kept from {out}", flush=True)
            continue
        ranks = math.prod(int(x.rstrip("r")) for x in layout.split("x"))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                   str(_free_port()), __file__, "--worker", "--layout", layout, "--name", name, "--out", str(out),
                   "--config", args.config, "--size", args.size, "--steps", str(args.steps), "--device", args.device,
                   *(["--compile"] if args.compile else [])]
        print(f"layout {name}: {ranks} rank(s)", flush=True)
        subprocess.run(command, env=env, check=True)
    base = layouts[0]
    reference = np.load(out / f"{base}.npy").astype(np.float64)
    rows = []
    for layout, name in zip(layouts, names):
        timings = json.loads((out / f"{name}.json").read_text())
        frames = np.load(out / f"{name}.npy")
        first = np.load(out / f"{layout}.npy")
        rows.append({"layout": name, "ranks": math.prod(int(x.rstrip("r")) for x in layout.split("x")),
                     "step_median_s": statistics.median(timings["per_step_s"]), "total_s": timings["total_s"],
                     "nccl_per_step_s": timings.get("nccl_per_step_s", 0.0),
                     "psnr_db": psnr(frames.astype(np.float64), reference),
                     "identical_to_first_run": None if name == layout else bool(np.array_equal(frames, first))})
    step_base = rows[0]["step_median_s"]
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    lines = [
        f"#### Wan {args.config} on several ranks, {args.size}, {args.steps} steps, CFG 5.0"
        f"{', compiled' if args.compile else ', eager'} — {datetime.date.today()}, "
        f"{device}",
        "",
        f"Command: `python bench/parallel.py {shown_args()}`. Layout SAMPLESxSEQUENCE: CFG parallelism x Ulysses ('r': ring); "
        f"one torchrun per layout; PSNR of rank 0's frames against layout {base}.",
        "",
        "| layout | ranks | step median (s) | scaling vs {base} | efficiency | NCCL kernels per step (s) | total (s) "
        "| PSNR vs {base} (dB) | bit-identical to its first run |".format(base=base),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = step_base / r["step_median_s"]
        same = {None: "", True: "yes", False: "no"}[r["identical_to_first_run"]]
        lines.append(f"| {r['layout']} | {r['ranks']} | {r['step_median_s']:.3f} | {speedup:.2f}x | "
                     f"{speedup / r['ranks']:.0%} | {r['nccl_per_step_s']:.3f} | {r['total_s']:.1f} | {r['psnr_db']:.1f} | {same} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
