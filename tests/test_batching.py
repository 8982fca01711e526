"""Continuous batching (ditserve.engine.batching): many requests, one packed DiT forward per step.

Two kinds of tests:
- on the tiny random Wan2.1 pipeline (float32, CPU): a request's result batched equals its
  result alone (`Pipeline.generate`), for frames and for the clean latents (the latents are
  ~20x more sensitive to the prompt than the decoded frames of this random VAE, so they are
  the stricter check), and samples never see each other;
- on `FakeFamily` (no model, microseconds per step): admission order, budgets, cancel and
  failure isolation, threads. Its text embedding carries the request's seed, so the recorded
  forwards say which request each sample belonged to.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import ditserve
from ditserve.engine import GenerationRequest, InvalidRequest
from ditserve.engine.batching import BatchingEngine, EngineClosed, StepStats
from ditserve.engine.budget import CPU_MAX_BATCH_TOKENS, block_activation_bytes, default_max_batch_tokens
from ditserve.engine.decoder import Decoder
from ditserve.engine.policy import Candidate, select_step
from ditserve.engine import GenerationCancelled, RequestSpec
from ditserve.engine.family import GuidancePlan, Prepared, Sample
from ditserve.engine.request import standard_params
from ditserve.pipelines.wan import WanPipeline

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_wan_path: Path) -> WanPipeline:
    return ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32")


class LatentTap:
    """Wraps `pipe.decode_batch` to keep the clean latents of each output (keyed by its frames
    array) and the batch size of each VAE call."""

    def __init__(self, pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self._decode_batch = pipe.decode_batch
        self._latents: dict[int, Tensor] = {}
        self._keep: list[np.ndarray] = []  # keeps ids unique
        self.batches: list[int] = []
        monkeypatch.setattr(pipe, "decode_batch", self)

    def __call__(self, latents: Tensor) -> list[np.ndarray]:
        frames = self._decode_batch(latents)
        self.batches.append(len(frames))
        for row, f in zip(latents, frames):
            self._latents[id(f)] = row[None].clone()
            self._keep.append(f)
        return frames

    def of(self, output: Any) -> Tensor:
        return self._latents[id(output.frames)]


class ForwardLog:
    """Wraps `pipe.predict` to record each step's sample shapes and timesteps."""

    def __init__(self, pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self._predict = pipe.predict
        self.calls: list[list[tuple[tuple[int, ...], float]]] = []
        monkeypatch.setattr(pipe, "predict", self)

    def __call__(self, samples: list[Sample], interrupt: Any = None) -> list[Tensor]:
        self.calls.append([(tuple(s.latents.shape[1:]), float(s.timestep)) for s in samples])
        return self._predict(samples, interrupt)


def rel_diff(a: np.ndarray | Tensor, ref: np.ndarray | Tensor) -> float:
    a, ref = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((a - ref).abs().max() / ref.abs().max())


def request(**overrides: Any) -> dict[str, Any]:
    base = dict(prompt="a red ball rolling on the street", negative_prompt="blurry, low quality",
                height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=5.0, seed=0)
    return {**base, **overrides}


# Different heights, widths, frame counts, step counts, guidance (1.0 = no uncond branch)
# and negative prompts; every pair differs in at least shape or step count.
MIXED = [
    request(seed=1),
    request(height=16, width=48, num_frames=1, num_inference_steps=4, guidance_scale=1.0, seed=2,
            prompt="a blue cat"),
    request(height=48, width=32, num_frames=9, num_inference_steps=2, guidance_scale=3.0, seed=3,
            negative_prompt=""),
    request(height=16, width=16, num_frames=1, num_inference_steps=5, guidance_scale=7.5, seed=4,
            prompt="a green tree in the city", negative_prompt="dark, noisy"),
    request(height=32, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0, seed=5,
            prompt="a white bird flying over the sea"),
]


@pytest.fixture(scope="module")
def alone(pipe: WanPipeline) -> dict[int, tuple[np.ndarray, Tensor]]:
    """Each MIXED request run alone with `Pipeline.generate`: (frames, clean latents)."""
    refs: dict[int, tuple[np.ndarray, Tensor]] = {}
    with pytest.MonkeyPatch.context() as mp:
        tap = LatentTap(pipe, mp)
        for i, kwargs in enumerate(MIXED):
            out = pipe.generate(**kwargs)
            refs[i] = (out.frames, tap.of(out))
    return refs


def assert_same_as_alone(out: Any, tap: LatentTap, ref: tuple[np.ndarray, Tensor], what: str) -> None:
    frames, latents = ref
    assert out.frames.shape == frames.shape, what
    assert rel_diff(out.frames, frames) <= REL_TOL, what
    assert rel_diff(tap.of(out), latents) <= REL_TOL, what


# ----------------------------------------------------------------------------- same outputs


def test_mixed_batch_joining_at_different_steps_matches_alone(
    pipe: WanPipeline, alone: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap, forwards = LatentTap(pipe, monkeypatch), ForwardLog(pipe, monkeypatch)
    steps: list[StepStats] = []
    engine = BatchingEngine(pipe, on_step=steps.append)
    requests = [pipe.validate(**kwargs) for kwargs in MIXED]
    futures: dict[int, Future] = {i: engine.submit(requests[i]) for i in (0, 1)}
    engine.step()  # 0 and 1 together
    futures[2] = engine.submit(requests[2])
    engine.step()  # 2 joins at step 1 of 0 and 1
    futures[3] = engine.submit(requests[3])
    futures[4] = engine.submit(requests[4])
    engine.run_until_idle()

    for i, future in futures.items():
        assert_same_as_alone(future.result(), tap, alone[i], f"request {i}")
    # one forward per step boundary, each holding every active request
    assert len(forwards.calls) == len(steps) == engine.stats().steps
    assert [s.requests for s in steps[:3]] == [2, 3, 5]
    # guided requests are two samples (cond, uncond), guidance 1.0 is one
    assert steps[0].samples == 2 + 1 and steps[2].samples == 2 + 1 + 2 + 2 + 2
    assert len({shape for shape, _ in forwards.calls[2]}) == 5  # five latent shapes in one forward
    assert len({t for _, t in forwards.calls[2]}) > 1  # per-sample timesteps
    assert sum(s.requests for s in steps) == sum(r["num_inference_steps"] for r in MIXED)
    timings = futures[2].result().timings
    assert len(timings["per_step_s"]) == 2 and timings["queue_s"] >= 0 and timings["decode_s"] > 0


def test_generate_batch_matches_alone_in_order(pipe: WanPipeline, alone: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    tap = LatentTap(pipe, monkeypatch)
    calls: list[tuple[int, int, int]] = []
    order = [3, 0, 1, 0]
    batch = [MIXED[3], pipe.validate(**MIXED[0]), MIXED[1], MIXED[0]]  # dicts or validated requests
    outs = pipe.generate_batch(batch, callback=lambda *args: calls.append(args))
    for out, i in zip(outs, order):
        assert_same_as_alone(out, tap, alone[i], f"request {i}")
        assert out.seed == MIXED[i]["seed"]
    assert 2 in tap.batches  # the two of one shape finished together: one VAE call
    for index, i in enumerate(order):
        total = MIXED[i]["num_inference_steps"]
        assert [c[1:] for c in calls if c[0] == index] == [(step, total) for step in range(total)]
    assert pipe.generate_batch([]) == []


def test_generate_with_a_list_batches_each_entry_like_alone(
    pipe: WanPipeline, alone: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = LatentTap(pipe, monkeypatch)
    shared = {k: v for k, v in MIXED[0].items() if k not in ("prompt", "seed")}
    steps: list[tuple[int, int, int]] = []
    # a prompt string takes the keyword arguments (seed + its index); a dict brings its own fields
    outs = pipe.generate([MIXED[0]["prompt"], MIXED[4]], seed=MIXED[0]["seed"], **shared,
                         callback=lambda *args: steps.append(args))
    assert isinstance(outs, list) and len(outs) == 2
    assert_same_as_alone(outs[0], tap, alone[0], "string entry")
    assert_same_as_alone(outs[1], tap, alone[4], "dict entry")
    assert sorted(steps) == [(i, s, 3) for i in (0, 1) for s in range(3)]
    with pytest.raises(InvalidRequest, match=r"requests\[1\]: height must be an int, a multiple of 16"):
        pipe.generate(["a", {"prompt": "b", "height": 30}], **shared)


def test_samples_never_attend_to_each_other(pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing one request's prompts leaves its batch neighbour's result unchanged.

    (Sizes, latents and timesteps of a neighbour: see test_packed_forward_isolates_samples.)
    """
    tap = LatentTap(pipe, monkeypatch)
    other = MIXED[4]
    a, b = pipe.generate_batch([MIXED[0], other])
    changed = dict(MIXED[0], prompt="a yellow star at night", negative_prompt="")
    a2, b2 = pipe.generate_batch([changed, other])
    assert rel_diff(tap.of(a2), tap.of(a)) > 100 * REL_TOL  # the change is visible where it belongs
    assert rel_diff(tap.of(b2), tap.of(b)) <= 1e-6


def test_packed_forward_isolates_samples(pipe: WanPipeline) -> None:
    """Model level: replacing sample 0's latents and text does not move sample 1's prediction."""
    dit = pipe.transformer
    gen = torch.Generator().manual_seed(0)
    lat = [torch.randn(16, 2, 4, 6, generator=gen), torch.randn(16, 1, 2, 8, generator=gen)]
    text = [torch.randn(7, 32, generator=gen), torch.randn(5, 32, generator=gen)]
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        _, ref = dit.forward_packed(lat, t, text)
        _, out = dit.forward_packed([torch.randn(16, 3, 2, 2, generator=gen), lat[1]], torch.tensor([10.0, 300.0]),
                                    [torch.randn(11, 32, generator=gen), text[1]])
        (alone,) = dit.forward_packed([lat[1]], t[1:], [text[1]])
    assert rel_diff(out, ref) <= 1e-6 and rel_diff(alone, ref) <= 1e-6


def test_cancel_one_mid_batch_leaves_the_others_correct(
    pipe: WanPipeline, alone: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = LatentTap(pipe, monkeypatch)
    engine = BatchingEngine(pipe)
    cancel = threading.Event()
    calls: list[int] = []

    def stop_after_step_1(step: int, total: int) -> None:
        calls.append(step)
        if step == 1:
            cancel.set()

    keep_a = engine.submit(pipe.request_spec.validate(MIXED[0]))
    doomed = engine.submit(pipe.request_spec.validate(MIXED[3]), callback=stop_after_step_1, cancel=cancel)
    keep_b = engine.submit(pipe.request_spec.validate(MIXED[2]))
    engine.run_until_idle()
    with pytest.raises(GenerationCancelled, match="before denoising step 3 of 5") as info:
        doomed.result()
    assert calls == [0, 1] and info.value.step == 2
    assert_same_as_alone(keep_a.result(), tap, alone[0], "request 0")
    assert_same_as_alone(keep_b.result(), tap, alone[2], "request 2")


def test_generate_batch_validation_names_the_index(pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipe, "prepare_batch", lambda *a, **k: pytest.fail("work started on a bad batch"))
    with pytest.raises(InvalidRequest, match=r"requests\[1\]: height must be an int, a multiple of 16, in \[16, 512\], "
                                             r"got 30"):
        pipe.generate_batch([MIXED[0], dict(MIXED[0], height=30)])
    with pytest.raises(InvalidRequest, match=r"requests\[2\]: width must be an int, a multiple of 16, in \[16, 512\], "
                                             r"got 528"):
        pipe.generate_batch([MIXED[0], MIXED[1], dict(MIXED[0], width=528)])
    with pytest.raises(InvalidRequest, match=r"requests\[0\]: unknown parameter\(s\) \['steps'\] for this model"):
        pipe.generate_batch([dict(prompt="a", steps=3)])
    with pytest.raises(TypeError, match=r"requests\[1\] needs a 'prompt'"):
        pipe.generate_batch([MIXED[0], dict(height=32)])
    with pytest.raises(TypeError, match=r"requests\[0\] must be a dict"):
        pipe.generate_batch(["a prompt"])  # type: ignore[list-item]


# ----------------------------------------------------------------------------- engine mechanics (no model)


class FakeScheduler:
    """Counts steps in the latents: each step adds 1."""

    def __init__(self, n: int) -> None:
        self.timesteps = torch.arange(n, 0, -1, dtype=torch.float32) * 100

    def step(self, pred: Tensor, t: Tensor, x: Tensor, return_dict: bool = False) -> tuple[Tensor]:
        return (x + 1,)


FAKE_SPEC = RequestSpec(standard_params(
    height=16, width=16, num_frames=1, num_inference_steps=3, guidance_scale=1.0, fps=16.0, size_multiple=(16, 16),
    max_size=(4096, 4096), frame_multiple=1, max_frames=1, max_steps=100, guidance_help="CFG scale"))


class FakeFamily:
    """A `Family` without a model: tokens = height * width // 256 * num_frames per sample."""

    device = torch.device("cpu")
    request_spec = FAKE_SPEC

    def __init__(self, forward_s: float = 0.0) -> None:
        self.forward_s = forward_s  # how long a forward takes
        self.forwards: list[list[int]] = []  # per forward: the seed of each sample (cond, uncond)
        self.fail_encode: set[int] = set()
        self.prepared_together: list[list[int]] = []  # per prepare_batch call: the seeds
        self.lock = threading.Lock()

    def tokens_per_step(self, request: GenerationRequest) -> int:
        per_sample = request.height * request.width // 256 * request.num_frames
        return per_sample * (2 if request.guidance_scale > 1 else 1)

    def default_max_batch_tokens(self) -> int:
        return 1000

    def prepare_batch(self, requests: list[GenerationRequest]) -> list[Prepared]:
        self.prepared_together.append([r.seed for r in requests])
        return [self._prepare(r) for r in requests]

    def _prepare(self, request: GenerationRequest) -> Prepared:
        if request.seed in self.fail_encode:
            raise RuntimeError(f"cannot encode request {request.seed}")
        scheduler = FakeScheduler(request.num_inference_steps)
        steps = request.num_inference_steps
        plan = (GuidancePlan.classifier_free([request.guidance_scale] * steps) if request.guidance_scale > 1
                else GuidancePlan.single())
        return Prepared(torch.zeros(1, 1, 1, 1, 1), scheduler, scheduler.timesteps,
                        (request.seed,) * plan.samples, plan)

    def predict(self, samples: list[Sample], interrupt: Any = None) -> list[Tensor]:
        with self.lock:
            self.forwards.append([s.condition for s in samples])
        time.sleep(self.forward_s)
        return [torch.zeros_like(s.latents) for s in samples]

    def final_latents(self, prepared: Prepared, latents: Tensor) -> Tensor:
        return latents

    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        return [row.reshape(1).numpy().copy() for row in latents]  # the number of steps done

    def requests_per_forward(self) -> list[list[int]]:
        return [sorted(set(seeds)) for seeds in self.forwards]

    def first_forward(self, seed: int) -> int:
        return next(i for i, seeds in enumerate(self.forwards) if seed in seeds)


def fake(seed: int, tokens: int = 1, steps: int = 3, guidance: float = 1.0) -> GenerationRequest:
    """A request of `tokens` tokens per sample on FakeFamily (16x16 pixels per token)."""
    return GenerationRequest(prompt="p", height=16, width=16 * tokens, num_frames=1, num_inference_steps=steps,
                             guidance_scale=guidance, seed=seed)


def test_token_budget_and_batch_size_are_respected() -> None:
    stages = FakeFamily()
    engine = BatchingEngine(stages, max_batch_tokens=10, max_batch_size=3)
    sizes = {1: 3, 2: 3, 3: 3, 4: 2, 5: 12, 6: 1, 7: 1}  # seed -> tokens (5 is bigger than the budget)
    futures = {seed: engine.submit(fake(seed, tokens, steps=2 + seed % 3)) for seed, tokens in sizes.items()}
    engine.run_until_idle()
    for seed, future in futures.items():
        assert future.result().frames[0] == 2 + seed % 3  # every step ran
    for seeds in stages.requests_per_forward():
        assert len(seeds) <= 3
        assert sum(sizes[s] for s in seeds) <= 10 or seeds == [5]  # too big: alone
    assert [5] in stages.requests_per_forward()
    stats = engine.stats()
    assert (stats.active, stats.queued, stats.completed, stats.max_batch_tokens) == (0, 0, 7, 10)


def test_guided_requests_are_two_samples_and_count_double() -> None:
    stages = FakeFamily()
    engine = BatchingEngine(stages, max_batch_tokens=4)
    engine.submit(fake(1, tokens=2, guidance=5.0))  # 2 samples x 2 tokens: the whole budget
    engine.submit(fake(2, tokens=1, guidance=1.0))
    engine.run_until_idle()
    assert stages.forwards[0] == [2]  # less work left: first; 1 does not fit beside it
    assert [1, 1] in stages.forwards  # cond and uncond of request 1 in one forward
    assert all(f in ([1, 1], [2]) for f in stages.forwards)


def test_least_remaining_work_goes_first_and_small_requests_fill_the_step() -> None:
    stages = FakeFamily()
    engine = BatchingEngine(stages, max_batch_tokens=100, fill_tokens=2)
    engine.submit(fake(1, tokens=50, steps=6))  # big: alone at first
    engine.step()
    for seed in (2, 3, 4):
        engine.submit(fake(seed, tokens=2, steps=3))  # small ones arrive
    engine.step()
    engine.run_until_idle()
    per_forward = stages.requests_per_forward()
    assert per_forward[0] == [1]
    # the small ones do not wait for the big one, and do not share its long steps: the first
    # (least work) runs with as many as fit in fill_tokens beyond it (2 + 2 <= 2 + 2)
    assert per_forward[1:4] == [[2, 3], [2, 3], [2, 3]] and per_forward[4:7] == [[4]] * 3
    assert per_forward[7:] == [[1]] * 5  # then the big one resumes where it stopped


def test_no_request_is_passed_over_more_than_max_skipped_steps() -> None:
    stages = FakeFamily()
    engine = BatchingEngine(stages, max_batch_tokens=100, fill_tokens=0, max_skipped=2)
    big = engine.submit(fake(1, tokens=50, steps=3))
    for seed in range(2, 12):
        engine.submit(fake(seed, tokens=1, steps=2))  # a stream of small, shorter jobs
    engine.run_until_idle()
    per_forward = stages.requests_per_forward()
    runs = [i for i, seeds in enumerate(per_forward) if 1 in seeds]
    assert runs == [2, 5, 8]  # every third step at the latest, although always the most work
    assert big.result().frames[0] == 3


def test_one_at_a_time_runs_each_request_to_its_end_in_fifo_order() -> None:
    serial = FakeFamily()
    engine = BatchingEngine(serial, max_batch_size=1)
    futures = [engine.submit(fake(seed, steps=2, tokens=5 - seed)) for seed in range(4)]
    engine.run_until_idle()
    assert serial.requests_per_forward() == [[0], [0], [1], [1], [2], [2], [3], [3]]
    assert all(f.done() for f in futures)


def test_step_policy() -> None:
    c = Candidate
    assert select_step([], max_tokens=10) == []
    # least remaining work first (tokens x steps left), ties in admission order
    assert select_step([c(4, 3), c(2, 2), c(1, 4)], max_tokens=100, fill_tokens=0) == [1]
    assert select_step([c(4, 3), c(2, 2), c(1, 4)], max_tokens=100, fill_tokens=4) == [1, 2]
    assert select_step([c(2, 2), c(2, 2)], max_tokens=100, fill_tokens=2) == [0, 1]
    # the memory budget bounds the fill; a first request above the budget runs alone
    assert select_step([c(1, 1), c(3, 1), c(2, 1)], max_tokens=4, fill_tokens=100) == [0, 2]
    assert select_step([c(99, 1, skipped=5), c(1, 1)], max_tokens=10, max_skipped=5) == [0]
    # a starved request comes first, whatever its size
    assert select_step([c(1, 1), c(8, 9, skipped=3)], max_tokens=10, fill_tokens=1, max_skipped=3) == [1, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        select_step([c(1, 1)], max_tokens=0)
    with pytest.raises(ValueError, match="fill_tokens"):
        select_step([c(1, 1)], max_tokens=1, fill_tokens=-1)


def test_decoder_batches_equal_shapes_and_retries_a_failed_batch_one_by_one() -> None:
    calls: list[int] = []
    gate = threading.Event()

    def decode_batch(latents: Tensor) -> list[np.ndarray]:
        gate.wait(10)
        calls.append(len(latents))
        if len(latents) > 2:
            raise MemoryError("batch too big")
        if (latents == 7).any():
            raise ValueError("bad latents")
        return [row.numpy() for row in latents]

    decoder = Decoder(decode_batch, max_batch_latent_pixels=4 * 6)
    results: dict[int, Any] = {}

    def done(key: int) -> Any:
        return lambda frames, error, start, end: results.__setitem__(key, error if frames is None else frames)

    decoder.submit_all([(torch.zeros(1, 1, 1, 1, 1), done(0))])  # a shape of its own: alone, whenever the worker starts
    for key, value in ((1, 1.0), (2, 7.0), (3, 3.0), (4, 4.0), (5, 5.0)):
        decoder.submit_all([(torch.full((1, 1, 1, 2, 3), value), done(key))])
    decoder.submit_all([(torch.full((1, 1, 1, 4, 3), 6.0), done(6))])  # another shape
    gate.set()
    assert decoder.wait_idle(10) and decoder.pending() == 0
    # 0 alone; then 4 of one shape (the pixel bound), which fails and is retried one by one;
    # then the last of that shape; then the other shape
    assert calls == [1, 4, 1, 1, 1, 1, 1, 1]
    assert isinstance(results[2], ValueError) and all(isinstance(results[k], np.ndarray) for k in (0, 1, 3, 4, 5, 6))
    assert [float(results[k].flat[0]) for k in (1, 3, 4, 5, 6)] == [1.0, 3.0, 4.0, 5.0, 6.0]


def test_decoder_close_drains_then_ends_its_thread_and_refuses_more() -> None:
    decoded: list[float] = []
    before = {t.ident for t in threading.enumerate()}
    decoder = Decoder(lambda latents: [row.numpy() for row in latents])
    decoder.submit_all([(torch.full((1, 1, 1, 2, 2), v), lambda f, e, s, t: decoded.append(float(f.flat[0])))
                        for v in (1.0, 2.0)])
    decoder.close()
    assert decoded == [1.0, 2.0] and {t.ident for t in threading.enumerate()} <= before
    with pytest.raises(RuntimeError, match="closed"):
        decoder.submit_all([(torch.zeros(1, 1, 1, 2, 2), lambda *a: None)])


def test_generate_leaves_no_thread_and_frees_the_pipeline(tiny_wan_path: Path) -> None:
    """Each `generate` runs an engine of its own; its decoder thread must end with it, or it keeps
    the pipeline (and its GPU memory) alive after the caller drops it."""
    import gc
    import weakref

    before = {t.ident for t in threading.enumerate()}
    local = ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32")
    local.generate("a cat", height=16, width=16, num_frames=1, num_inference_steps=1, seed=0)
    small = dict(height=16, width=16, num_frames=1, num_inference_steps=1)
    local.generate_batch([{"prompt": "a", "seed": 1, **small}, {"prompt": "b", "seed": 2, **small}])
    assert [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("ditserve")] == []
    alive = weakref.ref(local)
    del local
    gc.collect()
    assert alive() is None


def test_failures_and_cancels_end_only_their_request() -> None:
    stages = FakeFamily()
    stages.fail_encode.add(2)
    engine = BatchingEngine(stages)
    queued_cancel = threading.Event()

    def boom(step: int, total: int) -> None:
        raise ValueError("callback failed")

    ok = engine.submit(fake(1, steps=3))
    bad_text = engine.submit(fake(2))
    bad_callback = engine.submit(fake(3), callback=boom)
    cancelled_queued = engine.submit(fake(4), cancel=queued_cancel)
    cancelled_future = engine.submit(fake(5))
    queued_cancel.set()
    assert cancelled_future.cancel()  # still queued: a plain Future.cancel works
    engine.run_until_idle()
    assert ok.result().frames[0] == 3
    with pytest.raises(RuntimeError, match="cannot encode request 2"):
        bad_text.result()
    with pytest.raises(ValueError, match="callback failed"):
        bad_callback.result()
    with pytest.raises(GenerationCancelled, match="before denoising step 1 of 3"):
        cancelled_queued.result()
    assert cancelled_future.cancelled()
    assert all(4 not in seeds and 5 not in seeds for seeds in stages.forwards)
    assert sum(3 in seeds for seeds in stages.forwards) == 1  # left after its first step
    # admitted together, prepared together (one text-encoder batch); the failure then alone, each
    assert stages.prepared_together == [[1, 2, 3], [1], [2], [3]]


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on() -> None:
    stages = FakeFamily()
    engine = BatchingEngine(stages)
    real = stages.predict
    stages.predict = lambda *a: (_ for _ in ()).throw(MemoryError("out of memory"))  # type: ignore[method-assign]
    lost = engine.submit(fake(1))
    engine.step()
    with pytest.raises(MemoryError):
        lost.result()
    stages.predict = real  # type: ignore[method-assign]
    second = engine.submit(fake(2))
    engine.run_until_idle()
    assert second.result().frames[0] == 3 and engine.stats().completed == 1


def test_a_failed_forward_spares_the_requests_paused_that_step() -> None:
    """Only the requests in the failed forward fail; one the step policy paused goes on to its end."""
    stages = FakeFamily()
    engine = BatchingEngine(stages, max_batch_tokens=4, fill_tokens=0)  # one request per step
    real = stages.predict
    calls = []

    def fail_first(samples: list[Sample], interrupt: Any = None) -> list[Tensor]:
        calls.append([s.condition for s in samples])
        if len(calls) == 1:
            raise MemoryError("out of memory")
        return real(samples)

    stages.predict = fail_first  # type: ignore[method-assign]
    in_forward = engine.submit(fake(1, tokens=1, steps=2))  # least remaining work: runs first
    paused = engine.submit(fake(2, tokens=2, steps=4))
    engine.run_until_idle()
    assert calls[0] == [1]  # the failed forward held request 1 alone
    with pytest.raises(MemoryError):
        in_forward.result()
    assert paused.result().frames[0] == 4  # all its steps ran after the failure


def test_background_thread_submit_from_many_threads_and_stop() -> None:
    stages = FakeFamily(forward_s=0.005)
    steps: list[StepStats] = []
    engine = BatchingEngine(stages, on_step=steps.append)
    engine.start()
    futures: list[Future] = []
    lock = threading.Lock()

    def client(base: int) -> None:
        for k in range(5):
            future = engine.submit(fake(base + k, steps=2 + k % 3))
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=client, args=(100 * i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [f.result(timeout=30) for f in futures]
    assert len(results) == 20 and all(r.frames[0] == 2 + r.seed % 100 % 3 for r in results)
    assert engine.stats().last_step == steps[-1] and max(s.requests for s in steps) > 1
    assert engine.stop(timeout=10)
    with pytest.raises(EngineClosed):
        engine.submit(fake(1))


def test_stop_with_cancel_ends_queued_and_active_requests() -> None:
    stages = FakeFamily()
    engine = BatchingEngine(stages, max_batch_size=1)
    running = engine.submit(fake(1, steps=100))
    waiting = engine.submit(fake(2))
    engine.step()
    engine.close(cancel=True)
    with pytest.raises(GenerationCancelled):
        waiting.result(timeout=0)
    engine.run_until_idle()
    with pytest.raises(GenerationCancelled, match="before denoising step 2 of 100"):
        running.result(timeout=0)
    engine.start()
    assert engine.stop(timeout=10)  # closed and empty: the thread returns at once


# ----------------------------------------------------------------------------- budget


def test_default_budget() -> None:
    # Wan2.1-1.3B in bf16: (2 * 8960 + 16 * 1536) * 2 bytes per token
    assert block_activation_bytes(1536, 8960, torch.bfloat16) == 84_992
    assert block_activation_bytes(1536, 8960, torch.float32) == 2 * 84_992
    assert default_max_batch_tokens(84_992, torch.device("cpu")) == CPU_MAX_BATCH_TOKENS
    with pytest.raises(ValueError):
        default_max_batch_tokens(0, torch.device("cpu"))


def test_engine_rejects_bad_limits(pipe: WanPipeline) -> None:
    assert BatchingEngine(pipe).max_batch_tokens == CPU_MAX_BATCH_TOKENS
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchingEngine(pipe, max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingEngine(pipe, max_batch_size=0)
    with pytest.raises(TypeError, match="validated GenerationRequest"):
        BatchingEngine(pipe).submit(MIXED[0])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- GPU (bf16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_batched_matches_alone_psnr(tiny_wan_path: Path) -> None:
    """Issue 8's GPU bound: each request batched is >= 40 dB PSNR from the same request alone."""
    gpu = ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cuda")
    assert gpu.dtype == torch.bfloat16
    sized = [dict(r, height=2 * r["height"], width=2 * r["width"]) for r in MIXED]  # more tokens per sample
    batched = gpu.generate_batch(sized)
    for i, (kwargs, out) in enumerate(zip(sized, batched)):
        ref = gpu.generate(**kwargs).frames
        mse = float(np.mean((out.frames.astype(np.float64) - ref) ** 2))
        assert mse == 0 or 10 * np.log10(1 / mse) >= 40.0, f"request {i}"


def test_a_step_whose_requests_are_all_cancelled_stops_between_blocks(pipe: WanPipeline,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancellation does not wait for the step to end: the model stops before its next block, and a
    request in the same step that is not cancelled keeps the step going."""
    blocks = pipe.transformer.blocks
    ran: list[int] = []
    cancel = threading.Event()
    for index, block in enumerate(blocks):
        real = block.forward

        def counted(*args: Any, index: int = index, real: Any = real, **kwargs: Any) -> Any:
            ran.append(index)
            if index == 0 and len(ran) == 1:
                cancel.set()  # cancelled while its first step is in the first block
            return real(*args, **kwargs)

        monkeypatch.setattr(block, "forward", counted)
    with pytest.raises(GenerationCancelled, match="before denoising step 1 of 3"):
        pipe.generate(**MIXED[0], cancel=cancel)
    assert ran == [0]  # the second block never ran
    ran.clear()
    cancel.clear()
    engine = BatchingEngine(pipe)
    doomed = engine.submit(pipe.request_spec.validate(MIXED[0]), cancel=cancel)
    kept = engine.submit(pipe.request_spec.validate(MIXED[1]))
    engine.run_until_idle()
    with pytest.raises(GenerationCancelled):
        doomed.result()
    assert kept.result().frames.shape[0] == MIXED[1]["num_frames"]
    assert len(ran) > len(blocks)  # the shared step was not interrupted for the one still wanted


def test_an_idle_leader_publishes_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Followers wait in a collective between steps; an idle leader keeps it from timing out."""
    import ditserve.engine.batching as batching

    published: list[tuple[dict, list]] = []

    class RecordingLeader:
        def publish(self, active: dict, advancing: list) -> None:
            published.append((dict(active), list(advancing)))

        def stop(self) -> None:
            published.append(("stop", []))

    monkeypatch.setattr(batching, "HEARTBEAT_S", 0.05)
    engine = BatchingEngine(FakeFamily(), leader=RecordingLeader())  # type: ignore[arg-type]
    engine.start()
    time.sleep(0.3)
    future = engine.submit(fake(1, steps=2))
    future.result(timeout=10)
    assert engine.stop(timeout=10)
    beats = [p for p in published if p == ({}, [])]
    steps = [p for p in published if p[0] not in ({}, "stop")]
    assert len(beats) >= 2 and len(steps) == 2 and published[-1] == ("stop", [])
    assert steps[0][1] == steps[1][1] == [steps[0][1][0]]  # one request, advancing at both of its steps
