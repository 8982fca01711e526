"""`Pipeline`: the entry point (`Pipeline.from_pretrained(path)`) and what every family implements.

`Pipeline.from_pretrained` reads model_index.json and hands the folder to the family class
the registry (`ditserve.pipelines.registry`) names for it. A family implements:

- `read_request_spec(root, model_index)`: its request parameters, from the folder's configs
  alone (no weights), so the CLI and the server know them before loading;
- `_from_folder`: load the components;
- the engine's `Family` methods (`ditserve.engine.family`): `tokens_per_step`,
  `default_max_batch_tokens`, `prepare_batch`, `predict`, `decode_batch` (and `final_latents`
  when it changes the latents after the last step);
- `denoisers()`: the modules `compile()` compiles.

`generate` validates against the spec and runs the batching engine, one request or many:
the same loop the server runs.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ditserve.engine import GenerationOutput, GenerationRequest, InvalidRequest, RequestSpec
from ditserve.engine.batching import BatchingEngine
from ditserve.engine.family import CancelToken, Prepared, Sample
from ditserve.engine.step_cache import StepCachePolicy, parse_step_cache
from ditserve.loading import UnknownModelError, read_model_index
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.pipelines.options import resolve_dtype, resolve_quantize
from ditserve.pipelines.registry import family_class_for, folder_request_defaults

log = logging.getLogger(__name__)

__all__ = ["Pipeline"]

P = TypeVar("P", bound="Pipeline")


class Pipeline(ABC):
    """A loaded text-to-image/video pipeline: `generate(prompt, **params)` -> `GenerationOutput`.

    One engine run at a time per instance: the engine uses every component on its stepping
    and decoding threads, so nothing else may use them meanwhile (a server runs one engine
    over the pipeline for its whole life).
    """

    device: torch.device
    dtype: torch.dtype
    request_spec: RequestSpec
    step_cache: StepCachePolicy | None = None  # off: every step runs the DiT (`ditserve.engine.step_cache`)

    @classmethod
    def from_pretrained(
        cls: type[P],
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attention_backend: str | None = None,
        compile: bool = False,
        cache: str | float | StepCachePolicy | None = None,
        vae_dtype: str | torch.dtype | None = None,
        quantize: str | None = None,
    ) -> P:
        """Load a diffusers-format folder with the ditserve class its model_index.json names.

        device: None -> cuda if available, else cpu. dtype: None -> bf16 on CUDA, float32 on
        CPU; "bf16"/"bfloat16"/"fp16"/"float16"/"fp32"/"float32" or a torch.dtype.
        attention_backend: a backend name, "auto", or None ($DITSERVE_ATTENTION_BACKEND, else auto).
        compile: torch.compile the DiT's blocks (faster steps after a one-off compile; see README).
        cache: step caching, off by default: a threshold (e.g. 0.1), "uniform:N" or a
        `StepCachePolicy` (`ditserve.engine.step_cache`); trades measured quality for time.
        vae_dtype: None -> the family's (float32 for Wan and Cosmos3, the pipeline's dtype for
        FLUX.1, as diffusers); "bf16" is an opt-in faster decode at a measured quality cost.
        quantize: None (off) or "fp8": the DiT blocks' linear layers in FP8 e4m3 (`models.fp8`),
        on GPUs with FP8 tensor cores (refused elsewhere, before loading); trades measured quality for time.
        Called on a family class (e.g. `WanPipeline.from_pretrained`), the folder must hold that family.
        """
        policy = cache if isinstance(cache, StepCachePolicy) else parse_step_cache(cache)  # bad values fail first
        quantize = resolve_quantize(quantize, device)
        if vae_dtype is not None:
            try:
                vae_dtype = resolve_dtype(vae_dtype, torch.device("cpu"))
            except PipelineConfigError as e:
                raise PipelineConfigError(f"vae_{e}") from None
        root = Path(path)
        index = read_model_index(root)
        target = family_class_for(index, root / "model_index.json")
        if not issubclass(target, cls):
            raise UnknownModelError(f"{root}: holds a {index.get('_class_name')}, not a {cls.__name__}")
        spec = target.folder_request_spec(root, index)
        pipe = target._from_folder(root, index, device=device, dtype=dtype, attention_backend=attention_backend)
        pipe.request_spec = spec
        pipe.step_cache = policy
        if vae_dtype is not None:  # every family decodes in its VAE's dtype
            if getattr(pipe.vae, "_keep_in_fp32_modules", None):
                pipe.vae.to(vae_dtype)  # diffusers keeps those modules in float32
            else:
                torch.nn.Module.to(pipe.vae, vae_dtype)  # (diffusers' `to` warns about an empty list)
        if quantize is not None:
            pipe.quantize()
            if not compile and pipe.device.type == "cuda":  # the per-token quantization runs unfused
                log.warning("quantize=%r without compile is slower than bf16 on a GPU (its activations are quantized by "
                            "separate kernels); add compile=True / --compile (docs/performance.md)", quantize)
        if compile:
            pipe.compile()
        return pipe

    @classmethod
    def folder_request_spec(cls, root: Path, model_index: Mapping[str, Any]) -> RequestSpec:
        """The family's spec for this folder, with the folder's own defaults (`request_defaults.json`) if any."""
        spec = cls.read_request_spec(root, model_index)
        overrides = folder_request_defaults(root)
        if not overrides:
            return spec
        try:
            return spec.with_defaults(overrides)
        except ValueError as e:
            raise UnknownModelError(f"{root / 'request_defaults.json'}: {e}") from None

    # -- what a family implements ------------------------------------------------------------

    @classmethod
    @abstractmethod
    def read_request_spec(cls, root: Path, model_index: Mapping[str, Any]) -> RequestSpec:
        """The request parameters of the model in `root`, from its configs only (no weights)."""

    @classmethod
    @abstractmethod
    def _from_folder(
        cls: type[P],
        root: Path,
        model_index: Mapping[str, Any],
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        attention_backend: str | None,
    ) -> P:
        """Build the pipeline from a folder whose model_index.json names this class."""

    @abstractmethod
    def denoisers(self) -> list[torch.nn.Module]:
        """The DiT(s) a step may run (two for Wan2.2-A14B's experts)."""

    @abstractmethod
    def tokens_per_step(self, request: GenerationRequest) -> int: ...

    @abstractmethod
    def default_max_batch_tokens(self) -> int: ...

    @abstractmethod
    def prepare_batch(self, requests: Sequence[GenerationRequest]) -> list[Prepared]: ...

    def prepare(self, request: GenerationRequest) -> Prepared:
        """One request's `prepare_batch`."""
        return self.prepare_batch([request])[0]

    @abstractmethod
    def predict(self, samples: Sequence[Sample], interrupt: Callable[[], bool] | None = None) -> list[Tensor]: ...

    @abstractmethod
    def decode_batch(self, latents: Tensor) -> list[np.ndarray]: ...

    def final_latents(self, prepared: Prepared, latents: Tensor) -> Tensor:
        """The latents to decode after the last step: as they are, unless a family says otherwise."""
        return latents

    # -- shared ------------------------------------------------------------------------------

    def quantize(self) -> None:
        """Every denoiser's block linear layers in FP8 (`DiTModel.quantize_fp8`), in place; before `compile`.
        A model none of whose layers the FP8 product can take (sizes not multiples of 16) is an error."""
        if sum(module.quantize_fp8() for module in self.denoisers()) == 0:
            raise PipelineConfigError("quantize='fp8': none of this model's block linear layers has sizes the FP8 "
                                      "product takes (input and output features in multiples of 16)")

    def compile(self) -> None:
        """torch.compile every denoiser's repeated blocks in place (attention stays eager)."""
        for module in self.denoisers():
            module.compile_blocks()

    def parallelize(self, *, sample_group: Any = None, sequence: Any = None) -> None:
        """Run on several ranks of torch.distributed, every rank calling `generate` with the same requests
        (SPMD): `sample_group` divides each step's samples (CFG parallelism: cond and uncond on two
        ranks; `ditserve.engine.parallel`), `sequence` (a `ditserve.attention.parallel.SequenceParallel`:
        Ulysses, ring or both) each forward's tokens inside the DiT. Either may be None; their
        sizes multiply to the ranks used."""
        if sequence is not None:
            for module in self.denoisers():
                if not hasattr(module, "enable_sequence_parallel"):
                    raise PipelineConfigError(f"{type(module).__name__} cannot split its sequence across ranks "
                                              "(no enable_sequence_parallel); use sample (CFG) parallelism only")
                module.enable_sequence_parallel(sequence)
        if sample_group is not None:
            from ditserve.engine.parallel import SampleParallel

            self._engine_family = SampleParallel(self, sample_group)

    def validate(self, prompt: Any = None, *, image: Any = None, **params: Any) -> GenerationRequest:
        """`request_spec.validate`: the normalised request, or `InvalidRequest` before any work."""
        return self.request_spec.validate({"prompt": prompt, **params}, image=image)

    def generate(
        self,
        prompt: str | Sequence[str | Mapping[str, Any] | GenerationRequest],
        *,
        image: Any = None,
        callback: Callable[..., None] | None = None,
        cancel: CancelToken | None = None,
        **params: Any,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Generate one video or image. Raises `InvalidRequest` before any work.

        params: the model's request parameters (`request_spec`; e.g. height, width,
        num_frames, num_inference_steps, guidance_scale, seed, negative_prompt, fps, and the
        family's own); left out, the model's defaults. image: a first frame (path, bytes, PIL
        image or uint8 array) for models that take one. callback(step_index, total_steps) runs
        after each denoising step (0-based); cancel.is_set() is checked before each step and
        raises `GenerationCancelled`.

        A list as `prompt` generates a batch, step by step together (`generate_batch`), and
        returns a list of outputs in its order. Each entry is a prompt string, a dict of
        parameters (may include "image"), or a `GenerationRequest`; `params` fill what an entry
        leaves out, and entry i's seed defaults to `seed + i`.
        callback(request_index, step_index, total_steps) then names the request.
        """
        if isinstance(prompt, list | tuple):
            seed = params.pop("seed", 0)
            shared = dict(params, image=image) if image is not None else params
            entries = [
                entry if isinstance(entry, GenerationRequest)
                else {**shared, "seed": seed + i, **(entry if isinstance(entry, Mapping) else {"prompt": entry})}
                for i, entry in enumerate(prompt)
            ]
            return self.generate_batch(entries, callback=callback, cancel=cancel)
        request = self.validate(prompt, image=image, **params)
        return self.run(request, callback=callback, cancel=cancel)

    def generate_batch(
        self,
        requests: Sequence[Mapping[str, Any] | GenerationRequest],
        *,
        max_batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        callback: Callable[[int, int, int], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> list[GenerationOutput]:
        """Generate several requests at once, batched step by step (`ditserve.engine.batching`).

        Each request is a dict of `generate`'s keyword arguments (or a `GenerationRequest`);
        the outputs come back in the same order and equal what `generate` returns for each
        alone. All requests are validated before any work (an `InvalidRequest` names the
        request's index). max_batch_tokens / max_batch_size: the engine's limits (None: the
        device's default budget, no size limit). callback(request_index, step_index, total)
        runs after each step of each request; `cancel` stops them all at the next step.
        Raises the first failed request's error (e.g. `GenerationCancelled`) after all ended.
        """
        validated = [self._validated(i, request) for i, request in enumerate(requests)]
        return self._run_engine(validated, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                                callbacks=[None if callback is None else partial(callback, i)
                                           for i in range(len(validated))], cancel=cancel)

    def run(
        self,
        request: GenerationRequest,
        *,
        callback: Callable[[int, int], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationOutput:
        """Generate from an already validated request: the engine with a batch of one."""
        (output,) = self._run_engine([request], callbacks=[callback], cancel=cancel)
        return output

    def _run_engine(self, requests: list[GenerationRequest], *, callbacks: list[Callable[[int, int], None] | None],
                    cancel: CancelToken | None, max_batch_tokens: int | None = None,
                    max_batch_size: int | None = None) -> list[GenerationOutput]:
        family = getattr(self, "_engine_family", None) or self
        engine = BatchingEngine(family, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)
        try:
            futures = [engine.submit(request, cancel=cancel, callback=cb) for request, cb in zip(requests, callbacks)]
            engine.run_until_idle()
        finally:
            engine.stop(cancel=True)  # ends the decoder's thread (it holds this pipeline)
        return [future.result() for future in futures]

    def _validated(self, index: int, request: Mapping[str, Any] | GenerationRequest) -> GenerationRequest:
        """One entry of `generate_batch`, validated like `generate`'s arguments."""
        if isinstance(request, GenerationRequest):
            fields: Mapping[str, Any] = {**request.fields(), "image": request.image}
        elif isinstance(request, Mapping):
            fields = request
        else:
            raise TypeError(f"requests[{index}] must be a dict of generate()'s arguments or a GenerationRequest, "
                            f"got {type(request).__name__}")
        fields = dict(fields)
        image = fields.pop("image", None)
        if "prompt" not in fields:
            raise TypeError(f"requests[{index}] needs a 'prompt'")
        try:
            return self.request_spec.validate(fields, image=image)
        except InvalidRequest as e:
            raise InvalidRequest(e.field, f"requests[{index}]: {e}") from None
