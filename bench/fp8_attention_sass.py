"""FP8 attention's launch options compiled for a GPU architecture, on any machine (no GPU needed).

For each launch option of `bench/fp8_attention.py`: registers per thread, spills, shared memory,
how many tiles (thread blocks) fit one SM by registers and by shared memory, ptxas's performance
warnings, and the machine instructions of the kernel by kind (special-function exponentials,
FP32 multiply-adds, FP8 tensor-core products). It answers "can this launch run three tiles an SM"
before any device time is spent; speed itself is
`bench/fp8_attention.py`'s job on the GPU.

Needs Triton (`pip install triton==3.6.0`, the device's version); compiles through Triton's own
ptxas (`ditserve.kernels.fp8_attention.compile_only`) and reads the cubin with its nvdisasm.

    python bench/fp8_attention_sass.py [--arch 90] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fp8_attention import LAUNCH  # noqa: E402  (bench/fp8_attention.py)

# Hopper SM limits (H100/H200): 64K registers allocated per warp in units of 256, 228 KB of shared memory
# of which each block reserves 1 KB, at most 64 warps and 32 blocks
REGISTERS, REGISTER_UNIT, SHARED, SHARED_RESERVED, WARPS, BLOCKS = 65536, 256, 233472, 1024, 64, 32
INSTRUCTIONS = ("MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "QGMMA", "LDL", "STL")


def tiles_per_sm(registers: int, warps: int, shared: int) -> tuple[int, int]:
    """(by registers, by shared memory) for one SM."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = min(REGISTERS // (per_warp * warps), WARPS // warps, BLOCKS)
    return by_registers, SHARED // (shared + SHARED_RESERVED)


def inspect(compiled: object, arch: int, launch: dict) -> dict:
    """ptxas's report and the disassembly's instruction counts."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        report = subprocess.run([os.path.join(tools, "ptxas"), f"-arch=sm_{arch}a", "-v", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    by_registers, by_shared = tiles_per_sm(registers, launch["num_warps"], compiled.metadata.shared)
    warnings = sorted(set(re.findall(r"\((C\d+)\) Potential Performance Loss: ([^.;']+)", report)))
    return {"registers": registers, "spill_bytes": spills, "shared_kib": compiled.metadata.shared / 1024,
            "tiles_by_registers": by_registers, "tiles_by_shared": by_shared, "warnings": warnings,
            **{op: len(re.findall(rf"\b{re.escape(op)}\b", sass)) for op in INSTRUCTIONS}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench/fp8_attention_sass.py needs Triton: pip install triton==3.6.0", file=sys.stderr)
        return 2
    from ditserve.kernels.fp8_attention import compile_only

    print(f"sm_{args.arch}a, head_dim {args.head_dim}; counts are instructions in the kernel's code, not executed\n")
    print("| launch | registers | spills (B) | shared (KiB) | tiles an SM (registers, shared) | "
          + " | ".join(INSTRUCTIONS) + " | ptxas warnings |")
    print("|---|---|---|---|---|" + "---|" * len(INSTRUCTIONS) + "---|")
    for launch in LAUNCH:
        label = ", ".join(f"{k}={v}" for k, v in launch.items())
        try:
            r = inspect(compile_only(args.arch, args.head_dim, **launch), args.arch, launch)
        except Exception as err:  # noqa: BLE001 - a launch that does not compile is a result
            print(f"| {label} | {type(err).__name__}: {str(err)[:120]} |", flush=True)
            continue
        tiles = min(r["tiles_by_registers"], r["tiles_by_shared"])
        warn = "; ".join(f"{code}: {text.strip()}" for code, text in r["warnings"]) or "–"
        print(f"| {label} | {r['registers']} | {r['spill_bytes']} | {r['shared_kib']:.1f} | **{tiles}** "
              f"({r['tiles_by_registers']}, {r['tiles_by_shared']}) | "
              + " | ".join(str(r[op]) for op in INSTRUCTIONS) + f" | {warn} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
