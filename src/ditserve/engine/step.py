"""`advance`: one denoising step of several requests, the function every rank runs the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ditserve.engine.family import Family, Prepared, Sample

__all__ = ["advance"]


def advance(family: Family, steps: Sequence[tuple[Prepared, Tensor, int]],
            interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
    """One step of several requests `(prepared, latents, step index)`: their samples through the
    family, each request's predictions combined by its guidance plan, then its own scheduler step.
    Returns the new latents, in order. Raises what `predict` raises (e.g. `StepInterrupted`).

    With the family's `step_cache` policy set (`ditserve.engine.step_cache`), a request whose
    cache says so takes its previous prediction instead: its samples skip the DiT this step.
    """
    policy = getattr(family, "step_cache", None)
    if policy is not None:
        for prepared, _, _ in steps:
            if prepared.cache is None:
                prepared.cache = policy.new_state(len(prepared.timesteps))
    reused = [prepared.cache is not None and prepared.cache.reuse(step) for prepared, _, step in steps]
    samples = [Sample(latents, prepared.timesteps[step], step, condition, prepared)
               for (prepared, latents, step), reuse in zip(steps, reused) if not reuse
               for condition in prepared.conditions]
    preds = family.predict(samples, interrupt) if samples else []
    if len(preds) != len(samples):
        raise RuntimeError(f"the family returned {len(preds)} predictions for {len(samples)} samples")
    stepped, index = [], 0
    for (prepared, latents, step), reuse in zip(steps, reused):
        plan = prepared.guidance
        if reuse:
            pred = prepared.cache.forecast(step)
        else:
            pred = plan.combine(preds[index:index + plan.samples], step)
            index += plan.samples
        if prepared.cache is not None:
            prepared.cache.record(pred, step, reuse)
        stepped.append(prepared.scheduler.step(pred, prepared.timesteps[step], latents, return_dict=False)[0])
    return stepped
