"""The Flux.1 family (dev and schnell): our DiT + the checkpoint's CLIP and T5 encoders, VAE and scheduler.

Text to image, as diffusers' `FluxPipeline` computes it: the prompt through CLIP (pooled) and
T5 (per token, zero-padded to 512 tokens for dev, 256 for schnell), seeded noise packed in 2x2
patches, `FlowMatchEulerDiscreteScheduler` with sigmas `linspace(1, 1/n, n)` shifted by `mu`
(dynamic shifting from the image's token count), the guidance scale given to the model as an
embedding (dev; one sample per step), no guidance for schnell, and the latents unpacked,
unscaled and decoded by the VAE. A negative prompt with `true_cfg_scale` > 1 adds diffusers'
"true" classifier-free guidance (two samples per step).

How it differs from diffusers is in how, not what: requests of any sizes share one packed
forward (each sample's text and image tokens attend only to each other), and the VAE runs on the
decoder thread, in the pipeline's dtype as diffusers runs it (float32 would cost a 1024x1024
decode gigabytes more, above diffusers' peak).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ditserve.engine import GenerationRequest, RequestSpec
from ditserve.engine.budget import block_activation_bytes, default_max_batch_tokens
from ditserve.engine.family import GuidancePlan, Prepared, Sample
from ditserve.engine.request import Param, standard_params
from ditserve.loading import check_components, component_path, load_component, read_config
from ditserve.models.flux import FluxSample, FluxTransformer2DModel
from ditserve.pipelines.base import Pipeline
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.pipelines.latents import seeded_noise
from ditserve.pipelines.options import resolve_load_options, transformers_dtype_kwargs
from ditserve.pipelines.schedulers import scheduler_factory

__all__ = ["FluxPipeline"]

log = logging.getLogger("ditserve.pipelines")

CLIP_MAX_LENGTH = 77
MAX_SIDE = 4096  # pixels per side: Flux's rotary has no table; the step budget bounds the rest
_EXPECTED_COMPONENTS = {
    "transformer": "FluxTransformer2DModel",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "T5EncoderModel",
    "vae": "AutoencoderKL",
}
# Published request defaults: FLUX.1-dev and FLUX.1-schnell model cards / diffusers' examples.
_DEFAULTS = {
    "dev": dict(num_inference_steps=28, guidance_scale=3.5, t5_tokens=512),
    "schnell": dict(num_inference_steps=4, guidance_scale=0.0, t5_tokens=256),
}


def _vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)


def _request_spec(variant: str, vae_scale: int, num_train_timesteps: int) -> RequestSpec:
    """Flux's declaration: 1024x1024 images in multiples of 16 (8x VAE x 2x2 packing), the variant's
    steps and guidance; `true_cfg_scale` for guidance with a negative prompt."""
    defaults = _DEFAULTS[variant]
    multiple = vae_scale * 2
    guidance_help = ("guidance strength, given to the model as an embedding (one sample per step)"
                     if variant == "dev" else "not used by FLUX.1-schnell (a guidance-distilled model)")
    params = standard_params(
        height=1024, width=1024, num_frames=1, num_inference_steps=defaults["num_inference_steps"],
        guidance_scale=defaults["guidance_scale"], fps=16.0, size_multiple=(multiple, multiple),
        max_size=(MAX_SIDE, MAX_SIDE), frame_multiple=1, max_frames=1, max_steps=num_train_timesteps,
        guidance_help=guidance_help,
    )
    params += (Param("true_cfg_scale", "float", 1.0, "classifier-free guidance with the negative prompt "
                     "(> 1 and a negative prompt: two samples per step)", minimum=0, maximum=100),)
    return RequestSpec(params, output="image", cfg_param="true_cfg_scale")


def _variant(transformer_config: Mapping[str, Any]) -> str:
    return "dev" if transformer_config.get("guidance_embeds", False) else "schnell"


def calculate_shift(image_tokens: int, scheduler_config: Mapping[str, Any]) -> float:
    """Flux's `mu`: the schedule's shift grows linearly with the image's token count."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * slope + base_shift - slope * base_len


@dataclass(frozen=True)
class _Condition:
    """One sample's text: T5 embeddings `[L, D]` and CLIP's pooled embedding `[P]`."""

    text: Tensor
    pooled: Tensor


@dataclass(frozen=True)
class _RequestState:
    """A request's latent grid (packed 2x2) and its position ids, and its guidance embedding input."""

    height: int  # latent rows (before packing)
    width: int
    img_ids: Tensor  # [S, 3]
    txt_ids: Tensor  # [L, 3]
    guidance: Tensor | None  # 0-d (dev)


class FluxPipeline(Pipeline):
    """FLUX.1 text to image. Build with `Pipeline.from_pretrained(path)`."""

    def __init__(
        self,
        *,
        transformer: FluxTransformer2DModel,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        vae: torch.nn.Module,
        new_scheduler: Callable[[], Any],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.vae = vae
        self.new_scheduler = new_scheduler
        self.device = device
        self.dtype = dtype
        self.vae_scale = _vae_scale_factor(vae.config)
        config = transformer.config
        latent_channels = int(vae.config.latent_channels)
        if config.in_channels != latent_channels * 4:
            raise PipelineConfigError(f"transformer in_channels={config.in_channels} is not 4 x the VAE's "
                                      f"latent_channels={latent_channels} (2x2 packing)")
        self.variant = "dev" if config.guidance_embeds else "schnell"
        self.t5_tokens = _DEFAULTS[self.variant]["t5_tokens"]
        self._scheduler_config = dict(new_scheduler().config)
        self.request_spec = _request_spec(self.variant, self.vae_scale,
                                          int(self._scheduler_config.get("num_train_timesteps", 1000)))

    def denoisers(self) -> list[torch.nn.Module]:
        return [self.transformer]

    # -- the family's declaration --------------------------------------------------------------

    @classmethod
    def read_request_spec(cls, root: Path, model_index: Mapping[str, Any]) -> RequestSpec:
        check_components(root, model_index, _EXPECTED_COMPONENTS, "FluxPipeline")
        transformer = read_config(component_path(root, "transformer"))
        vae = read_config(component_path(root, "vae"))
        scheduler = read_config(component_path(root, "scheduler"), "scheduler_config.json")
        return _request_spec(_variant(transformer), _vae_scale_factor(vae),
                             int(scheduler.get("num_train_timesteps", 1000)))

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def _from_folder(cls, root: Path, model_index: Mapping[str, Any], *, device: str | torch.device | None,
                     dtype: str | torch.dtype | None, attention_backend: str | None) -> FluxPipeline:
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        device, dtype, backend = resolve_load_options(device, dtype, attention_backend)
        check_components(root, model_index, _EXPECTED_COMPONENTS, "FluxPipeline")
        scheduler_dir = component_path(root, "scheduler")
        new_scheduler = scheduler_factory(read_config(scheduler_dir, "scheduler_config.json"),
                                          source=scheduler_dir / "scheduler_config.json")
        transformer = load_component(
            root, "transformer", lambda config: FluxTransformer2DModel.from_config(config, attention_backend=backend),
            device=device, dtype=dtype, keep_float32=FluxTransformer2DModel._keep_in_fp32_modules)
        kwargs = transformers_dtype_kwargs(dtype)
        text_encoder = CLIPTextModel.from_pretrained(component_path(root, "text_encoder"), **kwargs).to(device).eval()
        text_encoder_2 = T5EncoderModel.from_pretrained(component_path(root, "text_encoder_2"), **kwargs).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(component_path(root, "tokenizer"))
        tokenizer_2 = AutoTokenizer.from_pretrained(component_path(root, "tokenizer_2"))
        vae = AutoencoderKL.from_pretrained(component_path(root, "vae"), torch_dtype=dtype).to(device).eval()
        return cls(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, vae=vae, new_scheduler=new_scheduler,
                   device=device, dtype=dtype)

    # -- sizes ---------------------------------------------------------------------------------

    def _latent_grid(self, request: GenerationRequest) -> tuple[int, int]:
        """Latent rows and columns before 2x2 packing (diffusers' prepare_latents)."""
        return 2 * (request.height // (self.vae_scale * 2)), 2 * (request.width // (self.vae_scale * 2))

    @staticmethod
    def _true_cfg(request: GenerationRequest) -> bool:
        return request.extras.get("true_cfg_scale", 1.0) > 1.0 and bool(request.negative_prompt)

    def tokens_per_step(self, request: GenerationRequest) -> int:
        """Image tokens plus the T5 tokens they attend with, per sample; twice with true CFG."""
        h, w = self._latent_grid(request)
        return ((h // 2) * (w // 2) + self.t5_tokens) * (2 if self._true_cfg(request) else 1)

    def default_max_batch_tokens(self) -> int:
        config = self.transformer.config
        inner = config.num_attention_heads * config.attention_head_dim
        return default_max_batch_tokens(block_activation_bytes(inner, 4 * inner, self.dtype), self.device)

    # -- preparing requests ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(T5 embeddings `[N, t5_tokens, D]`, CLIP pooled `[N, P]`), both in the transformer's dtype."""
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                  return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.t5_tokens, truncation=True,
                                  return_tensors="pt").input_ids.to(self.device)
        text = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return text.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype)

    @torch.no_grad()
    def prepare_batch(self, requests: Sequence[GenerationRequest]) -> list[Prepared]:
        """Every request's prompts (and negative prompts, with true CFG) through both encoders in one batch."""
        prompts = [p for r in requests for p in ([r.prompt, r.negative_prompt] if self._true_cfg(r) else [r.prompt])]
        text, pooled = self.encode_text(prompts)
        rows = iter(range(len(prompts)))
        prepared = []
        for request in requests:
            picks = [next(rows) for _ in range(2 if self._true_cfg(request) else 1)]
            prepared.append(self._prepare(request, [_Condition(text[i], pooled[i]) for i in picks]))
        return prepared

    def _prepare(self, request: GenerationRequest, conditions: list[_Condition]) -> Prepared:
        dtype = self.transformer.dtype
        channels = self.transformer.config.in_channels // 4
        h, w = self._latent_grid(request)
        noise = seeded_noise((1, channels, h, w), request.seed, self.device, dtype)
        latents = noise.view(1, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        latents = latents.reshape(1, (h // 2) * (w // 2), channels * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(self.device, dtype)
        txt_ids = torch.zeros(self.t5_tokens, 3, device=self.device, dtype=self.text_encoder.dtype)

        scheduler = self.new_scheduler()
        steps = request.num_inference_steps
        sigmas = None if self._scheduler_config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(latents.shape[1], self._scheduler_config)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        guidance = (torch.full((), request.guidance_scale, device=self.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        plan = (GuidancePlan.classifier_free([request.extras["true_cfg_scale"]] * len(scheduler.timesteps))
                if len(conditions) == 2 else GuidancePlan.single())
        state = _RequestState(h, w, img_ids, txt_ids, guidance)
        return Prepared(latents, scheduler, scheduler.timesteps, tuple(conditions), plan, state)

    # -- one step ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, samples: Sequence[Sample], interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """One packed forward over every sample (their own sizes, prompts, timesteps and guidance)."""
        inputs = []
        for sample in samples:
            state: _RequestState = sample.prepared.state
            timestep = sample.timestep.to(sample.latents.dtype) / 1000
            inputs.append(FluxSample(latents=sample.latents[0], text=sample.condition.text,
                                     pooled=sample.condition.pooled, timestep=timestep, img_ids=state.img_ids,
                                     txt_ids=state.txt_ids, guidance=state.guidance))
        return [out[None] for out in self.transformer.forward_packed(inputs, interrupt=interrupt)]

    def final_latents(self, prepared: Prepared, latents: Tensor) -> Tensor:
        """Unpacked `[1, C, h, w]`, so the decoder groups by image size, not by token count."""
        state: _RequestState = prepared.state
        channels = latents.shape[-1] // 4
        unpacked = latents.view(1, state.height // 2, state.width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return unpacked.reshape(1, channels, state.height, state.width)

    # -- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        """Latents `[B, C, h, w]` of one size -> B frame arrays `(1, H, W, 3)` in [0, 1]."""
        config = self.vae.config
        latents = latents.to(self.device, self.vae.dtype) / config.scaling_factor + config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        image = (image / 2 + 0.5).clamp(0, 1)
        return list(image.permute(0, 2, 3, 1).float().cpu().numpy()[:, None])
