"""`ditserve` command line: generate / bench-attention (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ditserve import __version__


def _bench_attention(args: argparse.Namespace) -> int:
    """Time every backend that can serve a few attention shapes on this device; print a table."""
    import statistics
    import time

    import torch

    from ditserve.attention import Attention, AttentionMetadata, AttentionSelector
    from ditserve.attention.backends import create_backends, describe_call
    from ditserve.attention.backends.reference import dense_attention_math

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [("dense self", [args.seq_len], None), ("dense cross", [args.seq_len], [77]), ("packed ragged", [args.seq_len // 2, args.seq_len // 4, 7, 1], None)]
    print(f"ditserve {__version__} attention on {device} ({args.dtype}), heads {args.heads}, head_dim {args.head_dim}")
    print(f"{'shape':<16}{'backend':<16}{'ms/call':>10}{'max err':>10}")
    for label, q_lens, k_lens in shapes:
        kl = k_lens or q_lens
        packed = label.startswith("packed")

        def rand(n):
            return torch.randn(n, args.heads, args.head_dim, device=device, dtype=dtype, generator=gen)

        if packed:
            q, k, v = rand(sum(q_lens)), rand(sum(kl)), rand(sum(kl))
            md = AttentionMetadata.from_lengths(q_lens, k_lens, device=device)
        else:
            q, k, v = rand(q_lens[0])[None], rand(kl[0])[None], rand(kl[0])[None]
            md = None
        ref_q = q[None, : min(64, q_lens[0])] if packed else q[:, :64]
        ref = dense_attention_math(ref_q.double(), (k[None, : kl[0]] if packed else k).double(), (v[None, : kl[0]] if packed else v).double(), args.head_dim**-0.5)
        call = describe_call(q, k, v, (md or AttentionMetadata.dense_for(q, k)).filled(q, k))
        names = [n for n, b in create_backends().items() if b.why_not(call, device) is None] + ["auto"]
        for name in names:
            layer = Attention(selector=AttentionSelector(name))
            out = layer(q, k, v, md)
            got = out[None, : ref_q.shape[1]] if packed else out[:, :64]
            err = (got.double() - ref).abs().max().item()
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                layer(q, k, v, md)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            chosen = f" -> {next(iter(layer.selector.choices.values()))}" if name == "auto" else ""
            print(f"{label:<16}{name + chosen:<16}{statistics.median(times):>10.3f}{err:>10.1e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description="Fast inference and serving for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"ditserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench-attention", help="time the attention backends available on a device")
    bench.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    bench.add_argument("--seq-len", type=int, default=1024)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=5)
    bench.set_defaults(func=_bench_attention)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
