"""Running one generation on several ranks: torchrun's environment -> process groups -> `Pipeline.parallelize`.

`ditserve generate/serve --num-gpus N` starts its N ranks itself (`launch`: torchrun underneath,
so a rank that dies stops the others); `--device cpu` makes them gloo processes, which is how the
whole multi-rank path is tested on machines without GPUs.

Under `torchrun --nproc_per_node N`, each process reads its rank from the environment, joins the
default group (NCCL on CUDA, gloo on the CPU) and takes GPU `LOCAL_RANK`. The N ranks form a grid
of `samples x sequence`: ranks `s * sequence ... (s + 1) * sequence - 1` share one sequence group
(Ulysses, ring, or both inside the DiT), and ranks with the same position in their sequence group
share one sample group (CFG parallelism). With both, a sequence group is a grid of ring x Ulysses:
neighbouring ranks form a Ulysses group (all-to-alls stay on the closest links) and the ranks at one
position in each Ulysses group form a ring. Every rank runs the same generation; rank 0 writes the
result.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from ditserve.attention.parallel import SequenceParallel

__all__ = ["NO_MULTICAST_ENV", "ParallelLayout", "build_groups", "default_layout", "init_from_environment", "launch"]

# NVLink multicast off in NCCL, PyTorch and NVSHMEM for every process that starts ranks: on shared hosts
# it can take GPUs out of service.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class ParallelLayout:
    """How many ranks divide each step's samples (CFG parallelism) and each forward's tokens: Ulysses
    (an all-to-all over heads; the heads must divide by its degree), ring (K/V passed round the
    ranks; any head count), or both (Ulysses inside each group of `ulysses` ranks, ring between them)."""

    samples: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name, flag in (("samples", "--cfg-parallel"), ("ulysses", "--ulysses-degree"), ("ring", "--ring-degree")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag} must be an int >= 1, got {value!r}")

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.samples * self.sequence

    def flags(self) -> list[str]:
        return ["--cfg-parallel", str(self.samples), "--ulysses-degree", str(self.ulysses), "--ring-degree",
                str(self.ring)]


def init_from_environment(layout: ParallelLayout, device_type: str) -> tuple[int, torch.device | None]:
    """Join torchrun's process group; (this rank, its device: `cuda:LOCAL_RANK` on CUDA, else None).

    Raises `ValueError` when not started by torchrun or when the world size is not the layout's.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ValueError(f"{layout.world} ranks are needed: start with `torchrun --nproc_per_node {layout.world} "
                         "-m ditserve ...`")
    world = int(os.environ["WORLD_SIZE"])
    if world != layout.world:
        raise ValueError(f"--cfg-parallel {layout.samples} x --ulysses-degree {layout.ulysses} x --ring-degree "
                         f"{layout.ring} = {layout.world} ranks, but torchrun started {world}")
    device = None
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), device


def build_groups(layout: ParallelLayout, rank: int) -> tuple[Any, SequenceParallel | None]:
    """(sample group, sequence layout) of `rank`, each None when its degree is 1. Every rank must call
    this, in the same order (creating a group is collective)."""
    from ditserve.attention.parallel import SequenceParallel

    seq, world = layout.sequence, layout.world
    sequence_groups = [dist.new_group(list(range(s * seq, (s + 1) * seq))) for s in range(layout.samples)]
    sample_groups = [dist.new_group(list(range(q, world, seq))) for q in range(seq)]
    sample_group = sample_groups[rank % seq] if layout.samples > 1 else None
    group = sequence_groups[rank // seq]
    if seq == 1:
        return sample_group, None
    if layout.ring == 1:
        return sample_group, SequenceParallel.ulysses(group)
    if layout.ulysses == 1:
        return sample_group, SequenceParallel.ring(group)
    u = layout.ulysses  # in sequence group s, rank s * seq + r * u + i is Ulysses rank i of ring rank r
    ulysses_groups = [dist.new_group(list(range(s * seq + r * u, s * seq + (r + 1) * u)))
                      for s in range(layout.samples) for r in range(layout.ring)]
    ring_groups = [dist.new_group(list(range(s * seq + i, (s + 1) * seq, u)))
                   for s in range(layout.samples) for i in range(u)]
    s, q = divmod(rank, seq)
    return sample_group, SequenceParallel.hybrid(ulysses_groups[s * layout.ring + q // u], ring_groups[s * u + q % u], group)


def default_layout(num_gpus: int, samples: int | None, ulysses: int | None, ring: int | None,
                   heads: int | None, cfg: bool = False) -> ParallelLayout:
    """The split of `num_gpus` ranks: what the user gave, the rest filled in. With nothing given and
    `cfg` (the model's default request runs classifier-free guidance), an even count first puts cond
    and uncond on two rank groups (CFG parallelism: no exchange inside a step, the best scaling
    measured on two GPUs); the ranks CFG parallelism leaves split the tokens, by Ulysses when the
    model's `heads` divide by them, else by ring. A clear error when the degrees cannot multiply to
    `num_gpus`."""
    if num_gpus < 1:
        raise ValueError(f"--num-gpus must be >= 1, got {num_gpus}")
    given = (samples or 1) * (ulysses or 1) * (ring or 1)
    if num_gpus % given:
        raise ValueError(f"--cfg-parallel {samples or 1} x --ulysses-degree {ulysses or 1} x --ring-degree "
                         f"{ring or 1} = {given} does not divide --num-gpus {num_gpus}")
    rest = num_gpus // given
    if rest > 1:
        if ulysses or ring:
            if samples:
                raise ValueError(f"--cfg-parallel x --ulysses-degree x --ring-degree = {given} must equal "
                                 f"--num-gpus {num_gpus}")
            samples = rest
            rest = 1
        elif cfg and not samples and rest % 2 == 0:
            samples, rest = 2, rest // 2
    if rest > 1:
        if heads is None or heads % rest == 0:
            ulysses = rest
        else:
            ring = rest
    return ParallelLayout(samples or 1, ulysses or 1, ring or 1)


def launch(argv: list[str], layout: ParallelLayout, device_type: str) -> int:
    """Run `ditserve <argv>` on `layout.world` ranks and wait; the exit status. NVLink multicast stays off: on
    shared hosts it can take GPUs out of service.

    torchrun (`ditserve.torchrun`) watches the ranks: one that dies has the others stopped at once (SIGTERM;
    a server on rank 0 then fails its unfinished jobs, answers 503 and exits 1), and the run ends with one
    line naming the dead rank and status 1. SIGTERM / SIGINT here go to rank 0 only: it shuts down cleanly
    and the others end with it."""
    import socket
    import subprocess
    import sys

    if device_type == "cuda" and torch.cuda.device_count() < layout.world:
        raise ValueError(f"--num-gpus {layout.world}: only {torch.cuda.device_count()} CUDA device(s) here")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **NO_MULTICAST_ENV}
    if device_type == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "ditserve.torchrun", f"ditserve {argv[0]}", "--nproc_per_node",
               str(layout.world), "--master_port", str(port), "-m", "ditserve", *argv, *layout.flags()]
    ranks = subprocess.Popen(command, env=env)

    def stop(signum: int, frame: Any) -> None:  # rank 0 shuts down cleanly and the others end with it
        _signal_rank_zero(ranks.pid, signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return ranks.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_rank_zero(launcher_pid: int, signum: int) -> None:
    """Send `signum` to the rank-0 worker of a torchrun (its children carry their rank in their environment)."""
    import psutil

    from ditserve.ranks import workers

    rank_zero = workers(launcher_pid).get(0)
    if rank_zero is not None:
        try:
            rank_zero.send_signal(signum)
        except psutil.Error:
            pass  # it has just exited
