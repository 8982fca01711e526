"""`Pipeline`: the family-agnostic entry point (`Pipeline.from_pretrained(path)`) and interface.

`Pipeline.from_pretrained` reads model_index.json and hands the folder to the family's
class named by its `_class_name`; each family (one module per family) implements
`_from_folder` and `run`. `generate` is shared: validate the request against the loaded
model's size rules, then `run` it. `generate_batch` runs several requests through the
batching engine, which needs the family's shared stages (`ditserve.engine.batching.BatchStages`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from ditserve.engine import GenerationRequest, InvalidRequest, validate_request
from ditserve.loading import UnknownModelError, read_model_index
from ditserve.pipelines.denoise import CancelToken, StepCallback
from ditserve.pipelines.result import GenerationOutput

__all__ = ["PIPELINE_CLASSES", "Pipeline", "pipeline_class_for"]

# model_index.json `_class_name` -> "module:Class"; imported only when a folder names it.
PIPELINE_CLASSES: Mapping[str, str] = MappingProxyType({"WanPipeline": "ditserve.pipelines.wan:WanPipeline"})

P = TypeVar("P", bound="Pipeline")


def pipeline_class_for(model_index: Mapping[str, Any], source: str | os.PathLike[str]) -> type[Pipeline]:
    """The ditserve pipeline class for a model_index.json (`source` names it in errors)."""
    name = model_index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        shown = "no _class_name" if name is None else f"pipeline class {name!r}"
        raise UnknownModelError(
            f"{source}: {shown} is not supported; supported pipelines: {', '.join(sorted(PIPELINE_CLASSES))}"
        )
    module, _, attr = PIPELINE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class Pipeline(ABC):
    """A loaded text-to-image/video pipeline: `generate(...)` -> `GenerationOutput`."""

    device: torch.device
    dtype: torch.dtype
    transformer: torch.nn.Module

    @classmethod
    def from_pretrained(
        cls: type[P],
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        attention_backend: str | None = None,
        compile: bool = False,
    ) -> P:
        """Load a diffusers-format folder with the ditserve class its model_index.json names.

        device: None -> cuda if available, else cpu. dtype: None -> bf16 on CUDA, float32 on
        CPU; "bf16"/"bfloat16"/"fp16"/"float16"/"fp32"/"float32" or a torch.dtype.
        attention_backend: a backend name, "auto", or None ($DITSERVE_ATTENTION_BACKEND, else auto).
        compile: torch.compile the DiT's blocks (faster steps after a one-off compile; see README).
        Called on a family class (e.g. `WanPipeline.from_pretrained`), the folder must hold that family.
        """
        root = Path(path)
        index = read_model_index(root)
        target = pipeline_class_for(index, root / "model_index.json")
        if not issubclass(target, cls):
            raise UnknownModelError(f"{root}: holds a {index.get('_class_name')}, not a {cls.__name__}")
        pipe = target._from_folder(root, index, device=device, dtype=dtype, attention_backend=attention_backend)
        if compile:
            pipe.compile()
        return pipe

    def compile(self) -> None:
        """torch.compile the denoiser's repeated blocks in place (attention stays eager)."""
        self.transformer.compile_blocks()

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

    @property
    @abstractmethod
    def size_multiples(self) -> tuple[int, int, int]:
        """(height, width, frames) multiples a request must respect (frames: 4 means 4k+1)."""

    def validate(self, prompt: Any, negative_prompt: Any = "", height: Any = 480, width: Any = 832,
                 num_frames: Any = 81, num_inference_steps: Any = 50, guidance_scale: Any = 5.0,
                 seed: Any = 0) -> GenerationRequest:
        """`ditserve.engine.validate_request` with this model's size rules."""
        h, w, f = self.size_multiples
        request = validate_request(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                                   guidance_scale, seed, height_multiple=h, width_multiple=w, frame_multiple=f)
        self.check_limits(request)
        return request

    def check_limits(self, request: GenerationRequest) -> None:
        """Model-specific bounds beyond the size multiples (raise `InvalidRequest`); none by default."""

    def generate(
        self,
        prompt: str | Sequence[str | Mapping[str, Any] | GenerationRequest],
        negative_prompt: str = "",
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int = 0,
        *,
        callback: Callable[..., None] | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationOutput | list[GenerationOutput]:
        """Generate one video (num_frames=1: one image). Raises `InvalidRequest` before any work.

        guidance_scale <= 1 turns classifier-free guidance off (one forward per step).
        callback(step_index, total_steps) runs after each denoising step (0-based index);
        cancel.is_set() is checked before each step and raises `GenerationCancelled`.

        A list as `prompt` generates a batch, step by step together (`generate_batch`), and
        returns a list of outputs in its order. Each entry is a prompt string, a dict of these
        keyword arguments, or a `GenerationRequest`; the keyword arguments given here fill what a
        string or dict entry leaves out, and entry i's seed defaults to `seed + i`.
        callback(request_index, step_index, total_steps) then names the request.
        """
        if isinstance(prompt, list | tuple):
            shared = dict(negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
            entries = [
                entry if isinstance(entry, GenerationRequest)
                else {**shared, "seed": seed + i, **(entry if isinstance(entry, Mapping) else {"prompt": entry})}
                for i, entry in enumerate(prompt)
            ]
            return self.generate_batch(entries, callback=callback, cancel=cancel)
        request = self.validate(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                                guidance_scale, seed)
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
        from ditserve.engine.batching import BatchingEngine  # the engine builds on this package

        validated = [self._validated(i, request) for i, request in enumerate(requests)]
        engine = BatchingEngine(self, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)
        futures = [
            engine.submit(request, cancel=cancel,
                          callback=None if callback is None else partial(callback, i))
            for i, request in enumerate(validated)
        ]
        engine.run_until_idle()
        return [future.result() for future in futures]

    def _validated(self, index: int, request: Mapping[str, Any] | GenerationRequest) -> GenerationRequest:
        """One entry of `generate_batch`, validated like `generate`'s arguments."""
        fields = dataclasses.asdict(request) if isinstance(request, GenerationRequest) else request
        if not isinstance(fields, Mapping):
            raise TypeError(f"requests[{index}] must be a dict of generate()'s arguments or a GenerationRequest, "
                            f"got {type(request).__name__}")
        unknown = sorted(set(fields) - set(GenerationRequest.__dataclass_fields__))
        if unknown:
            raise TypeError(f"requests[{index}] has unknown keys {unknown}; "
                            f"known: {', '.join(GenerationRequest.__dataclass_fields__)}")
        if "prompt" not in fields:
            raise TypeError(f"requests[{index}] needs a 'prompt'")
        try:
            return self.validate(**fields)
        except InvalidRequest as e:
            raise InvalidRequest(e.field, f"requests[{index}]: {e}") from None

    @abstractmethod
    def run(
        self,
        request: GenerationRequest,
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationOutput:
        """Generate from an already validated request (servers validate at admission)."""
