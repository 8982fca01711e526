"""`serve(...)`: run the app on uvicorn until SIGTERM/SIGINT, then shut down cleanly and exit 0.

Shutdown order on SIGTERM (or Ctrl-C): new job requests get 503 at once, queued jobs are
cancelled, the running jobs (the batch) are cancelled at the next denoising step boundary (we
cancel rather than finish them: a Wan step can take seconds and a whole video minutes, longer
than orchestrators wait), uvicorn stops accepting connections and finishes in-flight
responses, the engine is stopped, files of jobs that had already finished denoising are
written (atomically), and temporary files are removed. Finished files stay in --output-dir.

On several ranks, torchrun sends the same SIGTERM when a rank died: rank 0 then checks whether
one has (`ditserve.ranks`) and, if so, fails its unfinished jobs with `rank_failed`, answers 503
meanwhile, and exits 1 at once (`ServerState.ranks_lost`); the other ranks exit 1 too
(`ditserve.server.follow`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import uvicorn

from ditserve.distributed import ParallelLayout, build_groups, init_from_environment
from ditserve.engine.coordination import Leader
from ditserve.engine.errors import RanksLost
from ditserve.ranks import dead_ranks
from ditserve.server.app import create_app
from ditserve.server.settings import ServerSettings
from ditserve.server.state import ServerState
from ditserve.server.transport import uvicorn_config

__all__ = ["follow_rank_zero", "parallel_family", "serve", "warm_up"]

log = logging.getLogger("ditserve.server")


class _Server(uvicorn.Server):
    """uvicorn's server, draining our jobs first on a signal, and exiting 0 after a clean shutdown.

    (uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would
    die of the signal; a server that shut down as asked has succeeded.) `ranked`: rank 0 of
    several, where a signal may be torchrun's after a rank died (`lost` then says which).
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, ranked: bool = False) -> None:
        super().__init__(config)
        self._state = state
        self._ranked = ranked
        self.lost: RanksLost | None = None

    def ranks_lost(self, error: RanksLost) -> None:
        """A rank died: stop now (the state has failed the unfinished jobs); `serve` exits 1."""
        self.lost = error
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        ranks = dead_ranks() if self._ranked else []
        if ranks:  # torchrun stopping the survivors of a dead rank, not a shutdown asked for
            self.lost = self.lost or RanksLost(ranks)
            self._state.request_ranks_lost(self.lost)
            self.should_exit = True
            return
        self._state.request_shutdown()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        else:
            self.should_exit = True


def warm_up(pipeline: Any) -> float:
    """Every kind of batch the engine forms, once at two sizes or counts, one step each; seconds it took.

    The first generations pay one-off costs (CUDA and cuDNN initialisation, FlashAttention-4's JIT,
    `auto`'s attention trials) and, with `--compile`, a graph per kind of batch the blocks see: one
    request alone, several of one size (stacked), several sizes (packed). Each kind's second size or
    count makes dynamo's graph with dynamic sizes for it, so neither compile falls in a client's step.
    Sizes are the smallest with two tokens a side or more (a dimension of 1 would stay static);
    guidance and negative prompt are the model's defaults, so the CFG path warms.
    """
    spec = pipeline.request_spec
    height, width = spec.param("height"), spec.param("width")
    small = [max(param.minimum, 2 * param.multiple) for param in (height, width)]
    large = [min(size + param.multiple, param.maximum) for size, param in zip(small, (height, width))]
    start = time.perf_counter()
    for sizes in ([small], [large], [small] * 2, [large] * 3, [small, large], [small, large, large]):
        pipeline.generate_batch([dict(prompt="warm-up", height=h, width=w, num_frames=1, num_inference_steps=1, seed=i)
                                 for i, (h, w) in enumerate(sizes)])
    return time.perf_counter() - start


def parallel_family(pipeline: Any, groups: tuple[Any, Any]) -> Any:
    """The pipeline split over the rank grid: what the engine steps (every rank the same way)."""
    sample_group, sequence = groups
    pipeline.parallelize(sample_group=sample_group, sequence=sequence)
    if sample_group is None:
        return pipeline
    from ditserve.engine.parallel import SampleParallel

    return SampleParallel(pipeline, sample_group)


def follow_rank_zero(model: str | os.PathLike[str], load: dict[str, Any], groups: tuple[Any, Any]) -> int:
    """A rank other than 0: load the same model (`load`: `from_pretrained`'s options), then run every step
    rank 0's engine publishes."""
    from ditserve import Pipeline
    from ditserve.engine.coordination import Follower
    from ditserve.server.follow import follow

    pipeline = Pipeline.from_pretrained(model, **load)
    return follow(Follower(parallel_family(pipeline, groups)), torch.distributed.get_rank())


def serve(
    model: str | os.PathLike[str],
    settings: ServerSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 30000,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attention_backend: str | None = None,
    compile: bool = False,
    cache: str | None = None,
    vae_dtype: str | None = None,
    quantize: str | None = None,
    log_level: str = "info",
    sock: socket.socket | None = None,
    warm: bool = True,
    layout: ParallelLayout | None = None,
) -> int:
    """Serve the model folder at `model`; return the exit status (0 after a requested shutdown, 1 if loading failed;
    on several ranks, a rank that died exits the process with 1 at once).

    `cache`: step caching (`ditserve.engine.step_cache`; None: off). `vae_dtype`: None -> the family's.
    `quantize`: None or "fp8" (`Pipeline.from_pretrained`).
    `warm`: run `warm_up` after
    loading, before /health reports ready. `layout`: several ranks under
    torchrun (CFG x Ulysses x ring): rank 0 serves and leads every step, the others follow it
    (`ditserve.engine.coordination`) until it shuts down."""
    from ditserve.pipelines import read_request_spec
    from ditserve.pipelines.options import resolve_load_options, resolve_quantize

    # wrong paths and options fail now, before the port opens and the model loads
    spec = read_request_spec(Path(model))
    leader = groups = None
    if layout is not None and layout.world > 1:
        device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available()
                                                                             else "cpu")
        rank, rank_device = init_from_environment(layout, device_type)
        device = rank_device if rank_device is not None else device
        groups = build_groups(layout, rank)
        if rank != 0:
            return follow_rank_zero(model, dict(device=device, dtype=dtype, attention_backend=attention_backend,
                                       compile=compile, cache=cache, vae_dtype=vae_dtype, quantize=quantize), groups)
        leader, warm = Leader(), False  # a warm-up would run on rank 0 alone: the followers would wait
    device, dtype, attention_backend = resolve_load_options(device, dtype, attention_backend)
    resolve_quantize(quantize, device)

    def load():  # runs on a background thread after the port opens, so /health answers 503 meanwhile
        from ditserve import Pipeline

        pipeline = Pipeline.from_pretrained(model, device=device, dtype=dtype, attention_backend=attention_backend,
                                            compile=compile, cache=cache, vae_dtype=vae_dtype, quantize=quantize)
        if groups is not None:
            return parallel_family(pipeline, groups)
        if warm:
            log.info("warm-up (every kind of batch, one step each) took %.1f s", warm_up(pipeline))
        return pipeline

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: list[BaseException] = []
    server: _Server | None = None

    def on_load_failure(error: BaseException) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    if settings.api_keys:
        log.info("API keys: %d; every endpoint but /health needs one, and each key sees only its own jobs",
                 len(settings.api_keys))
    elif host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API keys on %s: anyone who can reach this port can generate, list and delete jobs "
                    "(see --api-key-file)", host)

    def on_ranks_lost(error: RanksLost) -> None:
        if server is not None:
            server.ranks_lost(error)

    app = create_app(load, settings, spec=spec, on_load_failure=on_load_failure, leader=leader,
                     on_ranks_lost=on_ranks_lost)
    config = uvicorn_config(app, settings, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout_s)),
                            access_log=log_level == "debug")
    server = _Server(config, app.state.ditserve, ranked=leader is not None)
    server.run(sockets=[sock] if sock is not None else None)
    if server.lost is not None:  # the engine's thread may be blocked for good in a collective with the dead rank
        log.error("exiting: %s", server.lost)
        logging.shutdown()
        os._exit(1)
    return 1 if failed or not server.started else 0
