"""The Cosmos3 family: our generation model + the checkpoint's tokenizer, Wan2.2 VAE and scheduler.

Text to video, and text to image (`num_frames=1`), as diffusers' `Cosmos3OmniPipeline`
computes them: the prompt gets the pipeline's metadata sentences (duration and fps for a
video, resolution; their negations for the negative prompt), goes through the tokenizer's chat
template (with the checkpoint's system prompt unless `default_use_system_prompt` is false) and
ends with `<eos><|vision_start|>`; seeded float32 noise of the VAE's latent shape; the
checkpoint's scheduler (UniPC on flow sigmas; `use_native_flow_schedule` folders pass diffusers'
linspaced sigmas); classifier-free guidance unless `guidance_scale` is 1 (uncond + scale x
(cond - uncond), two samples per step); the fps told to the model through its time positions;
the latents de-normalised with the VAE's mean/std and decoded.

How it differs from diffusers is in how, not what: the text goes through the understanding
tower once per prompt (`Cosmos3OmniTransformer.encode_text`) and its per-layer K/V are kept
with the request (`_Condition`) for all steps, so a step runs only the vision tower; requests of
any sizes share one packed forward; the VAE runs in float32.

Not served: the model's other modes (image or video input, sound, action): a request for them
is an `InvalidRequest` naming what is supported (`RequestSpec.modes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ditserve.engine import GenerationRequest, RequestSpec
from ditserve.engine.budget import block_activation_bytes, default_max_batch_tokens
from ditserve.engine.family import GuidancePlan, Prepared, Sample
from ditserve.engine.request import standard_params
from ditserve.loading import (
    UnknownModelError,
    check_components,
    component_path,
    load_component,
    read_config,
)
from ditserve.models.cosmos3 import (
    Cosmos3OmniTransformer,
    Cosmos3Sample,
    TextKV,
    vision_position_ids,
)
from ditserve.pipelines.base import Pipeline
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.pipelines.latents import seeded_noise, video_latent_shape
from ditserve.pipelines.options import resolve_load_options
from ditserve.pipelines.schedulers import scheduler_factory
from ditserve.pipelines.wan_vae import decode_videos, latent_stats

__all__ = ["Cosmos3Pipeline"]

VAE_DTYPE = torch.float32
MAX_SIDE = 4096  # pixels per side: mRoPE has no table; the step budget bounds the rest
MAX_LATENT_FRAMES = 256  # a sanity bound (1021 frames at 4x): no table bounds time either
MODES = "text-to-video, and text-to-image with num_frames=1"
_EXPECTED_COMPONENTS = {"transformer": "Cosmos3OmniTransformer", "vae": "AutoencoderKLWan"}
# diffusers' Cosmos3OmniPipeline.__call__ defaults (Cosmos3-Nano's published recipe).
_DEFAULTS = {"height": 720, "width": 1280, "num_frames": 189, "num_inference_steps": 35, "guidance_scale": 6.0,
             "fps": 24.0}
VISION_START = "<|vision_start|>"

# The prompt metadata the model was trained with (diffusers' pipeline, verbatim strings).
_SYSTEM_PROMPT = {True: "You are a helpful assistant who will generate images from a give prompt.",
                  False: "You are a helpful assistant who will generate videos from a give prompt."}
_DURATION = {False: "The video is {duration:.1f} seconds long and is of {fps:.0f} FPS.",
             True: "The video is not {duration:.1f} seconds long and is not of {fps:.0f} FPS."}
_RESOLUTION = {(True, False): "This image is of {height}x{width} resolution.",
               (True, True): "This image is not of {height}x{width} resolution.",
               (False, False): "This video is of {height}x{width} resolution.",
               (False, True): "This video is not of {height}x{width} resolution."}


def _append(text: str, sentence: str) -> str:
    """A sentence after the text, one '. ' between (the text's own final dots dropped)."""
    text = text.rstrip(".")
    return f"{text}. {sentence}" if text else sentence


def prompt_text(request: GenerationRequest, negative: bool) -> str:
    """The prompt (or negative prompt) with the metadata sentences diffusers appends to it."""
    image = request.num_frames == 1
    text = request.negative_prompt if negative else request.prompt
    if not image:
        text = _append(text, _DURATION[negative].format(duration=request.num_frames / request.fps, fps=request.fps))
    return _append(text, _RESOLUTION[image, negative].format(height=request.height, width=request.width))


def _on_grid(value: int, multiple: int, largest: int) -> int:
    """A default moved onto the model's size grid (a custom VAE factor), within its limit."""
    return max(multiple, min(value, largest) // multiple * multiple)


def _request_spec(spatial: int, temporal: int, num_train_timesteps: int) -> RequestSpec:
    """Cosmos3's declaration: diffusers' defaults (1280x720, 189 frames, 35 steps, guidance 6, 24 fps),
    sizes in multiples of the VAE's factor (the patch grid pads itself), frames 4k+1 (the VAE's
    temporal factor), at most `num_train_timesteps` steps; `num_frames=1` is an image."""
    max_side = MAX_SIDE // spatial * spatial
    defaults = dict(_DEFAULTS, height=_on_grid(_DEFAULTS["height"], spatial, max_side),
                    width=_on_grid(_DEFAULTS["width"], spatial, max_side))
    max_frames = (MAX_LATENT_FRAMES - 1) * temporal + 1
    if (defaults["num_frames"] - 1) % temporal:
        defaults["num_frames"] = (defaults["num_frames"] - 1) // temporal * temporal + 1
    params = standard_params(
        **defaults,
        size_multiple=(spatial, spatial),
        max_size=(max_side, max_side),
        frame_multiple=temporal,
        max_frames=max_frames,
        max_steps=num_train_timesteps,
        guidance_help="classifier-free guidance scale; 1 turns guidance off (one sample per step)",
    )
    params = tuple(replace(p, help="frames per second of the video: told to the model (its prompt and its time "
                                   "positions) and written to the file") if p.name == "fps" else p for p in params)
    return RequestSpec(params, output="video", modes=MODES, cfg_param="guidance_scale")


def _check_folder(root: Path, model_index: Mapping[str, Any]) -> None:
    """Refuse folders this family does not run, before anything loads."""
    check_components(root, model_index, _EXPECTED_COMPONENTS, "Cosmos3OmniPipeline")
    if not isinstance(model_index.get("text_tokenizer"), list | tuple):
        raise UnknownModelError(f"{root / 'model_index.json'}: no text_tokenizer component; Cosmos3OmniPipeline "
                                "tokenizes the prompt with it")
    for key in ("default_use_system_prompt", "use_native_flow_schedule"):
        if not isinstance(model_index.get(key, False), bool):
            raise UnknownModelError(f"{root / 'model_index.json'}: {key} must be true or false, "
                                    f"got {model_index[key]!r}")


@dataclass(frozen=True)
class _Condition:
    """One sample's conditioning: its prompt's per-layer text K/V and its vision tokens' positions
    (which follow the prompt, so they differ between the prompt and the negative prompt)."""

    text: TextKV
    positions: Tensor  # [3, S] float32, on the device


class Cosmos3Pipeline(Pipeline):
    """Cosmos3 text to video and text to image. Build with `Pipeline.from_pretrained(path)`."""

    def __init__(
        self,
        *,
        transformer: Cosmos3OmniTransformer,
        tokenizer: Any,
        vae: torch.nn.Module,
        new_scheduler: Callable[[], Any],
        device: torch.device,
        dtype: torch.dtype,
        use_system_prompt: bool = True,
        native_flow_schedule: bool = False,
    ) -> None:
        """Components already on `device`; `new_scheduler()` returns a fresh scheduler per request.
        use_system_prompt / native_flow_schedule: the folder's `default_use_system_prompt` and
        `use_native_flow_schedule` (model_index.json)."""
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.vae = vae
        self.new_scheduler = new_scheduler
        self.device = device
        self.dtype = dtype
        self.use_system_prompt = use_system_prompt
        self.native_flow_schedule = native_flow_schedule
        vae_config = vae.config
        self.vae_spatial = int(vae_config.scale_factor_spatial)
        self.vae_temporal = int(vae_config.scale_factor_temporal)
        z_dim = int(vae_config.z_dim)
        if transformer.config.latent_channel != z_dim:
            raise PipelineConfigError(f"transformer latent_channel={transformer.config.latent_channel} does not match "
                                      f"the VAE's z_dim={z_dim}")
        self._vision_start = tokenizer.convert_tokens_to_ids(VISION_START)
        if self._vision_start is None or self._vision_start == getattr(tokenizer, "unk_token_id", None) \
                or tokenizer.eos_token_id is None:
            raise PipelineConfigError(f"the text tokenizer needs an eos token and {VISION_START} (Cosmos3 ends every "
                                      "prompt with them)")
        self._latents_mean, self._latents_inv_std = latent_stats(vae, z_dim, device)
        scheduler_config = new_scheduler().config
        self._num_train_timesteps = int(scheduler_config.num_train_timesteps)
        self.request_spec = _request_spec(self.vae_spatial, self.vae_temporal, self._num_train_timesteps)
        # tokens of the chat template and metadata sentences around an empty prompt (tokens_per_step)
        empty = GenerationRequest(prompt="", height=self.vae_spatial * 10_000, width=self.vae_spatial * 10_000,
                                  num_frames=10_000, fps=1.0)
        self._template_tokens = max(len(self._token_ids(prompt_text(empty, negative), image))
                                    for negative in (False, True) for image in (False, True))

    def denoisers(self) -> list[torch.nn.Module]:
        return [self.transformer]

    # -- the family's declaration --------------------------------------------------------------

    @classmethod
    def read_request_spec(cls, root: Path, model_index: Mapping[str, Any]) -> RequestSpec:
        _check_folder(root, model_index)
        vae = read_config(component_path(root, "vae"))
        scheduler = read_config(component_path(root, "scheduler"), "scheduler_config.json")
        return _request_spec(int(vae.get("scale_factor_spatial", 16)), int(vae.get("scale_factor_temporal", 4)),
                             int(scheduler.get("num_train_timesteps", 1000)))

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def _from_folder(cls, root: Path, model_index: Mapping[str, Any], *, device: str | torch.device | None,
                     dtype: str | torch.dtype | None, attention_backend: str | None) -> Cosmos3Pipeline:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer

        device, dtype, backend = resolve_load_options(device, dtype, attention_backend)
        _check_folder(root, model_index)
        scheduler_dir = component_path(root, "scheduler")
        new_scheduler = scheduler_factory(read_config(scheduler_dir, "scheduler_config.json"),
                                          source=scheduler_dir / "scheduler_config.json")
        transformer = load_component(
            root, "transformer", lambda config: Cosmos3OmniTransformer.from_config(config, attention_backend=backend),
            device=device, dtype=dtype, keep_float32=Cosmos3OmniTransformer._keep_in_fp32_modules)
        transformer.drop_unused_heads()
        tokenizer = AutoTokenizer.from_pretrained(component_path(root, "text_tokenizer"))
        vae = AutoencoderKLWan.from_pretrained(component_path(root, "vae"), torch_dtype=VAE_DTYPE).to(device).eval()
        return cls(transformer=transformer, tokenizer=tokenizer, vae=vae, new_scheduler=new_scheduler, device=device,
                   dtype=dtype, use_system_prompt=model_index.get("default_use_system_prompt", True),
                   native_flow_schedule=model_index.get("use_native_flow_schedule", False))

    # -- sizes ---------------------------------------------------------------------------------

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        """`(1, C, F, H, W)` of this request's latents."""
        return video_latent_shape(self.transformer.config.latent_channel, request.num_frames, request.height,
                                  request.width, temporal_factor=self.vae_temporal, spatial_factor=self.vae_spatial)

    def _grid(self, request: GenerationRequest) -> tuple[int, int, int]:
        _, _, frames, height, width = self.latent_shape(request)
        p = self.transformer.config.latent_patch_size
        return frames, -(-height // p), -(-width // p)

    @staticmethod
    def _guided(request: GenerationRequest) -> bool:
        return request.guidance_scale != 1.0  # diffusers' do_classifier_free_guidance

    def tokens_per_step(self, request: GenerationRequest) -> int:
        """Vision tokens plus the text tokens they attend to, per sample; twice with guidance.

        The text is bounded without tokenizing (this runs on the caller's thread): the template's
        tokens plus one per UTF-8 byte of the prompt, which a byte-level BPE never exceeds."""
        vision = math.prod(self._grid(request))
        text = self._template_tokens + max(len(request.prompt.encode()), len(request.negative_prompt.encode()))
        return (vision + text) * (2 if self._guided(request) else 1)

    def default_max_batch_tokens(self) -> int:
        """Tokens per step that fit in free device memory (`ditserve.engine.budget`); the SwiGLU MLP
        holds three hidden activations, not two."""
        config = self.transformer.config
        per_token = block_activation_bytes(config.hidden_size, config.intermediate_size * 3 // 2, self.dtype)
        return default_max_batch_tokens(per_token, self.device)

    # -- preparing requests ----------------------------------------------------------------------

    def _token_ids(self, text: str, image: bool) -> list[int]:
        """The chat-templated prompt's ids, then `<eos><|vision_start|>` (diffusers' tokenize_prompt)."""
        conversation = [{"role": "system", "content": _SYSTEM_PROMPT[image]}] if self.use_system_prompt else []
        conversation.append({"role": "user", "content": text})
        encoded = self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                     add_vision_id=False, return_dict=True)
        ids = encoded["input_ids"]
        ids = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        if ids and isinstance(ids[0], list):  # a batch of one
            (ids,) = ids
        return [*ids, self.tokenizer.eos_token_id, self._vision_start]

    @torch.no_grad()
    def prepare_batch(self, requests: Sequence[GenerationRequest]) -> list[Prepared]:
        """Every request's prompt (and negative prompt, with guidance) through the understanding tower
        in one packed forward; each request keeps its prompts' per-layer K/V."""
        ids = [torch.tensor(self._token_ids(prompt_text(r, negative), r.num_frames == 1))
               for r in requests for negative in ((False, True) if self._guided(r) else (False,))]
        texts = iter(self.transformer.encode_text(ids))
        return [self._prepare(r, [next(texts) for _ in range(2 if self._guided(r) else 1)]) for r in requests]

    def _prepare(self, request: GenerationRequest, texts: list[TextKV]) -> Prepared:
        latents = seeded_noise(self.latent_shape(request), request.seed, self.device, torch.float32)
        grid = self._grid(request)
        conditions = tuple(
            _Condition(text, vision_position_ids(grid, text.length, request.fps, self.transformer.config,
                                                 self.vae_temporal).to(self.device))
            for text in texts)
        scheduler = self.new_scheduler()
        steps = request.num_inference_steps
        if self.native_flow_schedule:
            sigmas = np.linspace(1.0 - 1.0 / self._num_train_timesteps, 0.0, steps + 1)[:-1]
            scheduler.set_timesteps(steps, device=self.device, sigmas=sigmas)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        scheduler.set_begin_index(0)  # spares the scheduler a device-to-host search for the current step
        timesteps = scheduler.timesteps
        plan = (GuidancePlan.classifier_free([request.guidance_scale] * len(timesteps)) if len(conditions) == 2
                else GuidancePlan.single())
        return Prepared(latents, scheduler, timesteps, conditions, plan)

    # -- one step ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, samples: Sequence[Sample], interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """One packed vision step over every sample (its own size, prompt K/V, positions and timestep)."""
        inputs = [Cosmos3Sample(latents=s.latents[0], timestep=s.timestep, text=s.condition.text,
                                positions=s.condition.positions) for s in samples]
        return [out[None].float() for out in self.transformer.forward_packed(inputs, interrupt=interrupt)]

    # -- decoding ------------------------------------------------------------------------------

    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        """Latents `[B, C, F, H, W]` of one shape -> B frame arrays `(frames, H, W, 3)` in [0, 1], in one
        VAE call (`wan_vae.decode_videos`: retried in tiles if the device runs out of memory)."""
        return decode_videos(self.vae, latents, self._latents_mean, self._latents_inv_std, self.device)
