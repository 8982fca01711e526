"""Step caching (`ditserve.engine.step_cache`): which steps reuse, what they take, and that it stays per request.

The policies are checked on synthetic predictions (exact schedules), then through the real
engine on the embedded tiny model: off is the exact path, on skips the DiT on some steps and
stays close to it, a request's result does not depend on what it is batched with, and bad
settings are refused before anything loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ditserve
from ditserve import cli
from ditserve.engine.step_cache import AdaptiveStepCache, UniformStepCache, parse_step_cache

SMALL = dict(height=16, width=16, num_frames=5, num_inference_steps=12, guidance_scale=4.0)


def _decisions(policy, predictions: list[torch.Tensor]) -> tuple[list[bool], list[torch.Tensor]]:
    """Drive one request's cache over `predictions` (what the DiT would return each step): (reused?, taken)."""
    state = policy.new_state(len(predictions))
    reused, taken = [], []
    for step, computed in enumerate(predictions):
        reuse = state.reuse(step)
        pred = state.forecast(step) if reuse else computed
        state.record(pred, step, reuse)
        reused.append(reuse)
        taken.append(pred)
    return reused, taken


def test_uniform_computes_warmup_every_nth_step_and_the_last() -> None:
    preds = [torch.full((2,), float(i + 1)) for i in range(10)]
    reused, _ = _decisions(UniformStepCache(interval=3), preds)
    #            0      1      2      3     4     5      6     7     8      9 (last: always computed)
    assert reused == [False, False, False, True, True, False, True, True, False, False]


def test_adaptive_reuses_while_the_estimated_change_stays_under_the_threshold() -> None:
    # a prediction changing by 1% of its size per step: 0.1 allows up to 9 reused steps in a row
    preds = [torch.full((4,), 100.0 + i) for i in range(14)]
    reused, taken = _decisions(AdaptiveStepCache(threshold=0.1), preds)
    assert reused[:2] == [False, False] and reused[-1] is False and sum(reused) >= 8
    # reused steps carry the last prediction forward along the last change: exact for a linear trend
    for step, (pred, truth) in enumerate(zip(taken, preds)):
        assert torch.allclose(pred, truth), step
    # a prediction that jumps by half its size each step is never reused
    jumpy = [torch.full((4,), 2.0 ** i) for i in range(10)]
    assert not any(_decisions(AdaptiveStepCache(threshold=0.1), jumpy)[0])


def test_parse_forms_and_errors() -> None:
    assert parse_step_cache(None) is None and parse_step_cache("off") is None
    assert parse_step_cache("0.2") == AdaptiveStepCache(threshold=0.2)
    assert parse_step_cache(0.05) == AdaptiveStepCache(threshold=0.05)
    assert parse_step_cache("uniform:3") == UniformStepCache(interval=3)
    for bad, why in (("abc", "could not convert"), ("0", "threshold must be in (0, 10)"), ("nan", "(0, 10)"),
                     ("uniform:1", "interval must be >= 2"), ("uniform:x", "invalid literal")):
        with pytest.raises(ValueError, match="'uniform:N'") as info:
            parse_step_cache(bad)
        assert why in str(info.value)


@pytest.fixture(scope="module")
def tiny(tiny_wan_path: Path):
    return ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32")


def _generate(pipe, policy, monkeypatch: pytest.MonkeyPatch, **request) -> tuple[np.ndarray, int]:
    """Frames and how many DiT calls (`predict`) the generation made."""
    calls = []
    predict = type(pipe).predict
    monkeypatch.setattr(pipe, "predict", lambda samples, interrupt=None: calls.append(len(samples))
                        or predict(pipe, samples, interrupt))
    monkeypatch.setattr(pipe, "step_cache", policy)
    frames = pipe.generate(**request).frames
    monkeypatch.undo()
    return frames, len(calls)


def test_cache_skips_dit_calls_and_stays_close_to_the_exact_path(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    request = dict(SMALL, prompt="a red circle moving left on a blue background", seed=3)
    exact, calls = _generate(tiny, None, monkeypatch, **request)
    assert calls == 12
    again, _ = _generate(tiny, None, monkeypatch, **request)
    assert np.array_equal(exact, again)  # off is the exact path
    cached, cached_calls = _generate(tiny, UniformStepCache(interval=2), monkeypatch, **request)
    assert cached_calls == 8  # steps 0 and 1 (warm-up), 2, 4, 6, 8, 10, and 11 (the last)
    mse = float(np.mean((cached - exact) ** 2))
    assert 0 < mse and 10 * np.log10(1 / mse) >= 30


def test_each_request_keeps_its_own_cache_in_a_batch(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests of different lengths in one batch reuse on different steps; each equals itself alone."""
    policy = AdaptiveStepCache(threshold=0.3)
    requests = [dict(SMALL, prompt="a red circle moving left on a blue background", seed=1),
                dict(SMALL, prompt="a green square moving up on a black background", seed=2, num_inference_steps=9,
                     height=32)]
    alone = [_generate(tiny, policy, monkeypatch, **r)[0] for r in requests]
    monkeypatch.setattr(tiny, "step_cache", policy)
    together = [out.frames for out in tiny.generate_batch(requests)]
    for a, b in zip(alone, together):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_cli_refuses_a_bad_cache_before_loading(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = cli.main(["generate", "--prompt", "a red circle moving left on a blue background", "--cache", "uniform:1",
                     "--output", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --cache: 'uniform:1' is not valid (step cache interval must be >= 2, got 1)" in err
    assert not (tmp_path / "x.png").exists()
