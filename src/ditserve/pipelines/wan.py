"""Wan2.1 text-to-video: our DiT + the checkpoint's UMT5 encoder, Wan VAE and scheduler.

The math is diffusers' `WanPipeline.__call__` step for step (same prompt cleaning, 512-token
zero-padded text, noise drawn like `randn_tensor`, float32 latents, scheduler from the
checkpoint, latents de-normalised with the VAE's mean/std before decoding), so the same
seed gives the same video. Differences are in how, not what: the conditional and
unconditional branches run as one batch-2 forward, prompt and negative prompt are encoded
in one batch, and the loop never synchronises with the device.

Component dtypes: the DiT and the text encoder in `dtype` (the DiT keeps diffusers'
`_keep_in_fp32_modules` in float32, as diffusers does for any non-float32 dtype); the VAE
always in float32, as diffusers' Wan docs recommend (`AutoencoderKLWan.from_pretrained(...,
torch_dtype=torch.float32)`): its decoder is small next to the DiT and bf16 visibly bands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ditserve.engine import GenerationRequest, InvalidRequest
from ditserve.engine.budget import block_activation_bytes, default_max_batch_tokens
from ditserve.loading import UnknownModelError, component_path, load_component, read_config
from ditserve.models.wan import WanTransformer3DModel
from ditserve.pipelines.base import Pipeline
from ditserve.pipelines.denoise import CancelToken, StepCallback, denoise, guided_predictor
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.pipelines.latents import seeded_noise, video_latent_shape
from ditserve.pipelines.options import resolve_load_options
from ditserve.pipelines.result import GenerationOutput
from ditserve.pipelines.schedulers import scheduler_factory
from ditserve.pipelines.text import encode_prompts
from ditserve.pipelines.timing import StepTimer, synchronize

__all__ = ["WanPipeline"]

log = logging.getLogger("ditserve.pipelines")

MAX_SEQUENCE_LENGTH = 512  # diffusers' WanPipeline.__call__ default; Wan2.1 was trained with it
VAE_DTYPE = torch.float32

# model_index.json entries this pipeline knows how to build.
_EXPECTED_COMPONENTS = {
    "transformer": "WanTransformer3DModel",
    "text_encoder": "UMT5EncoderModel",
    "vae": "AutoencoderKLWan",
}


def _check_model_index(root: Path, index: Mapping[str, Any]) -> None:
    """Refuse Wan variants this pipeline does not run, before loading anything."""
    source = root / "model_index.json"
    for name, cls in _EXPECTED_COMPONENTS.items():
        entry = index.get(name)
        declared = entry[1] if isinstance(entry, list | tuple) and len(entry) == 2 else entry
        if declared != cls:
            raise UnknownModelError(f"{source}: component {name!r} is {declared!r}; WanPipeline needs {cls!r}")
    second = index.get("transformer_2")
    two_stage = (isinstance(second, list | tuple) and any(v is not None for v in second)) or (
        index.get("boundary_ratio") is not None
    )
    if two_stage:
        raise UnknownModelError(
            f"{source}: two-stage Wan2.2 pipelines (transformer_2 / boundary_ratio) are not supported; "
            "only single-transformer Wan2.1 text-to-video"
        )
    if index.get("expand_timesteps"):
        raise UnknownModelError(f"{source}: expand_timesteps=true (Wan2.2 TI2V) is not supported")


def _from_pretrained_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """transformers renamed `torch_dtype` to `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


class WanPipeline(Pipeline):
    """Wan2.1 text-to-video. Build with `WanPipeline.from_pretrained(path)` (or `ditserve.Pipeline`).

    One generation at a time per instance: diffusers' Wan VAE keeps a feature cache on the
    module during `decode`, so concurrent callers (a server) must serialise `run`. To run
    many requests at once use the batching engine (`generate_batch`, or
    `ditserve.engine.batching.BatchingEngine` from a server): it does every stage of every
    request on its one stepping thread, so nothing else may use this instance meanwhile.
    """

    def __init__(
        self,
        *,
        transformer: WanTransformer3DModel,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        vae: torch.nn.Module,
        new_scheduler: Callable[[], Any],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Components already on `device`; `new_scheduler()` returns a fresh scheduler per run.

        The transformer's self-attention projections are fused in place (`fuse_qkv_projections`:
        same weights, same keys, one matrix product instead of three)."""
        transformer.fuse_qkv_projections()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.new_scheduler = new_scheduler
        self.device = device
        self.dtype = dtype

        vae_config = vae.config
        self.vae_temporal = int(vae_config.scale_factor_temporal)
        self.vae_spatial = int(vae_config.scale_factor_spatial)
        z_dim = int(vae_config.z_dim)
        if transformer.config.in_channels != z_dim:
            raise PipelineConfigError(
                f"transformer in_channels={transformer.config.in_channels} does not match the VAE's z_dim={z_dim}"
            )
        d_model = getattr(text_encoder.config, "d_model", None)
        if d_model is not None and d_model != transformer.config.text_dim:
            raise PipelineConfigError(
                f"text encoder d_model={d_model} does not match the transformer's text_dim={transformer.config.text_dim}"
            )
        # diffusers: latents / (1 / std) + mean, computed in the VAE's dtype on its device
        shape = (1, z_dim, 1, 1, 1)
        self._latents_mean = torch.tensor(vae_config.latents_mean).view(shape).to(device, vae.dtype)
        self._latents_inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(shape).to(device, vae.dtype)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def _from_folder(
        cls,
        root: Path,
        model_index: Mapping[str, Any],
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        attention_backend: str | None,
    ) -> WanPipeline:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        device, dtype, backend = resolve_load_options(device, dtype, attention_backend)
        _check_model_index(root, model_index)
        scheduler_dir = component_path(root, "scheduler")
        new_scheduler = scheduler_factory(
            read_config(scheduler_dir, "scheduler_config.json"), source=scheduler_dir / "scheduler_config.json"
        )
        transformer = load_component(
            root,
            "transformer",
            lambda config: WanTransformer3DModel.from_config(config, attention_backend=backend),
            device=device,
            dtype=dtype,
            keep_float32=WanTransformer3DModel._keep_in_fp32_modules,
        )
        tokenizer = AutoTokenizer.from_pretrained(component_path(root, "tokenizer"))
        text_encoder = UMT5EncoderModel.from_pretrained(
            component_path(root, "text_encoder"), **_from_pretrained_kwargs(dtype)
        ).to(device).eval()
        vae = AutoencoderKLWan.from_pretrained(component_path(root, "vae"), torch_dtype=VAE_DTYPE).to(device).eval()
        return cls(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                   new_scheduler=new_scheduler, device=device, dtype=dtype)

    # -- request rules ---------------------------------------------------------------------

    @property
    def size_multiples(self) -> tuple[int, int, int]:
        _, ph, pw = self.transformer.config.patch_size
        return self.vae_spatial * ph, self.vae_spatial * pw, self.vae_temporal

    def check_limits(self, request: GenerationRequest) -> None:
        """The DiT's rotary table covers rope_max_seq_len patches per axis."""
        limit = self.transformer.config.rope_max_seq_len
        mult_h, mult_w, _ = self.size_multiples
        pt = self.transformer.config.patch_size[0]
        for field, value, largest in (
            ("height", request.height, limit * mult_h),
            ("width", request.width, limit * mult_w),
        ):
            if value > largest:
                raise InvalidRequest(field, f"{field} must be at most {largest} for this model, got {value}")
        latent_frames = (request.num_frames - 1) // self.vae_temporal + 1
        if latent_frames // pt > limit:
            raise InvalidRequest("num_frames", f"num_frames={request.num_frames} is too long for this model "
                                 f"(at most {(limit * pt - 1) * self.vae_temporal + 1})")

    # -- stages ----------------------------------------------------------------------------

    def encode_text(self, request: GenerationRequest, guided: bool) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond or None) text embeddings `[1, 512, text_dim]` in the DiT's dtype."""
        prompts = [request.prompt, request.negative_prompt] if guided else [request.prompt]
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts,
                                max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device)
        embeds = embeds.to(self.text_encoder.dtype).to(self.transformer.dtype)
        return embeds[:1], (embeds[1:] if guided else None)

    def _model_call(self, latents: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
        return self.transformer(latents.to(self.transformer.dtype), timesteps, text, return_dict=False)[0]

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        """`(1, C, F, H, W)` of this request's latents."""
        return video_latent_shape(self.transformer.config.in_channels, request.num_frames, request.height,
                                  request.width, temporal_factor=self.vae_temporal, spatial_factor=self.vae_spatial)

    def initial_latents(self, request: GenerationRequest) -> Tensor:
        """The seeded starting noise (float32), the same whether the request runs alone or batched."""
        return seeded_noise(self.latent_shape(request), request.seed, self.device, torch.float32)

    # -- what the batching engine needs (`ditserve.engine.batching.BatchStages`) -------------

    def tokens_per_sample(self, request: GenerationRequest) -> int:
        """DiT tokens (patches) of one sample of this request."""
        _, _, frames, height, width = self.latent_shape(request)
        pt, ph, pw = self.transformer.config.patch_size
        return (frames // pt) * (height // ph) * (width // pw)

    def default_max_batch_tokens(self) -> int:
        """Tokens per batched step that fit in free device memory (`ditserve.engine.budget`)."""
        config = self.transformer.config
        per_token = block_activation_bytes(config.inner_dim, config.ffn_dim, self.dtype)
        return default_max_batch_tokens(per_token, self.device)

    def predict_packed(self, latents: list[Tensor], timesteps: Tensor, text: list[Tensor]) -> list[Tensor]:
        """One DiT forward over samples of any sizes (`WanTransformer3DModel.forward_packed`)."""
        return self.transformer.forward_packed(latents, timesteps, text)

    def decode(self, latents: Tensor) -> np.ndarray:
        """Latents `[1, C, F, H, W]` -> float32 frames (F, H, W, 3) in [0, 1] on the host."""
        return self.decode_batch(latents)[0]

    @torch.no_grad()
    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        """Latents `[B, C, F, H, W]` of one shape -> B frame arrays, in one VAE call.

        If the VAE runs out of device memory (a large video on a small GPU), the decode is
        retried once in spatial tiles (diffusers' `enable_tiling`: overlapping tiles blended
        at the seams, a fraction of the memory); outputs differ slightly only at tile seams.
        """
        latents = latents.to(self.device, VAE_DTYPE)
        latents = latents / self._latents_inv_std + self._latents_mean
        try:
            video = self.vae.decode(latents, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        except torch.OutOfMemoryError:
            if getattr(self.vae, "use_tiling", True):
                raise
            log.warning("VAE decode of latents %s ran out of device memory; retrying in tiles", tuple(latents.shape))
            if latents.is_cuda:
                torch.cuda.empty_cache()
            self.vae.enable_tiling()
            try:
                video = self.vae.decode(latents, return_dict=False)[0]
            finally:
                self.vae.disable_tiling()
        video = (video * 0.5 + 0.5).clamp(0, 1)
        return list(video.permute(0, 2, 3, 4, 1).float().cpu().numpy())

    # -- one generation --------------------------------------------------------------------

    def run(
        self,
        request: GenerationRequest,
        *,
        callback: StepCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationOutput:
        guided = request.guidance_scale > 1.0  # diffusers' do_classifier_free_guidance
        with torch.no_grad():
            start = time.perf_counter()
            cond, uncond = self.encode_text(request, guided)
            synchronize(self.device)
            encoded = time.perf_counter()

            latents = self.initial_latents(request)
            timer = StepTimer(self.device)
            latents = denoise(
                self.new_scheduler(),
                latents,
                guided_predictor(self._model_call, cond, uncond, request.guidance_scale),
                num_inference_steps=request.num_inference_steps,
                device=self.device,
                callback=callback,
                cancel=cancel,
                timer=timer,
            )
            synchronize(self.device)
            denoised = time.perf_counter()

            frames = self.decode(latents)
            decoded = time.perf_counter()

        per_step = timer.per_step_s()
        timings: dict[str, float | list[float]] = {
            "text_encode_s": encoded - start,
            "denoise_s": denoised - encoded,
            "per_step_s": per_step,
            "step_mean_s": sum(per_step) / len(per_step) if per_step else 0.0,
            "decode_s": decoded - denoised,
            "total_s": decoded - start,
        }
        return GenerationOutput(frames=frames, seed=request.seed, timings=timings)
