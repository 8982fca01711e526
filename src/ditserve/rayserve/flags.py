"""`ditserve serve --ray` flags (plain argparse: adding them imports no Ray)."""

from __future__ import annotations

import argparse
import math

from ditserve.rayserve.options import RayOptions

__all__ = ["add_ray_flags", "ray_options"]


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that place `ditserve serve` on Ray Serve, in their own group of `serve --help`."""
    group = parser.add_argument_group("Ray Serve (many replicas behind one endpoint; pip install 'ditserve[ray]')")
    group.add_argument("--ray", action="store_true",
                       help="serve with replicas on Ray Serve: one pipeline and batching engine per replica, jobs "
                            "routed by queue length, a shared job store (needs --output-dir on several hosts)")
    group.add_argument("--replicas", type=int, default=None,
                       help="generator replicas (fixed; with --min/--max-replicas: the number to start with)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (default: --replicas)")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas (default: --replicas)")
    group.add_argument("--target-jobs-per-replica", type=float, default=4.0,
                       help="autoscaling: jobs in flight per replica (queued or in its batch) to aim for (default: 4)")
    group.add_argument("--replica-gpus", type=float, default=None,
                       help="GPUs each replica reserves (default: 1 when the model runs on CUDA, else 0)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPU cores each replica reserves (default: 1)")
    group.add_argument("--replica-threads", type=int, default=None,
                       help="torch threads per replica (default: --replica-cpus)")
    group.add_argument("--ingress-replicas", type=int, default=1,
                       help="HTTP front replicas (stateless: any answers for any job) (default: 1)")
    group.add_argument("--max-attempts", type=int, default=2,
                       help="runs of a job before its replica's death fails it (default: 2: re-queued once)")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster ('auto' for the one `ray start` began here) (default: start a "
                            "local one)")
    group.add_argument("--app-name", default="ditserve", help="Serve application name (default: ditserve)")
    group.add_argument("--upscale-delay", type=float, default=5.0, help="autoscaling: seconds before adding (default: 5)")
    group.add_argument("--downscale-delay", type=float, default=60.0,
                       help="autoscaling: seconds of low load before removing a replica (default: 60)")
    group.add_argument("--drain-timeout", type=float, default=120.0,
                       help="seconds a replica being removed may finish its jobs; the rest are re-queued (default: 120)")


def ray_options(args: argparse.Namespace, device: str | None, ranks: tuple[int, int, int] = (1, 1, 1)) -> RayOptions:
    """The options the flags give; ValueError naming the flag for a bad one. `device`: the model's (for the
    default of --replica-gpus: one GPU per replica on CUDA, one per rank with several); `ranks`: each
    replica's (CFG, Ulysses, ring) split of --num-gpus."""
    fixed = args.replicas if args.replicas is not None else 1
    low = args.min_replicas if args.min_replicas is not None else min(fixed, args.max_replicas or fixed)
    high = args.max_replicas if args.max_replicas is not None else max(fixed, low)
    gpus = args.replica_gpus
    if gpus is None:
        gpus = float(math.prod(ranks)) if (device or _default_device()).startswith("cuda") else 0.0
    return RayOptions(replicas=args.replicas, min_replicas=low, max_replicas=high,
                      target_jobs=args.target_jobs_per_replica, gpus=gpus, cpus=args.replica_cpus,
                      threads=args.replica_threads, ingress_replicas=args.ingress_replicas,
                      max_attempts=args.max_attempts, address=args.ray_address, app_name=args.app_name,
                      upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
                      drain_timeout_s=args.drain_timeout, ranks=ranks)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
