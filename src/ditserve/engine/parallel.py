"""Sample parallelism: the samples of a step (a request's cond and uncond, or several requests)
split across the ranks of a torch.distributed group, every rank getting every prediction back.

With classifier-free guidance a step holds two samples per request; on two ranks each computes
one and they exchange predictions, so a step costs about one sample's forward (CFG parallelism).
Every rank runs the same engine on the same requests (SPMD): requests are prepared, stepped and
decoded identically everywhere, and only the forwards are divided. Sample i runs on rank i mod P.
Combined with sequence parallelism inside the model (`enable_sequence_parallel`), the sample
group and the sequence group are different groups of one world (e.g. 2 x 2 on four GPUs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ditserve.engine.family import Family, Prepared, Sample
from ditserve.engine.request import GenerationRequest, RequestSpec
from ditserve.engine.step_cache import StepCachePolicy

__all__ = ["SampleParallel"]


class SampleParallel:
    """A `Family` whose `predict` divides the samples among the ranks of `group`; everything else is
    the wrapped family's."""

    def __init__(self, family: Family, group: dist.ProcessGroup | None = None) -> None:
        self.family = family
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # -- the wrapped family's, unchanged ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.dtype

    @property
    def request_spec(self) -> RequestSpec:
        return self.family.request_spec

    @property
    def step_cache(self) -> StepCachePolicy | None:
        return getattr(self.family, "step_cache", None)

    def tokens_per_step(self, request: GenerationRequest) -> int:
        return self.family.tokens_per_step(request)

    def default_max_batch_tokens(self) -> int:
        return self.family.default_max_batch_tokens()

    def prepare_batch(self, requests: Sequence[GenerationRequest]) -> list[Prepared]:
        return self.family.prepare_batch(requests)

    def final_latents(self, prepared: Prepared, latents: Tensor) -> Tensor:
        return self.family.final_latents(prepared, latents)

    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        return self.family.decode_batch(latents)

    # -- divided among the ranks ------------------------------------------------------------------

    def predict(self, samples: Sequence[Sample], interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """Each rank its samples, then every prediction to every rank. `interrupt` is not passed on: ranks
        must never leave a step at different blocks (their cancel tokens are their own)."""
        mine = [i for i in range(len(samples)) if i % self.world == self.rank]
        local = self.family.predict([samples[i] for i in mine]) if mine else []
        # predictions come in the model's dtype; a rank with no sample this step knows it from the family
        dtype = local[0].dtype if local else self.family.dtype
        preds: list[Tensor] = []
        owned = dict(zip(mine, local))
        for i, sample in enumerate(samples):
            pred = owned.get(i)
            buffer = pred.contiguous() if pred is not None else torch.empty_like(sample.latents, dtype=dtype)
            owner = i % self.world
            dist.broadcast(buffer, src=dist.get_global_rank(self.group, owner) if self.group else owner,
                           group=self.group)
            preds.append(buffer)
        return preds
