"""Continuous batching: every active request advances one denoising step in ONE packed DiT forward.

Each request keeps everything that makes its result its own: latents, a fresh scheduler
(its own timesteps and solver history), step count, guidance scale, negative prompt and
seed. At every step boundary the engine

1. drops requests whose cancel token is set (queued or active; they get `GenerationCancelled`),
2. admits queued requests by the policy in `ditserve.engine.policy` (FIFO within a token
   budget, bounded bypass); an admitted request's text is encoded and its noise drawn
   exactly as in `Pipeline.generate`, so it does not matter when it joins,
3. runs one `predict_packed` over the samples of all active requests (a guided request is
   two samples, cond and uncond; guidance 1.0 is one), each with its own timestep and text,
   then steps each request's scheduler with its own guidance combination,
4. decodes every request that just did its last step, right away, between two forwards (so
   the VAE never runs inside the batched forward, and a finished request does not wait for
   the others), and resolves its future; its timings are `generate`'s plus `queue_s`.

Admission (`ditserve.engine.policy`): FIFO. The oldest queued request joins as soon as it
fits (the step's tokens, cond and uncond samples counted, stay within `max_batch_tokens`,
and the batch holds fewer than `max_batch_size` requests); a request bigger than the whole
budget joins only an empty batch and runs alone. A later request may pass a head that does
not fit only if it fits now and leaves before the step at which the head will fit (which is
known: every request leaves after its own step count), so a bypass never makes the head
join later than that reserved step. No request starves: the batch drains in bounded steps,
and once a request is the head nothing can delay it past its reservation. The default budget (`ditserve.engine.budget`)
is half the free device memory divided by an activation estimate per token.

Samples never attend to each other: that is the packed forward's attention metadata.
Because a request's math does not depend on its neighbours, its result batched equals its
result alone (to float rounding of the packed vs dense layout).

Driving it: either synchronously (`run_until_idle()`: step until nothing is queued or
active, what `Pipeline.generate_batch` does) or in the background (`start()` runs
`run_forever()` on a daemon thread until `stop()`; what a server does). Stepping is
serialised by a lock, so only one thread steps at a time; `submit`, `stats`, `close` and
`stop` may be called from any thread.

Failures stay per request where they can: a cancel, text encoding, a callback or the
decode end only their own request; an error in the batched forward itself (e.g. out of
memory) fails every request in that forward, since it cannot be pinned on one of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ditserve.engine.policy import Slot, plan_admission
from ditserve.engine.validation import GenerationRequest
from ditserve.pipelines.denoise import CancelToken, StepCallback, combine_guidance, start_schedule
from ditserve.pipelines.errors import GenerationCancelled
from ditserve.pipelines.result import GenerationOutput
from ditserve.pipelines.timing import StepTimer, synchronize

__all__ = ["BatchStages", "BatchingEngine", "EngineClosed", "EngineStats", "StepStats"]

log = logging.getLogger("ditserve.engine")


class EngineClosed(RuntimeError):
    """`submit` after `close` / `stop`: the engine takes no new requests."""


class BatchStages(Protocol):
    """What the engine needs from a pipeline (`WanPipeline` provides it): its shared stages."""

    device: torch.device

    def tokens_per_sample(self, request: GenerationRequest) -> int:
        """Tokens one sample of this request adds to a DiT forward."""

    def default_max_batch_tokens(self) -> int:
        """The token budget to use when none is given (see `ditserve.engine.budget`)."""

    def encode_text(self, request: GenerationRequest, guided: bool) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond or None) embeddings `[1, L, text_dim]`."""

    def initial_latents(self, request: GenerationRequest) -> Tensor:
        """The seeded starting noise `[1, C, F, H, W]` (float32), as the single-request path draws it."""

    def new_scheduler(self) -> Any:
        """A fresh diffusers scheduler."""

    def predict_packed(self, latents: list[Tensor], timesteps: Tensor, text: list[Tensor]) -> list[Tensor]:
        """One DiT forward over samples `[C, F_i, H_i, W_i]` with timesteps `[N]`, text `[L_i, D]`."""

    def decode(self, latents: Tensor) -> np.ndarray:
        """Clean latents -> frames (F, H, W, 3) float32 in [0, 1] on the host."""


@dataclass(frozen=True)
class StepStats:
    """One batched forward: how many requests, samples and tokens it held, and requests waiting."""

    requests: int
    samples: int
    tokens: int
    queued: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics.

    queued / active: requests waiting / in the batch (the current batch size); active_tokens:
    tokens the next step will hold; steps: batched forwards so far; completed: requests
    resolved with an output; last_step: the latest forward (its requests and tokens per
    step), None before the first; max_batch_tokens / max_batch_size: the limits in force.
    """

    queued: int
    active: int
    active_tokens: int
    steps: int
    completed: int
    last_step: StepStats | None
    max_batch_tokens: int
    max_batch_size: int | None


@dataclass(eq=False)
class _Queued:
    request: GenerationRequest
    future: Future[GenerationOutput]
    callback: StepCallback | None
    cancel: CancelToken | None
    tokens: int
    submitted_at: float


@dataclass(eq=False)
class _Active:
    """A request in the batch: its own latents, scheduler and position in its own schedule."""

    queued: _Queued
    guided: bool
    cond: Tensor  # [L, D]
    uncond: Tensor | None
    latents: Tensor  # [1, C, F, H, W] float32
    scheduler: Any
    timesteps: Tensor
    timer: StepTimer  # marks: admitted, text encoded, each step done
    admitted_at: float
    step: int = 0
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = len(self.timesteps)

    @property
    def remaining(self) -> int:
        return self.total - self.step


def _cancelled(token: CancelToken | None) -> bool:
    return token is not None and token.is_set()


class BatchingEngine:
    """Runs many generation requests at once, one packed DiT forward per step (see the module doc).

    `max_batch_tokens`: tokens (all samples, see `ditserve.engine.budget`) one step may hold;
    None = `stages.default_max_batch_tokens()`. A request bigger than that runs alone.
    `max_batch_size`: most requests in one step (None: no limit; 1: one at a time).
    `backfill`: let a later request pass a head that does not fit, if it leaves before the
    head's reserved step (see `ditserve.engine.policy`). `on_step(StepStats)` runs on the
    stepping thread after every batched forward (metrics); its errors are logged, not raised.
    """

    def __init__(
        self,
        stages: BatchStages,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        backfill: bool = True,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        budget = stages.default_max_batch_tokens() if max_batch_tokens is None else max_batch_tokens
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_batch_tokens must be a positive int, got {budget!r}")
        if max_batch_size is not None and (
            not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1
        ):
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        self._stages = stages
        self.max_batch_tokens = budget
        self.max_batch_size = max_batch_size
        self.backfill = backfill
        self._on_step = on_step
        self._cond = threading.Condition()  # guards everything below it
        self._queue: deque[_Queued] = deque()
        self._active: list[_Active] = []  # changed only by the stepping thread, under _cond
        self._closed = False
        self._aborting = False  # close(cancel=True): end active requests at the next boundary
        self._steps = 0
        self._completed = 0
        self._last_step: StepStats | None = None
        self._stepping = threading.Lock()  # one stepping thread at a time
        self._thread: threading.Thread | None = None

    # -- any thread --------------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> Future[GenerationOutput]:
        """Queue a validated request; returns at once with a future of its `GenerationOutput`.

        The future raises `GenerationCancelled` if `cancel` was set before its last step (or
        the future was cancelled while queued), else whatever failed its generation.
        `callback(i, total)` runs on the stepping thread after its step i (0-based).
        Raises `EngineClosed` after `close` / `stop`.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit takes a validated GenerationRequest (Pipeline.validate), got {type(request).__name__}")
        guided = request.guidance_scale > 1.0  # diffusers' do_classifier_free_guidance
        tokens = self._stages.tokens_per_sample(request) * (2 if guided else 1)
        future: Future[GenerationOutput] = Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the batching engine is closed and takes no new requests")
            self._queue.append(_Queued(request, future, callback, cancel, tokens, time.perf_counter()))
            self._cond.notify_all()
        return future

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                queued=len(self._queue),
                active=len(self._active),
                active_tokens=sum(state.queued.tokens for state in self._active),
                steps=self._steps,
                completed=self._completed,
                last_step=self._last_step,
                max_batch_tokens=self.max_batch_tokens,
                max_batch_size=self.max_batch_size,
            )

    def close(self, *, cancel: bool = False) -> None:
        """Take no new requests (idempotent). `run_forever` returns once nothing is left.

        cancel=False: queued and active requests still run to the end. cancel=True: queued
        requests fail with `GenerationCancelled` now, active ones at the next step boundary.
        """
        with self._cond:
            self._closed = True
            dropped: list[_Queued] = []
            if cancel:
                self._aborting = True
                dropped = list(self._queue)
                self._queue.clear()
            self._cond.notify_all()
        for q in dropped:
            _fail_cancelled(q, 0, q.request.num_inference_steps)

    def start(self) -> None:
        """Run `run_forever` on a daemon thread (a server's engine); stop it with `stop`."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the batching engine was already started")
            self._thread = threading.Thread(target=self.run_forever, name="ditserve-batching", daemon=True)
        self._thread.start()

    def stop(self, *, cancel: bool = False, timeout: float | None = None) -> bool:
        """`close(cancel=cancel)`, then wait for the thread `start` began; True if it has ended."""
        self.close(cancel=cancel)
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- the stepping thread -----------------------------------------------------------------

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._queue or self._active)

    def step(self) -> bool:
        """One step boundary and one batched forward; True while requests remain.

        An unexpected error here (a bug, not a request's failure) fails the active requests
        and is raised; queued requests stay queued.
        """
        with self._stepping, torch.no_grad():
            try:
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._forward()
                    self._retire()
            except BaseException as e:
                self._fail_active(e)
                raise
        return self.has_work()

    def run_until_idle(self) -> None:
        """Step until nothing is queued or active (a synchronous batch, e.g. `generate_batch`)."""
        while self.step():
            pass

    def run_forever(self) -> None:
        """Serve until `close()` and drained: wait for requests, step while there are any.

        An unexpected error in a step is logged (it already failed the active requests) and
        serving goes on.
        """
        while True:
            with self._cond:
                while not (self._queue or self._active or self._closed):
                    self._cond.wait()
                if self._closed and not (self._queue or self._active):
                    return
            try:
                self.step()
            except Exception:
                log.exception("batching engine step failed; its active requests were failed")

    # -- step pieces ---------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        with self._cond:
            queued = [q for q in self._queue if _cancelled(q.cancel) or q.future.cancelled()]
            active = [a for a in self._active if self._aborting or _cancelled(a.queued.cancel)]
            for q in queued:
                self._queue.remove(q)
            for a in active:
                self._active.remove(a)
        for q in queued:
            _fail_cancelled(q, 0, q.request.num_inference_steps)
        for a in active:
            _fail_cancelled(a.queued, a.step, a.total)

    def _admit(self) -> None:
        with self._cond:
            active = [Slot(a.queued.tokens, a.remaining) for a in self._active]
            waiting = [Slot(q.tokens, q.request.num_inference_steps) for q in self._queue]
            chosen = plan_admission(active, waiting, self.max_batch_tokens, self.max_batch_size, backfill=self.backfill)
            joining = [self._queue[i] for i in chosen]
            for q in joining:
                self._queue.remove(q)
        for q in joining:
            if not q.future.set_running_or_notify_cancel():
                continue  # cancelled through its future while it waited
            try:
                state = self._start(q)
            except Exception as e:  # this request's text or noise failed; the batch goes on
                q.future.set_exception(e)
                continue
            with self._cond:
                self._active.append(state)

    def _start(self, q: _Queued) -> _Active:
        """Encode text, draw noise, set up a fresh scheduler: what `generate` does before step 0."""
        stages = self._stages
        admitted_at = time.perf_counter()
        timer = StepTimer(stages.device)
        timer.start()
        guided = q.request.guidance_scale > 1.0
        cond, uncond = stages.encode_text(q.request, guided)
        latents = stages.initial_latents(q.request)
        scheduler = stages.new_scheduler()
        timesteps = start_schedule(scheduler, q.request.num_inference_steps, stages.device)
        timer.mark()
        return _Active(q, guided, cond[0], None if uncond is None else uncond[0], latents, scheduler,
                       timesteps, timer, admitted_at)

    def _forward(self) -> None:
        """One packed forward over all active samples, then each request's own scheduler step."""
        batch = list(self._active)
        latents: list[Tensor] = []
        timesteps: list[Tensor] = []
        text: list[Tensor] = []
        for state in batch:  # a guided request is two samples: cond, then uncond
            x, t = state.latents[0], state.timesteps[state.step]
            latents.append(x)
            timesteps.append(t)
            text.append(state.cond)
            if state.guided:
                latents.append(x)
                timesteps.append(t)
                text.append(state.uncond)
        try:
            preds = self._stages.predict_packed(latents, torch.stack(timesteps), text)
        except Exception as e:  # cannot tell whose fault: every request in this forward fails
            self._fail_active(e)
            return
        index = 0
        failed: list[_Active] = []
        for state in batch:
            if state.guided:
                pred = combine_guidance(preds[index], preds[index + 1], state.queued.request.guidance_scale)
                index += 2
            else:
                pred = preds[index]
                index += 1
            t = state.timesteps[state.step]
            state.latents = state.scheduler.step(pred[None], t, state.latents, return_dict=False)[0]
            state.step += 1
            state.timer.mark()
            if state.queued.callback is not None:
                try:
                    state.queued.callback(state.step - 1, state.total)
                except Exception as e:  # a failing callback fails its own request only
                    state.queued.future.set_exception(e)
                    failed.append(state)
        with self._cond:
            for state in failed:
                self._active.remove(state)
            self._steps += 1
            stats = StepStats(requests=len(batch), samples=len(latents),
                              tokens=sum(s.queued.tokens for s in batch), queued=len(self._queue))
            self._last_step = stats
        if self._on_step is not None:
            try:
                self._on_step(stats)
            except Exception:
                log.exception("on_step callback failed")

    def _retire(self) -> None:
        """Decode and resolve every request that did its last step (between forwards)."""
        with self._cond:
            done = [state for state in self._active if state.remaining == 0]
            for state in done:
                self._active.remove(state)
        for state in done:
            try:
                intervals = state.timer.per_step_s()  # [encode, step 1, ..., step n]
                synchronize(self._stages.device)
                decode_start = time.perf_counter()
                frames = self._stages.decode(state.latents)
                finished = time.perf_counter()
            except Exception as e:
                state.queued.future.set_exception(e)
                continue
            per_step = intervals[1:]
            timings: dict[str, float | list[float]] = {
                "queue_s": state.admitted_at - state.queued.submitted_at,
                "text_encode_s": intervals[0],
                "denoise_s": decode_start - state.admitted_at - intervals[0],
                "per_step_s": per_step,
                "step_mean_s": sum(per_step) / len(per_step) if per_step else 0.0,
                "decode_s": finished - decode_start,
                "total_s": finished - state.admitted_at,
            }
            with self._cond:
                self._completed += 1
            state.queued.future.set_result(GenerationOutput(frames=frames, seed=state.queued.request.seed,
                                                            timings=timings))

    def _fail_active(self, error: BaseException) -> None:
        """End every active request with `error` (a failed batched forward, or an engine bug)."""
        with self._cond:
            batch = list(self._active)
            self._active.clear()
        for state in batch:
            if not state.queued.future.done():
                state.queued.future.set_exception(error)


def _fail_cancelled(q: _Queued, step: int, total: int) -> None:
    """Resolve a cancelled request's future with `GenerationCancelled` (unless already resolved)."""
    if q.future.cancelled() or q.future.done():
        return
    if q.future.running() or q.future.set_running_or_notify_cancel():
        q.future.set_exception(GenerationCancelled(step, total))
