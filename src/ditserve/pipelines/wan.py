"""The Wan family (Wan2.1 and Wan2.2): our DiT(s) + the checkpoint's UMT5 encoder, Wan VAE and scheduler.

One class runs every text-to-video Wan folder diffusers' `WanPipeline` runs, told apart by
model_index.json:
- Wan2.1 T2V: one transformer.
- Wan2.2 T2V-A14B: `transformer` (high noise) and `transformer_2` (low noise), switched at
  `boundary_ratio * num_train_timesteps`; `guidance_scale` for the first, `guidance_scale_2`
  for the second.
- Wan2.2 TI2V-5B: `expand_timesteps` (per-token timesteps), the 48-channel Wan2.2 VAE; text
  to video, or image to video from a first frame as diffusers' `WanImageToVideoPipeline`
  does it (the frame's latents replace the first latent frame at every step, at timestep 0).

The math is diffusers' step for step (same prompt cleaning, 512-token zero-padded text,
noise drawn like `randn_tensor`, float32 latents, scheduler from the checkpoint, latents
de-normalised with the VAE's mean/std before decoding), so the same seed gives the same
video. Differences are in how, not what: cond and uncond run in one forward, requests of
any sizes share packed forwards (`WanTransformer3DModel.forward_packed`), and the loop never
synchronises with the device.

Component dtypes: the DiT(s) and the text encoder in `dtype` (the DiT keeps diffusers'
`_keep_in_fp32_modules` in float32); the VAE always in float32, as diffusers' Wan docs
recommend: its decoder is small next to the DiT and bf16 visibly bands.
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
from ditserve.engine.request import standard_params, Param
from ditserve.loading import UnknownModelError, check_components, component_path, declared_class, load_component, read_config
from ditserve.models.wan import WanTransformer3DModel
from ditserve.pipelines.base import Pipeline
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.pipelines.latents import seeded_noise, video_latent_shape
from ditserve.pipelines.options import resolve_load_options, transformers_dtype_kwargs
from ditserve.pipelines.schedulers import scheduler_factory
from ditserve.pipelines.text import encode_prompts
from ditserve.pipelines.wan_vae import decode_videos, latent_stats

__all__ = ["WanPipeline"]

log = logging.getLogger("ditserve.pipelines")

MAX_SEQUENCE_LENGTH = 512  # diffusers' WanPipeline.__call__ default; Wan was trained with it
VAE_DTYPE = torch.float32

# model_index.json entries this pipeline knows how to build.
_EXPECTED_COMPONENTS = {
    "transformer": "WanTransformer3DModel",
    "text_encoder": "UMT5EncoderModel",
    "vae": "AutoencoderKLWan",
}


@dataclass(frozen=True)
class _Variant:
    """Which Wan this folder holds, from model_index.json alone."""

    two_experts: bool  # Wan2.2-A14B: transformer_2 and boundary_ratio
    boundary_ratio: float | None
    expand_timesteps: bool  # Wan2.2-TI2V: per-token timesteps, image input


# Published request defaults per variant (diffusers' docs and the model cards).
_DEFAULTS = {
    "wan2.1": dict(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0, fps=16.0),
    "wan2.2-a14b": dict(height=720, width=1280, num_frames=81, num_inference_steps=40, guidance_scale=4.0, fps=16.0),
    "wan2.2-ti2v": dict(height=704, width=1280, num_frames=121, num_inference_steps=50, guidance_scale=5.0,
                        fps=24.0),
}
_A14B_GUIDANCE_2 = 3.0
# Device memory kept free for activations, the VAE and the text encoder when deciding whether both
# experts can stay resident (a share of the device's total memory).
EXPERT_HEADROOM_FRACTION = 0.25


def _variant(root: Path, index: Mapping[str, Any]) -> _Variant:
    """Refuse Wan folders this pipeline does not run, before loading anything."""
    source = root / "model_index.json"
    check_components(root, index, _EXPECTED_COMPONENTS, "WanPipeline")
    if declared_class(index.get("image_encoder")) is not None:
        raise UnknownModelError(f"{source}: Wan2.1 image-to-video (image_encoder) is not supported; "
                                "supported: Wan2.1 T2V, Wan2.2 T2V-A14B and TI2V-5B")
    second = declared_class(index.get("transformer_2"))
    ratio = index.get("boundary_ratio")
    if (second is None) != (ratio is None):
        raise UnknownModelError(f"{source}: transformer_2 and boundary_ratio come together (Wan2.2-A14B); "
                                f"got transformer_2={second!r}, boundary_ratio={ratio!r}")
    if second is not None and second != "WanTransformer3DModel":
        raise UnknownModelError(f"{source}: transformer_2 is {second!r}; WanPipeline needs 'WanTransformer3DModel'")
    if ratio is not None and not (isinstance(ratio, int | float) and 0 < ratio < 1):
        raise UnknownModelError(f"{source}: boundary_ratio must be a number in (0, 1), got {ratio!r}")
    return _Variant(second is not None, None if ratio is None else float(ratio), bool(index.get("expand_timesteps")))


def should_offload_second_expert(free_bytes: int, total_bytes: int, expert_bytes: int) -> bool:
    """True when the second expert would not fit beside the first with `EXPERT_HEADROOM_FRACTION` of
    the device left over: then only the expert in use is kept on the device."""
    return free_bytes - expert_bytes < EXPERT_HEADROOM_FRACTION * total_bytes


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class _Experts:
    """The DiT(s) of a step, and which are on the device: all (the default), or, with `offload`, only the
    one in use (the other waits in host memory; switching experts moves the weights, once per switch)."""

    def __init__(self, models: Sequence[WanTransformer3DModel], device: torch.device, offload: bool) -> None:
        self.models = list(models)
        self.device = device
        self.offload = offload and len(self.models) > 1
        self.resident = 0
        self.swaps = 0
        if self.offload:
            for model in self.models[1:]:
                model.to("cpu")

    def use(self, index: int) -> WanTransformer3DModel:
        if self.offload and index != self.resident:
            self.models[self.resident].to("cpu")
            self.models[index].to(self.device)
            self.resident = index
            self.swaps += 1
        return self.models[index]

    def order(self, wanted: set[int]) -> list[int]:
        """Experts a step needs, the resident one first (so a mixed step swaps once, not twice)."""
        return sorted(wanted, key=lambda i: (i != self.resident, i))

    def keep_all_if_they_fit(self, free_bytes: int, total_bytes: int) -> bool:
        """Stop offloading when the experts now fit side by side (e.g. after FP8 halved them); True if so."""
        if not self.offload or should_offload_second_expert(free_bytes, total_bytes, _module_bytes(self.models[self.resident])):
            return False
        for model in self.models:
            model.to(self.device)
        self.offload = False
        return True


def _request_spec(variant: _Variant, patch_size: tuple[int, ...], rope_max_seq_len: int, spatial: int, temporal: int,
                  num_train_timesteps: int) -> RequestSpec:
    """The Wan family's declaration: published defaults per variant, limits from the DiT's rotary table
    (patches per axis), sizes in multiples of the VAE's factor times the patch, 4k+1 frames."""
    pt, ph, pw = patch_size
    name = "wan2.2-ti2v" if variant.expand_timesteps else "wan2.2-a14b" if variant.two_experts else "wan2.1"
    defaults = dict(_DEFAULTS[name])
    max_size = (rope_max_seq_len * spatial * ph, rope_max_seq_len * spatial * pw)
    # a small custom DiT (rope table shorter than the published size): default to the largest it takes
    defaults["height"], defaults["width"] = min(defaults["height"], max_size[0]), min(defaults["width"], max_size[1])
    guidance_help = ("classifier-free guidance scale; <= 1 turns guidance off (one sample per step)"
                     + (" (high-noise expert)" if variant.two_experts else ""))
    params = standard_params(
        **defaults,
        size_multiple=(spatial * ph, spatial * pw),
        max_size=max_size,
        frame_multiple=temporal,
        max_frames=(rope_max_seq_len * pt - 1) * temporal + 1,
        max_steps=num_train_timesteps,
        guidance_help=guidance_help,
    )
    if variant.two_experts:
        params += (Param("guidance_scale_2", "float", _A14B_GUIDANCE_2,
                         "guidance scale of the low-noise expert (null: the same as guidance_scale)",
                         minimum=0, maximum=100, nullable=True),)
    return RequestSpec(params, output="video", takes_image=variant.expand_timesteps, cfg_param="guidance_scale")


@dataclass(frozen=True)
class _Condition:
    """One sample's conditioning: its text embeddings `[L, text_dim]` in the DiT's dtype."""

    text: Tensor


@dataclass(frozen=True)
class _RequestState:
    """What a Wan request keeps besides its latents: which expert runs each step, and its first frame."""

    experts: tuple[int, ...]  # per step: 0 = transformer, 1 = transformer_2
    first_frame: Tensor | None  # TI2V image-to-video: the image's normalised latents [1, C, 1, H, W]
    keep_mask: Tensor | None  # 1 where the latents are denoised, 0 on the given first frame


class WanPipeline(Pipeline):
    """Wan2.1 / Wan2.2 text-to-video (and TI2V image-to-video). Build with `Pipeline.from_pretrained(path)`."""

    def __init__(
        self,
        *,
        transformers: Sequence[WanTransformer3DModel],
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        vae: torch.nn.Module,
        new_scheduler: Callable[[], Any],
        device: torch.device,
        dtype: torch.dtype,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        offload_experts: bool = False,
    ) -> None:
        """Components already on `device`; `new_scheduler()` returns a fresh scheduler per request.

        transformers: one DiT, or two (high-noise, low-noise) with `boundary_ratio`. Their
        self-attention projections are fused in place (same weights and keys, one matrix product).
        offload_experts: keep only the expert in use on the device (for a device that cannot hold
        both; `from_pretrained` decides it from free memory).
        """
        if len(transformers) not in (1, 2) or (len(transformers) == 2) != (boundary_ratio is not None):
            raise PipelineConfigError("a Wan pipeline has one transformer, or two with a boundary_ratio")
        for transformer in transformers:
            transformer.fuse_qkv_projections()
        self.transformers = list(transformers)
        self.residency = _Experts(self.transformers, device, offload_experts)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.new_scheduler = new_scheduler
        self.device = device
        self.dtype = dtype
        self.boundary_ratio = boundary_ratio
        self.expand_timesteps = expand_timesteps

        vae_config = vae.config
        self.vae_temporal = int(vae_config.scale_factor_temporal)
        self.vae_spatial = int(vae_config.scale_factor_spatial)
        z_dim = int(vae_config.z_dim)
        first = transformers[0].config
        for transformer in transformers:
            if transformer.config.in_channels != z_dim:
                raise PipelineConfigError(f"transformer in_channels={transformer.config.in_channels} does not match "
                                          f"the VAE's z_dim={z_dim}")
            if transformer.config.patch_size != first.patch_size:
                raise PipelineConfigError("both experts must use one patch size")
        d_model = getattr(text_encoder.config, "d_model", None)
        if d_model is not None and d_model != first.text_dim:
            raise PipelineConfigError(
                f"text encoder d_model={d_model} does not match the transformer's text_dim={first.text_dim}"
            )
        self._latents_mean, self._latents_inv_std = latent_stats(vae, z_dim, device)
        self._image_processor: Any = None
        # from the components' configs; `from_pretrained` replaces it with the folder's (its defaults file)
        self.request_spec = _request_spec(
            _Variant(len(transformers) == 2, boundary_ratio, expand_timesteps), tuple(first.patch_size),
            first.rope_max_seq_len, self.vae_spatial, self.vae_temporal,
            int(new_scheduler().config.num_train_timesteps))

    @property
    def transformer(self) -> WanTransformer3DModel:
        """The (first, high-noise) DiT."""
        return self.transformers[0]

    def denoisers(self) -> list[torch.nn.Module]:
        return list(self.transformers)

    def quantize(self) -> None:
        """As every family; then Wan2.2-A14B's experts, offloaded at load because two bf16 experts did not fit,
        go back on the device together if their FP8 weights now do."""
        super().quantize()
        if self.residency.offload and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if self.residency.keep_all_if_they_fit(free, total):
                log.info("both experts fit on %s in FP8: both kept there (no switching)", self.device)

    # -- the family's declaration --------------------------------------------------------------

    @classmethod
    def read_request_spec(cls, root: Path, model_index: Mapping[str, Any]) -> RequestSpec:
        transformer = read_config(component_path(root, "transformer"))
        vae = read_config(component_path(root, "vae"))
        scheduler = read_config(component_path(root, "scheduler"), "scheduler_config.json")
        return _request_spec(_variant(root, model_index), tuple(transformer.get("patch_size", (1, 2, 2))),
                             int(transformer.get("rope_max_seq_len", 1024)), int(vae.get("scale_factor_spatial", 8)),
                             int(vae.get("scale_factor_temporal", 4)), int(scheduler.get("num_train_timesteps", 1000)))

    # -- loading -----------------------------------------------------------------------------

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
        variant = _variant(root, model_index)
        scheduler_dir = component_path(root, "scheduler")
        new_scheduler = scheduler_factory(
            read_config(scheduler_dir, "scheduler_config.json"), source=scheduler_dir / "scheduler_config.json"
        )
        transformers: list[WanTransformer3DModel] = []
        offload = False
        for name in ("transformer", "transformer_2") if variant.two_experts else ("transformer",):
            if transformers and device.type == "cuda":  # does the second expert fit beside the first?
                free, total = torch.cuda.mem_get_info(device)
                offload = should_offload_second_expert(free, total, _module_bytes(transformers[0]))
                if offload:
                    log.warning("%s: both experts do not fit on %s with room to run; keeping only the expert "
                                "in use there (each switch moves %.1f GiB)", root, device,
                                _module_bytes(transformers[0]) / 2**30)
            transformers.append(load_component(
                root,
                name,
                lambda config: WanTransformer3DModel.from_config(config, attention_backend=backend),
                device=torch.device("cpu") if offload else device,
                dtype=dtype,
                keep_float32=WanTransformer3DModel._keep_in_fp32_modules,
            ))
        tokenizer = AutoTokenizer.from_pretrained(component_path(root, "tokenizer"))
        text_encoder = UMT5EncoderModel.from_pretrained(
            component_path(root, "text_encoder"), **transformers_dtype_kwargs(dtype)
        ).to(device).eval()
        vae = AutoencoderKLWan.from_pretrained(component_path(root, "vae"), torch_dtype=VAE_DTYPE).to(device).eval()
        return cls(transformers=transformers, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                   new_scheduler=new_scheduler, device=device, dtype=dtype, boundary_ratio=variant.boundary_ratio,
                   expand_timesteps=variant.expand_timesteps, offload_experts=offload)

    # -- sizes -------------------------------------------------------------------------------

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        """`(1, C, F, H, W)` of this request's latents."""
        return video_latent_shape(self.transformer.config.in_channels, request.num_frames, request.height,
                                  request.width, temporal_factor=self.vae_temporal, spatial_factor=self.vae_spatial)

    def tokens_per_step(self, request: GenerationRequest) -> int:
        """Patch tokens of one sample, times two with classifier-free guidance."""
        _, _, frames, height, width = self.latent_shape(request)
        pt, ph, pw = self.transformer.config.patch_size
        return (frames // pt) * (height // ph) * (width // pw) * (2 if self._guided(request) else 1)

    def default_max_batch_tokens(self) -> int:
        """Tokens per step that fit in free device memory (`ditserve.engine.budget`)."""
        per_token = max(block_activation_bytes(t.config.inner_dim, t.config.ffn_dim, self.dtype)
                        for t in self.transformers)
        return default_max_batch_tokens(per_token, self.device)

    # -- preparing a request -----------------------------------------------------------------

    @staticmethod
    def _guided(request: GenerationRequest) -> bool:
        return request.guidance_scale > 1.0  # diffusers' do_classifier_free_guidance

    def encode_text(self, prompts: list[str]) -> Tensor:
        """Text embeddings `[len(prompts), 512, text_dim]` in the DiT's dtype."""
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts,
                                max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device)
        return embeds.to(self.text_encoder.dtype).to(self.transformer.dtype)

    @torch.no_grad()
    def prepare_batch(self, requests: Sequence[GenerationRequest]) -> list[Prepared]:
        """All the requests' prompts (and negative prompts) through the text encoder in one batch."""
        prompts = [p for r in requests for p in ([r.prompt, r.negative_prompt] if self._guided(r) else [r.prompt])]
        embeds = iter(self.encode_text(prompts))
        return [self._prepare(r, [next(embeds) for _ in range(2 if self._guided(r) else 1)]) for r in requests]

    def _prepare(self, request: GenerationRequest, embeds: list[Tensor]) -> Prepared:
        guided = self._guided(request)
        latents = seeded_noise(self.latent_shape(request), request.seed, self.device, torch.float32)
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)  # spares the scheduler a device-to-host search for the current step
        timesteps = scheduler.timesteps
        experts = self._experts(scheduler, timesteps)
        if guided:
            second = request.extras.get("guidance_scale_2")
            scales = [request.guidance_scale if e == 0 or second is None else second for e in experts]
            plan = GuidancePlan.classifier_free(scales)
        else:
            plan = GuidancePlan.single()
        first_frame = keep = None
        if request.image is not None:
            first_frame, keep = self._encode_first_frame(request, latents.shape)
        state = _RequestState(experts, first_frame, keep)
        conditions = tuple(_Condition(e) for e in embeds)
        return Prepared(latents, scheduler, timesteps, conditions, plan, state)

    def _experts(self, scheduler: Any, timesteps: Tensor) -> tuple[int, ...]:
        """Which expert runs each step (diffusers: `transformer` while t >= boundary, then `transformer_2`).

        Read once per request at admission (a few numbers), never inside the loop."""
        if self.boundary_ratio is None:
            return (0,) * len(timesteps)
        boundary = self.boundary_ratio * scheduler.config.num_train_timesteps
        return tuple(0 if t >= boundary else 1 for t in timesteps.cpu().tolist())

    def _encode_first_frame(self, request: GenerationRequest, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """The image resized to the request (diffusers' VideoProcessor), encoded by the VAE (its mode),
        normalised; and the mask that keeps it in the first latent frame."""
        from diffusers.video_processor import VideoProcessor
        from PIL import Image

        if self._image_processor is None:
            self._image_processor = VideoProcessor(vae_scale_factor=self.vae_spatial)
        pixels = self._image_processor.preprocess(Image.fromarray(request.image), height=request.height,
                                                  width=request.width).to(self.device, torch.float32)
        encoded = self.vae.encode(pixels.unsqueeze(2).to(self.vae.dtype)).latent_dist.mode()
        first = ((encoded.to(torch.float32) - self._latents_mean.float()) * self._latents_inv_std.float())
        keep = torch.ones(1, 1, *shape[2:], dtype=torch.float32, device=self.device)
        keep[:, :, 0] = 0
        return first, keep

    # -- one step ----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, samples: Sequence[Sample], interrupt: Callable[[], bool] | None = None) -> list[Tensor]:
        """One packed forward per expert in use this step (requests at different steps may need both)."""
        preds: list[Tensor | None] = [None] * len(samples)
        by_expert: dict[int, list[int]] = {}
        for i, sample in enumerate(samples):
            by_expert.setdefault(sample.prepared.state.experts[sample.step], []).append(i)
        for expert in self.residency.order(set(by_expert)):
            positions = by_expert[expert]
            model = self.residency.use(expert)
            latents, timesteps, texts = [], [], []
            for i in positions:
                x, t = self._model_input(samples[i])
                latents.append(x[0].to(model.dtype))
                timesteps.append(t)
                texts.append(samples[i].condition.text)
            for i, out in zip(positions, model.forward_packed(latents, timesteps, texts, interrupt=interrupt)):
                preds[i] = out[None]
        return preds  # type: ignore[return-value]

    def _model_input(self, sample: Sample) -> tuple[Tensor, Tensor]:
        """(latents, timestep): with a given first frame, that frame's latents at timestep 0 (per token)."""
        state: _RequestState = sample.prepared.state
        if state.first_frame is None:
            return sample.latents, sample.timestep
        keep = state.keep_mask
        x = (1 - keep) * state.first_frame + keep * sample.latents
        _, ph, pw = self.transformer.config.patch_size
        per_token = (keep[0, 0][:, ::ph, ::pw] * sample.timestep).flatten()
        return x, per_token

    def final_latents(self, prepared: Prepared, latents: Tensor) -> Tensor:
        state: _RequestState = prepared.state
        if state.first_frame is None:
            return latents
        return (1 - state.keep_mask) * state.first_frame + state.keep_mask * latents

    # -- decoding ----------------------------------------------------------------------------

    def decode_batch(self, latents: Tensor) -> list[np.ndarray]:
        """Latents `[B, C, F, H, W]` of one shape -> B frame arrays `(frames, H, W, 3)` in [0, 1], in one
        VAE call (`wan_vae.decode_videos`: retried in tiles if the device runs out of memory)."""
        return decode_videos(self.vae, latents, self._latents_mean, self._latents_inv_std, self.device)
