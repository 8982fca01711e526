"""Continuous batching: the requests that advance at a step share one step of the family's model.

Each request keeps everything that makes its result its own: latents, a fresh scheduler
(its own timesteps and solver history), step count, guidance plan, conditioning and seed.
At every step boundary the engine

1. drops requests whose cancel token is set (queued or admitted; they get `GenerationCancelled`);
   a step whose requests are all cancelled while it runs stops between two blocks of the model,
2. admits queued requests, FIFO, up to `max_batch_size` admitted at once; an admitted
   request is prepared by its family (`Family.prepare`: text encoded, noise drawn, scheduler
   started) exactly as for a request alone, so it does not matter when it joins,
3. picks the admitted requests that advance now (`ditserve.engine.policy`: least remaining
   work first, filled up to `fill_tokens` beyond the first within the `max_batch_tokens`
   memory budget, none passed over more than `max_skipped` steps in a row) and hands all
   their samples to `Family.predict` (a request with classifier-free guidance is two samples),
   then combines each request's predictions with its `GuidancePlan` and steps its scheduler,
4. hands every request that just did its last step to the `Decoder` (its own thread and
   CUDA stream, `ditserve.engine.decoder`), so the VAE never runs inside a step and no
   request waits for another's decode; the decoder resolves the request's future with
   its timings.

Samples never attend to each other (the family's packed forward keeps them apart). Because
a request's math depends neither on its neighbours nor on the steps it sits out, its result
batched equals its result alone (to float rounding of the packed vs dense layout). A request
alone is the same code with a batch of one: that is `Pipeline.generate`.

Driving it: either synchronously (`run_until_idle()`: step until nothing is queued or
admitted and every decode is done, what `Pipeline.generate` does) or in the background
(`start()` runs `run_forever()` on a daemon thread until `stop()`; what a server does).
Stepping is serialised by a lock, so only one thread steps at a time; `submit`, `stats`,
`close` and `stop` may be called from any thread. The default memory budget
(`ditserve.engine.budget`) is half the free device memory divided by an activation
estimate per token.

Failures stay per request where they can: a cancel, preparing, a callback or the decode
end only their own request (a failed batched decode, the requests in it); an error in the
step's forward itself (e.g. out of memory) fails the requests in that step, since it cannot
be pinned on one of them; requests the policy paused that step go on. On several ranks, a
rank that died (`RanksLost`, from the leader) ends everything: every queued and admitted
request fails with it and the engine closes, since no step can run again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor

from ditserve.engine.coordination import Leader
from ditserve.engine.decoder import Decoder
from ditserve.engine.errors import (
    EngineClosed,
    GenerationCancelled,
    RanksLost,
    StepInterrupted,
)
from ditserve.engine.family import CancelToken, Family, Prepared, StepCallback
from ditserve.engine.policy import DEFAULT_FILL_TOKENS, DEFAULT_MAX_SKIPPED, Candidate, select_step
from ditserve.engine.request import GenerationRequest
from ditserve.engine.result import GenerationOutput
from ditserve.engine.step import advance
from ditserve.engine.timing import StepTimer

__all__ = ["BatchingEngine", "EngineClosed", "EngineStats", "StepStats"]

log = logging.getLogger("ditserve.engine")

# An idle leader publishes an empty step this often, so that the followers' collective never waits
# long enough for a communication timeout (NCCL's watchdog, gloo's timeout).
HEARTBEAT_S = 60.0


@dataclass(frozen=True)
class StepStats:
    """One batched forward: how many requests, samples and tokens it held; requests queued
    (not admitted yet) and admitted but sitting this step out."""

    requests: int
    samples: int
    tokens: int
    queued: int
    paused: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics.

    queued / active: requests waiting / admitted (each step advances some or all of them);
    active_tokens: tokens of all admitted requests' samples; decoding: finished requests
    waiting for or in the VAE; steps: batched forwards so far; completed: requests resolved
    with an output; last_step: the latest forward (its requests and tokens), None before the
    first; max_batch_tokens / max_batch_size: the limits in force.
    """

    queued: int
    active: int
    active_tokens: int
    decoding: int
    steps: int
    completed: int
    last_step: StepStats | None
    max_batch_tokens: int
    max_batch_size: int | None


@dataclass(eq=False)
class _Queued:
    key: int  # unique per engine: how a coordinated step names the request on every rank
    request: GenerationRequest
    future: Future[GenerationOutput]
    callback: StepCallback | None
    cancel: CancelToken | None
    on_start: Callable[[], None] | None
    tokens: int
    submitted_at: float


@dataclass(eq=False)
class _Active:
    """A request in the batch: its own latents, scheduler and position in its own schedule."""

    queued: _Queued
    prepared: Prepared
    latents: Tensor  # [1, C, ...] float32
    timer: StepTimer  # marks: admitted, prepared, each step done
    admitted_at: float
    step: int = 0
    skipped: int = 0  # steps in a row this request sat out
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = len(self.prepared.timesteps)

    @property
    def remaining(self) -> int:
        return self.total - self.step


def _cancelled(token: CancelToken | None) -> bool:
    return token is not None and token.is_set()


class BatchingEngine:
    """Runs many generation requests at once, one packed DiT forward per step (see the module doc).

    `max_batch_tokens`: tokens (all samples, see `ditserve.engine.budget`) one step may hold;
    None = `family.default_max_batch_tokens()`. A request bigger than that runs alone.
    `max_batch_size`: most requests admitted at once (None: no limit; 1: one at a time, each
    to its end). `fill_tokens` / `max_skipped`: the step policy (`ditserve.engine.policy`).
    `on_step(StepStats)` runs on the stepping thread after every batched forward (metrics);
    its errors are logged, not raised. `leader`: the engine of rank 0 of several, publishing each
    step to the followers (`ditserve.engine.coordination`).
    """

    def __init__(
        self,
        family: Family,
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        fill_tokens: int = DEFAULT_FILL_TOKENS,
        max_skipped: int = DEFAULT_MAX_SKIPPED,
        on_step: Callable[[StepStats], None] | None = None,
        leader: Leader | None = None,
    ) -> None:
        budget = family.default_max_batch_tokens() if max_batch_tokens is None else max_batch_tokens
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"max_batch_tokens must be a positive int, got {budget!r}")
        if max_batch_size is not None and (
            not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1
        ):
            raise ValueError(f"max_batch_size must be a positive int or None, got {max_batch_size!r}")
        for name, value in (("fill_tokens", fill_tokens), ("max_skipped", max_skipped)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self._family = family
        self.max_batch_tokens = budget
        self.max_batch_size = max_batch_size
        self.fill_tokens = fill_tokens
        self.max_skipped = max_skipped
        self._on_step = on_step
        self._decoder = Decoder(family.decode_batch)
        self._cond = threading.Condition()  # guards everything below it
        self._queue: deque[_Queued] = deque()
        self._active: list[_Active] = []  # changed only by the stepping thread, under _cond
        self._closed = False
        self._aborting = False  # close(cancel=True): end active requests at the next boundary
        self._steps = 0
        self._completed = 0
        self._last_step: StepStats | None = None
        self._stepping = threading.Lock()  # one stepping thread at a time
        self._submitted = 0
        self._leader = leader
        self._thread: threading.Thread | None = None

    # -- any thread --------------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Future[GenerationOutput]:
        """Queue a validated request; returns at once with a future of its `GenerationOutput`.

        The future raises `GenerationCancelled` if `cancel` was set before its last step (or
        the future was cancelled while queued), else whatever failed its generation.
        `on_start()` runs on the stepping thread when the request is admitted (before it is
        prepared); `callback(i, total)` after its step i (0-based). Raises `EngineClosed`
        after `close` / `stop`.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit takes a validated GenerationRequest (RequestSpec.validate), "
                            f"got {type(request).__name__}")
        tokens = self.tokens_of(request)
        future: Future[GenerationOutput] = Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the batching engine is closed and takes no new requests")
            self._submitted += 1
            self._queue.append(_Queued(self._submitted, request, future, callback, cancel, on_start, tokens,
                                       time.perf_counter()))
            self._cond.notify_all()
        return future

    def tokens_of(self, request: GenerationRequest) -> int:
        """Tokens the request adds to each step it is in (compare with `max_batch_tokens`)."""
        return self._family.tokens_per_step(request)

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                queued=len(self._queue),
                active=len(self._active),
                active_tokens=sum(state.queued.tokens for state in self._active),
                decoding=self._decoder.pending(),
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
        """`close(cancel=cancel)`, then wait for the thread `start` began (it ends once every
        decode is done and the decoder's thread has ended); True if it has ended. Without
        `start`, ends the decoder's thread after its queued decodes (a synchronous batch's end)."""
        self.close(cancel=cancel)
        thread = self._thread
        if thread is None:
            self._decoder.close()
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
        and is raised; queued requests stay queued. Lost ranks (`RanksLost`) fail every request
        and close the engine.
        """
        with self._stepping, torch.no_grad():
            try:
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._forward()
                    self._retire()
            except RanksLost as e:
                self._abandon(e)
            except BaseException as e:
                self._fail_active(e)
                raise
        return self.has_work()

    def run_until_idle(self) -> None:
        """Step until nothing is queued or active, then wait for the decodes (a synchronous
        batch, e.g. `generate_batch`)."""
        while self.step():
            pass
        self._decoder.wait_idle()

    def run_forever(self) -> None:
        """Serve until `close()` and drained: wait for requests, step while there are any.

        An unexpected error in a step is logged (it already failed the active requests) and
        serving goes on.
        """
        while True:
            with self._cond:
                idle = False
                while not (self._queue or self._active or self._closed):
                    if not self._cond.wait(timeout=None if self._leader is None else HEARTBEAT_S):
                        idle = True  # the followers wait in a collective: tell them we are alive
                        break
                if not idle and self._closed and not (self._queue or self._active):
                    break
            if idle:
                try:
                    self._leader.publish({}, [])  # type: ignore[union-attr]
                except RanksLost as e:
                    self._abandon(e)
                continue
            try:
                self.step()
            except Exception:
                log.exception("batching engine step failed; its active requests were failed")
        if self._leader is not None:
            self._leader.stop()
        self._decoder.close()

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
        """FIFO: queued requests join while fewer than `max_batch_size` are admitted."""
        with self._cond:
            room = len(self._queue) if self.max_batch_size is None else self.max_batch_size - len(self._active)
            joining = [self._queue.popleft() for _ in range(max(0, min(room, len(self._queue))))]
        joining = [q for q in joining if q.future.set_running_or_notify_cancel()]  # not cancelled while waiting
        if not joining:
            return
        for q in joining:
            if q.on_start is not None:
                q.on_start()
        admitted_at = time.perf_counter()
        timer = StepTimer(self._family.device)
        timer.start()
        prepared = self._prepare(joining)
        timer.mark()
        for q, result in zip(joining, prepared):
            if isinstance(result, BaseException):  # this request's text or noise failed; the batch goes on
                q.future.set_exception(result)
                continue
            with self._cond:
                self._active.append(_Active(q, result, result.latents, timer.copy(), admitted_at))

    def _prepare(self, joining: list[_Queued]) -> list[Prepared | BaseException]:
        """Prepare the requests joining together in one call (text encoded as one batch); if that fails,
        each alone, so one bad request fails only itself."""
        try:
            return list(self._family.prepare_batch([q.request for q in joining]))
        except Exception:
            if len(joining) > 1:
                log.warning("preparing %d requests together failed; preparing each alone", len(joining))
        results: list[Prepared | BaseException] = []
        for q in joining:
            try:
                results.append(self._family.prepare_batch([q.request])[0])
            except Exception as e:
                results.append(e)
        return results

    def _select(self) -> list[_Active]:
        """The admitted requests that advance this step (`ditserve.engine.policy`)."""
        active = list(self._active)
        candidates = [Candidate(a.queued.tokens, a.remaining, a.skipped) for a in active]
        chosen = {id(active[i]) for i in select_step(candidates, self.max_batch_tokens, self.fill_tokens,
                                                        self.max_skipped)}
        for state in active:
            state.skipped = 0 if id(state) in chosen else state.skipped + 1
        return [state for state in active if id(state) in chosen]  # admission order

    def _forward(self) -> None:
        """One step for the chosen requests: all their samples through the family, then each one's scheduler."""
        batch = self._select()
        samples = sum(len(state.prepared.conditions) for state in batch)
        if self._leader is not None:
            with self._cond:
                active = {state.queued.key: state.queued.request for state in self._active}
            self._leader.publish(active, [state.queued.key for state in batch])

        def interrupt() -> bool:  # asked between blocks: stop a step that nobody waits for any more
            return self._aborting or all(_cancelled(state.queued.cancel) for state in batch)

        try:
            stepped = advance(self._family, [(state.prepared, state.latents, state.step) for state in batch],
                              None if self._leader is not None else interrupt)  # ranks leave a step together
        except StepInterrupted as e:
            log.info("%s: every request in it was cancelled", e)
            with self._cond:
                for state in batch:
                    self._active.remove(state)
            for state in batch:
                _fail_cancelled(state.queued, state.step, state.total)
            return
        except Exception as e:  # cannot tell whose fault: the requests in this step fail, the paused ones go on
            if self._leader is not None and isinstance(lost := self._leader.explain(e), RanksLost):
                raise lost from e  # a rank died mid-step: `step` ends everything
            self._fail(batch, e)
            return
        failed: list[_Active] = []
        for state, latents in zip(batch, stepped):
            state.latents = latents
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
            stats = StepStats(requests=len(batch), samples=samples,
                              tokens=sum(s.queued.tokens for s in batch), queued=len(self._queue),
                              paused=len(self._active) - len(batch) + len(failed))
            self._last_step = stats
        if self._on_step is not None:
            try:
                self._on_step(stats)
            except Exception:
                log.exception("on_step callback failed")

    def _retire(self) -> None:
        """Hand every request that did its last step to the decoder (which resolves it)."""
        with self._cond:
            done = [state for state in self._active if state.remaining == 0]
            for state in done:
                self._active.remove(state)
        denoised_at = time.perf_counter()
        self._decoder.submit_all([
            (self._family.final_latents(state.prepared, state.latents), partial(self._resolve, state, denoised_at))
            for state in done
        ])

    def _resolve(self, state: _Active, denoised_at: float, frames: np.ndarray | None, error: BaseException | None,
                 decode_start: float, decode_end: float) -> None:
        """On the decoder thread: the request's output and timings, or its decode error."""
        if error is not None:
            state.queued.future.set_exception(error)
            return
        intervals = state.timer.per_step_s()  # [encode, step 1, ..., step n]; the steps are done
        per_step = intervals[1:]
        timings: dict[str, float | list[float]] = {
            "queue_s": state.admitted_at - state.queued.submitted_at,
            "text_encode_s": intervals[0],  # text encoding, noise and scheduler set-up
            "denoise_s": denoised_at - state.admitted_at - intervals[0],
            "per_step_s": per_step,  # time between its own steps (steps it sat out included)
            "step_mean_s": sum(per_step) / len(per_step) if per_step else 0.0,
            "decode_wait_s": max(0.0, decode_start - denoised_at),
            "decode_s": decode_end - decode_start,
            "total_s": decode_end - state.admitted_at,
        }
        with self._cond:
            self._completed += 1
        state.queued.future.set_result(GenerationOutput(frames=frames, seed=state.queued.request.seed,
                                                        timings=timings))

    def _abandon(self, error: RanksLost) -> None:
        """The ranks are lost: take no new requests and end every queued and admitted one with `error`
        (a request already decoding finishes: the VAE runs on this rank alone)."""
        with self._cond:
            self._closed = True
            queued, active = list(self._queue), list(self._active)
            self._queue.clear()
            self._active.clear()
            self._cond.notify_all()
        for q in queued:
            if q.future.set_running_or_notify_cancel():
                q.future.set_exception(error)
        for state in active:
            if not state.queued.future.done():
                state.queued.future.set_exception(error)

    def _fail_active(self, error: BaseException) -> None:
        """End every active request with `error` (an engine bug outside a step's forward)."""
        with self._cond:
            batch = list(self._active)
        self._fail(batch, error)

    def _fail(self, states: list[_Active], error: BaseException) -> None:
        """End `states` with `error` and drop them from the batch; the other admitted requests go on."""
        with self._cond:
            for state in states:
                if state in self._active:
                    self._active.remove(state)
        for state in states:
            if not state.queued.future.done():
                state.queued.future.set_exception(error)


def _fail_cancelled(q: _Queued, step: int, total: int) -> None:
    """Resolve a cancelled request's future with `GenerationCancelled` (unless already resolved)."""
    if q.future.cancelled() or q.future.done():
        return
    if q.future.running() or q.future.set_running_or_notify_cancel():
        q.future.set_exception(GenerationCancelled(step, total))
