"""VAE decodes of finished requests on a worker thread (and CUDA stream) of their own.

Decoding between two denoising steps would stall every other request in the batch for as
long as the VAE takes, which for a long video is worth several steps (docs/performance.md).
The batching engine instead hands the clean latents of a finished request to a
`Decoder` and goes on stepping: the worker waits for the step that produced them (a CUDA
event, not a host sync), decodes on its own stream, and calls back with the frames.

Requests with latents of one shape that are waiting together are decoded in one VAE call
(up to `max_batch_latent_pixels` latent pixels per frame in all): a single-frame decode is
mostly launch overhead, so eight of them cost little more than one. If a batched decode
fails (say, out of memory), each of its requests is retried alone, so batching never fails a
request that decodes on its own. The VAE is used by this
one thread only (diffusers' Wan VAE keeps a feature cache on the module: not reentrant).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_MAX_BATCH_LATENT_PIXELS", "DecodeDone", "Decoder"]

log = logging.getLogger("ditserve.engine")

DEFAULT_MAX_BATCH_LATENT_PIXELS = 4 * 60 * 104  # four 480x832 frames at a time (Wan VAE: 8x spatial)

# (frames or None, error or None, decode start, decode end) -> None; runs on the worker thread
DecodeDone = Callable[[np.ndarray | None, BaseException | None, float, float], None]


@dataclass(eq=False)
class _Job:
    latents: Tensor  # [1, C, F, H, W]
    ready: torch.cuda.Event | None  # recorded after the step that produced the latents
    done: DecodeDone


class Decoder:
    """One worker thread that decodes latents in submission order, batching equal shapes.

    `decode_batch(latents [B, C, F, H, W]) -> B frame arrays` is the pipeline's VAE stage.
    """

    def __init__(
        self,
        decode_batch: Callable[[Tensor], list[np.ndarray]],
        *,
        max_batch_latent_pixels: int = DEFAULT_MAX_BATCH_LATENT_PIXELS,
    ) -> None:
        if max_batch_latent_pixels < 1:
            raise ValueError(f"max_batch_latent_pixels must be >= 1, got {max_batch_latent_pixels}")
        self._decode_batch = decode_batch
        self.max_batch_latent_pixels = max_batch_latent_pixels
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._pending = 0  # submitted, callback not yet returned
        self._thread: threading.Thread | None = None
        self._stream: torch.cuda.Stream | None = None
        self._closed = False

    def submit_all(self, items: list[tuple[Tensor, DecodeDone]]) -> None:
        """Queue latents `[1, C, ...]` (from the calling thread's current stream) with their callbacks;
        several at once, so that those of one shape can share a VAE call."""
        if not items:
            return
        jobs = []
        for latents, done in items:
            ready = None
            if latents.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
            jobs.append(_Job(latents, ready, done))
        with self._cond:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._jobs.extend(jobs)
            self._pending += len(jobs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ditserve-decode", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return self._pending

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted decode has called back; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Take no more latents; the worker thread decodes what is queued, then ends (joined
        here unless called from it). Without it the thread, and through `decode_batch` the
        whole pipeline, would live as long as the process."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the worker --------------------------------------------------------------------------

    def _next_group(self) -> list[_Job] | None:
        """The oldest job and the queued jobs of its shape, within the pixel bound; None once
        closed and drained."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._jobs) or self._closed)
            if not self._jobs:
                return None
            head = self._jobs.popleft()
            shape = head.latents.shape
            room = max(1, self.max_batch_latent_pixels // (shape[-1] * shape[-2])) - 1
            group = [head]
            for job in list(self._jobs):
                if room == 0:
                    break
                if job.latents.shape == shape and job.latents.device == head.latents.device:
                    self._jobs.remove(job)
                    group.append(job)
                    room -= 1
            return group

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            start = time.perf_counter()
            try:
                results = [(frames, None) for frames in self._decode(group)]
            except Exception as e:
                if len(group) == 1:  # a failed decode fails its request, not the worker
                    results = [(None, e)]
                else:  # e.g. out of memory for the batch: each request gets its own chance
                    results = [self._decode_alone(job) for job in group]
            end = time.perf_counter()
            for job, (frames, error) in zip(group, results):
                try:
                    job.done(frames, error, start, end)
                except Exception:
                    log.exception("decode callback failed")
            with self._cond:
                self._pending -= len(group)
                self._cond.notify_all()

    def _decode_alone(self, job: _Job) -> tuple[np.ndarray | None, BaseException | None]:
        try:
            return self._decode([job])[0], None
        except Exception as e:
            return None, e

    @torch.no_grad()  # grad mode is per thread: this one starts with it on
    def _decode(self, group: list[_Job]) -> list[np.ndarray]:
        on_stream: AbstractContextManager[Any] = nullcontext()
        if group[0].latents.is_cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(group[0].latents.device)
            for job in group:
                self._stream.wait_event(job.ready)
            on_stream = torch.cuda.stream(self._stream)
        with on_stream:
            return self._decode_batch(torch.cat([job.latents for job in group]))
