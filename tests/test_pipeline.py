"""ditserve.Pipeline / WanPipeline against diffusers' WanPipeline on the tiny random Wan2.1 folder,
plus request validation (ditserve.engine) and cancellation.

Tolerance: frames agree to ~3e-7 in float32 on the CPU, so parity is checked at 1e-5. A
looser bound would not catch much on this tiny random model: changing the negative prompt
or turning guidance off moves its frames by only ~1e-4 (see test_prompt_and_guidance_matter).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ditserve
from ditserve.engine import GenerationRequest, InvalidRequest, Param, RequestSpec
from ditserve.engine.request import standard_params
from ditserve.loading import PipelineFolderError, UnknownModelError
from ditserve.models.wan import WanTransformer3DModel
from ditserve.pipelines import GenerationCancelled, GenerationOutput, PipelineConfigError
from ditserve.pipelines.wan import WanPipeline
from ditserve.pipelines.options import resolve_device, resolve_dtype, resolve_load_options
from helpers.checkpoints import build_tiny_wan_pipeline

diffusers = pytest.importorskip("diffusers")

PARITY_ATOL = 1e-5
REQUEST = dict(
    prompt="a red ball rolling on the street",
    negative_prompt="blurry, low quality, static",
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=3,
)


@pytest.fixture(scope="module")
def wan_pipe(tiny_wan_path: Path) -> WanPipeline:
    return ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def euler_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan_euler") / "pipeline", seed=0, scheduler="euler")


def _diffusers_frames(path: Path, guidance_scale: float, seed: int = 0) -> np.ndarray:
    pipe = diffusers.WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**REQUEST, guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np")
    return out.frames[0]


# ----------------------------------------------------------------------------- loading


def test_from_pretrained_builds_ours_with_checkpoint_components(wan_pipe: WanPipeline) -> None:
    assert isinstance(wan_pipe, WanPipeline)
    assert isinstance(wan_pipe.transformer, WanTransformer3DModel)
    assert wan_pipe.device == torch.device("cpu") and wan_pipe.dtype == torch.float32
    assert wan_pipe.vae.dtype == torch.float32
    assert type(wan_pipe.new_scheduler()).__name__ == "UniPCMultistepScheduler"
    assert wan_pipe.new_scheduler() is not wan_pipe.new_scheduler()  # fresh per run: no shared state
    spec = wan_pipe.request_spec
    assert (spec.param("height").multiple, spec.param("width").multiple) == (16, 16)
    assert (spec.param("num_frames").multiple, spec.param("num_frames").offset) == (4, 1)
    assert spec.output == "video" and not spec.takes_image and spec.extras == ()
    # Wan2.1's published defaults; limits from the tiny DiT's rotary table (32 patches) and the scheduler
    assert {k: v for k, v in spec.defaults().items() if k != "prompt"} == dict(
        negative_prompt="", height=480, width=512, num_frames=81, num_inference_steps=50, guidance_scale=5.0,
        seed=0, fps=16.0)
    assert spec.param("width").maximum == 512 and spec.param("num_inference_steps").maximum == 1000


def test_bf16_keeps_fp32_modules_and_vae_in_float32(tiny_wan_path: Path) -> None:
    pipe = WanPipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="bf16")  # the family class directly
    params = dict(pipe.transformer.named_parameters())
    assert params["proj_out.weight"].dtype == torch.bfloat16
    assert params["scale_shift_table"].dtype == torch.float32
    assert params["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    out = pipe.generate(**{**REQUEST, "num_inference_steps": 2})
    assert out.frames.dtype == np.float32 and np.isfinite(out.frames).all()


def test_unknown_pipeline_class_lists_supported(tiny_wan_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "other"
    shutil.copytree(tiny_wan_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXPipeline"}))
    with pytest.raises(UnknownModelError, match=r"pipeline class 'CogVideoXPipeline' is not supported; supported "
                                                r"pipelines: Cosmos3OmniPipeline, FluxPipeline, WanImageToVideoPipeline, WanPipeline"):
        ditserve.Pipeline.from_pretrained(folder, device="cpu")


def test_unknown_scheduler_lists_supported(tiny_wan_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ddim"
    shutil.copytree(tiny_wan_path, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_class_name": "DDIMScheduler"}))
    with pytest.raises(UnknownModelError, match=r"scheduler class 'DDIMScheduler' is not supported; supported "
                                                r"schedulers: FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler"):
        ditserve.Pipeline.from_pretrained(folder, device="cpu")


def test_not_a_pipeline_folder(tmp_path: Path) -> None:
    with pytest.raises(PipelineFolderError, match="has no model_index.json"):
        ditserve.Pipeline.from_pretrained(tmp_path, device="cpu")


def test_device_and_dtype_options() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    for name, dtype in [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16),
                        ("float16", torch.float16), ("fp32", torch.float32), ("float32", torch.float32)]:
        assert resolve_dtype(name, cpu) == dtype
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(PipelineConfigError, match=r"dtype must be one of bf16, bfloat16, fp16, float16, fp32, float32"):
        resolve_dtype("int8", cpu)
    with pytest.raises(PipelineConfigError, match="is not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_pinned_attention_backend_that_cannot_run_here_is_refused_before_loading(tiny_wan_path: Path) -> None:
    with pytest.raises(PipelineConfigError, match=re.escape(
            "attention backend 'fa4' cannot run on cpu in float32: runs on ['cuda'], not cpu; choose 'auto' or one of [")):
        ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", attention_backend="fa4")
    with pytest.raises(PipelineConfigError, match="attention backend 'sdpa_cudnn' cannot run on cpu"):
        resolve_load_options("cpu", None, "sdpa_cudnn")
    assert resolve_load_options("cpu", None, "sdpa_math")[2] == "sdpa_math"


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_parity_with_diffusers_unipc(wan_pipe: WanPipeline, tiny_wan_path: Path, guidance_scale: float) -> None:
    ours = wan_pipe.generate(**REQUEST, guidance_scale=guidance_scale, seed=0).frames
    ref = _diffusers_frames(tiny_wan_path, guidance_scale)
    assert ours.shape == ref.shape == (5, 32, 32, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= PARITY_ATOL


def test_parity_with_diffusers_euler(euler_path: Path) -> None:
    pipe = ditserve.Pipeline.from_pretrained(euler_path, device="cpu")
    assert type(pipe.new_scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"
    ours = pipe.generate(**REQUEST, guidance_scale=5.0, seed=3).frames
    ref = _diffusers_frames(euler_path, 5.0, seed=3)
    assert np.abs(ours - ref).max() <= PARITY_ATOL


def test_prompt_and_guidance_matter(wan_pipe: WanPipeline) -> None:
    """The parity tolerance is well below the effect of the inputs it is meant to check."""
    base = wan_pipe.generate(**REQUEST, guidance_scale=5.0).frames
    no_cfg = wan_pipe.generate(**REQUEST, guidance_scale=1.0).frames
    other_negative = wan_pipe.generate(**{**REQUEST, "negative_prompt": ""}, guidance_scale=5.0).frames
    assert np.abs(base - no_cfg).max() > 5 * PARITY_ATOL
    assert np.abs(base - other_negative).max() > 5 * PARITY_ATOL


def test_same_seed_same_frames_other_seed_differs(wan_pipe: WanPipeline) -> None:
    a = wan_pipe.generate(**REQUEST, seed=7)
    b = wan_pipe.generate(**REQUEST, seed=7)
    c = wan_pipe.generate(**REQUEST, seed=8)
    assert a.seed == 7 and np.array_equal(a.frames, b.frames)
    assert np.abs(a.frames - c.frames).max() > 1e-2
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0


def test_large_seed_accepted(wan_pipe: WanPipeline) -> None:
    out = wan_pipe.generate(**{**REQUEST, "num_inference_steps": 1}, seed=2**64 - 1)
    assert out.seed == 2**64 - 1 and np.isfinite(out.frames).all()


# ----------------------------------------------------------------------------- callback, cancel, timings


def test_callback_and_timings(wan_pipe: WanPipeline) -> None:
    calls: list[tuple[int, int]] = []
    out = wan_pipe.generate(**REQUEST, callback=lambda i, n: calls.append((i, n)))
    assert isinstance(out, GenerationOutput)
    assert calls == [(0, 3), (1, 3), (2, 3)]
    t = out.timings
    assert set(t) == {"queue_s", "text_encode_s", "denoise_s", "per_step_s", "step_mean_s", "decode_wait_s",
                      "decode_s", "total_s"}
    assert len(t["per_step_s"]) == 3 and all(s > 0 for s in t["per_step_s"])
    assert math.isclose(t["step_mean_s"], sum(t["per_step_s"]) / 3)
    assert t["total_s"] >= t["text_encode_s"] + t["denoise_s"] + t["decode_s"] - 1e-6


def test_cancel_set_from_callback_stops_before_next_step(wan_pipe: WanPipeline) -> None:
    cancel = threading.Event()
    calls: list[int] = []

    def callback(step: int, total: int) -> None:
        calls.append(step)
        if step == 1:
            cancel.set()

    with pytest.raises(GenerationCancelled, match="before denoising step 3 of 5") as info:
        wan_pipe.generate(**{**REQUEST, "num_inference_steps": 5}, callback=callback, cancel=cancel)
    assert calls == [0, 1] and info.value.step == 2 and info.value.total_steps == 5


def test_cancel_already_set_runs_no_step(wan_pipe: WanPipeline) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        wan_pipe.generate(**REQUEST, callback=lambda i, n: pytest.fail("no step should run"), cancel=cancel)


_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("folder", ["unipc", "euler"])
def test_denoise_loop_reads_nothing_back(folder: str, tiny_wan_path: Path, euler_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU stand-in for "no device sync in the loop": no tensor value is read on the host
    while the engine steps (on CUDA each such read would stall the CPU until the GPU catches up)."""
    from ditserve.engine.batching import BatchingEngine

    pipe = ditserve.Pipeline.from_pretrained(tiny_wan_path if folder == "unipc" else euler_path, device="cpu")
    reads: list[str] = []
    steps: list[int] = []
    real_forward = BatchingEngine._forward

    def watched_forward(self: BatchingEngine) -> None:
        saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

        def spy(name):
            def read(self, *a, **k):
                reads.append(name)
                return saved[name](self, *a, **k)
            return read

        try:
            for name in _HOST_READS:
                setattr(torch.Tensor, name, spy(name))
            return real_forward(self)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
            steps.append(1)

    monkeypatch.setattr(BatchingEngine, "_forward", watched_forward)
    pipe.generate(**REQUEST, guidance_scale=5.0, callback=lambda i, n: None, cancel=threading.Event())
    assert len(steps) == REQUEST["num_inference_steps"] and reads == []


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "prompt must be a non-empty string, got an empty or whitespace-only string"),
        ({"prompt": "  \n"}, "prompt", "prompt must be a non-empty string, got an empty or whitespace-only string"),
        ({"prompt": None}, "prompt", "prompt is required: a non-empty string"),
        ({"prompt": ["a", "b"]}, "prompt", "prompt must be a non-empty string of at most 8192 characters, got list"),
        ({"prompt": "x" * 8193}, "prompt", "prompt must be at most 8192 characters, got 8193"),
        ({"prompt": "a\ud800"}, "prompt",
         "prompt must be valid Unicode text; it holds an unpaired surrogate at character 1"),
        ({"negative_prompt": 3}, "negative_prompt", "negative_prompt must be a string of at most 8192 characters, "
                                                    "got int"),
        ({"negative_prompt": "\udfff"}, "negative_prompt",
         "negative_prompt must be valid Unicode text; it holds an unpaired surrogate at character 0"),
        ({"height": 33}, "height", "height must be an int, a multiple of 16, in [16, 512], got 33"),
        ({"height": 0}, "height", "height must be an int, a multiple of 16, in [16, 512], got 0"),
        ({"height": -16}, "height", "height must be an int, a multiple of 16, in [16, 512], got -16"),
        ({"height": 480.0}, "height", "height must be an int, a multiple of 16, in [16, 512], got float 480.0"),
        ({"height": True}, "height", "height must be an int, a multiple of 16, in [16, 512], got bool True"),
        ({"height": 10**5000}, "height", "height must be an int, a multiple of 16, in [16, 512], "
                                         "got an int of 16610 bits"),
        ({"width": 528}, "width", "width must be an int, a multiple of 16, in [16, 512], got 528"),
        ({"width": "832"}, "width", "width must be an int, a multiple of 16, in [16, 512], got str '832'"),
        ({"num_frames": 80}, "num_frames", "num_frames must be an int, of the form 4k+1 (1, 5, 9, ...), in [1, 125], "
                                           "got 80"),
        ({"num_frames": 129}, "num_frames", "num_frames must be an int, of the form 4k+1 (1, 5, 9, ...), "
                                            "in [1, 125], got 129"),
        ({"num_frames": 5.0}, "num_frames", "num_frames must be an int, of the form 4k+1 (1, 5, 9, ...), "
                                            "in [1, 125], got float 5.0"),
        ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps must be an int, in [1, 1000], got 0"),
        ({"num_inference_steps": 2**64}, "num_inference_steps",
         f"num_inference_steps must be an int, in [1, 1000], got {2**64}"),
        ({"num_inference_steps": 2.5}, "num_inference_steps",
         "num_inference_steps must be an int, in [1, 1000], got float 2.5"),
        ({"guidance_scale": -1}, "guidance_scale", "guidance_scale must be a finite number, in [0, 100], got -1"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "guidance_scale must be a finite number, in [0, 100], "
                                                             "got nan"),
        ({"guidance_scale": float("inf")}, "guidance_scale", "guidance_scale must be a finite number, in [0, 100], "
                                                             "got inf"),
        ({"guidance_scale": "5"}, "guidance_scale", "guidance_scale must be a finite number, in [0, 100], got str '5'"),
        ({"seed": -1}, "seed", "seed must be an int, in [0, 18446744073709551615], got -1"),
        ({"seed": 2**64}, "seed", f"seed must be an int, in [0, 18446744073709551615], got {2**64}"),
        ({"seed": 1.5}, "seed", "seed must be an int, in [0, 18446744073709551615], got float 1.5"),
        ({"fps": 1e-5}, "fps", "fps must be a finite number, in [1, 120], got 1e-05"),
        ({"fps": 1e308}, "fps", "fps must be a finite number, in [1, 120], got 1e+308"),
        ({"steps": 3}, "steps", "unknown parameter(s) ['steps'] for this model; it takes: prompt, negative_prompt, "
                                "height, width, num_frames, num_inference_steps, guidance_scale, seed, fps"),
        ({"guidance_scale_2": 3.0}, "guidance_scale_2", "unknown parameter(s) ['guidance_scale_2'] for this model; "
                                                        "it takes: prompt, negative_prompt, height, width, "
                                                        "num_frames, num_inference_steps, guidance_scale, seed, fps"),
    ],
)
def test_validation_messages(wan_pipe: WanPipeline, overrides: dict, field: str, message: str) -> None:
    args = {**REQUEST, "guidance_scale": 5.0, "seed": 0, **overrides}
    with pytest.raises(InvalidRequest) as info:
        wan_pipe.request_spec.validate(args)
    assert str(info.value) == message
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_validation_normalises_and_fills_defaults(wan_pipe: WanPipeline) -> None:
    spec = wan_pipe.request_spec
    request = spec.validate(dict(prompt="a cat", negative_prompt=None, height=np.int64(64), width=32,
                                 num_frames=1, num_inference_steps=2, guidance_scale=1, seed=np.uint64(2**64 - 1)))
    assert request == GenerationRequest("a cat", "", 64, 32, 1, 2, 1.0, 2**64 - 1, 16.0)
    assert type(request.height) is int and type(request.guidance_scale) is float and type(request.seed) is int
    filled = spec.validate({"prompt": "a cat"})
    # Wan2.1's 480x832, clamped to the largest size the tiny DiT's rotary table covers
    assert (filled.height, filled.width, filled.num_frames, filled.num_inference_steps) == (480, 512, 81, 50)
    assert filled.fields() == {**spec.defaults(), "prompt": "a cat"}


def test_a_spec_with_other_rules_and_extras() -> None:
    """The validator reads any family's declaration: its multiples, limits and own parameters."""
    params = standard_params(height=24, width=40, num_frames=9, num_inference_steps=4, guidance_scale=2.0, fps=8.0,
                             size_multiple=(8, 8), max_size=(64, 64), frame_multiple=8, max_frames=17, max_steps=10,
                             guidance_help="g")
    spec = RequestSpec(params + (Param("strength", "float", None, "s", minimum=0, maximum=1, nullable=True),))
    request = spec.validate({"prompt": "a", "strength": 0.5})
    assert request.num_frames == 9 and request.extras == {"strength": 0.5} and request.fields()["strength"] == 0.5
    assert spec.validate({"prompt": "a"}).extras == {"strength": None}
    with pytest.raises(InvalidRequest, match=r"num_frames must be an int, of the form 8k\+1 \(1, 9, 17, ...\), "
                                             r"in \[1, 17\], got 5"):
        spec.validate({"prompt": "a", "num_frames": 5})
    with pytest.raises(InvalidRequest, match=r"strength must be a finite number, in \[0, 1\] or null, got 2"):
        spec.validate({"prompt": "a", "strength": 2})
    with pytest.raises(InvalidRequest, match="this model does not take an input image"):
        spec.validate({"prompt": "a"}, image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"default height must be .* got 20"):
        spec.with_defaults({"height": 20})
    image_spec = RequestSpec(params, output="image")
    with pytest.raises(InvalidRequest, match="this model makes images: num_frames must be 1, got 9"):
        image_spec.validate({"prompt": "a"})


def test_generate_validates_before_any_work(wan_pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wan_pipe, "prepare_batch", lambda *a, **k: pytest.fail("work started on a bad request"))
    with pytest.raises(InvalidRequest, match="height must be an int, a multiple of 16, in .*, got 30"):
        wan_pipe.generate(**{**REQUEST, "height": 30})
    # the tiny DiT's rotary table covers 32 patches per axis: 512 pixels
    with pytest.raises(InvalidRequest, match=r"width must be an int, a multiple of 16, in \[16, 512\], got 528"):
        wan_pipe.generate(**{**REQUEST, "width": 528})


def test_vae_out_of_memory_retries_tiled_once(wan_pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode that runs out of device memory is retried in tiles (and tiling is switched off after)."""
    vae = wan_pipe.vae
    real = vae.decode
    tiled_calls: list[bool] = []

    def short_of_memory(z: torch.Tensor, return_dict: bool = True) -> Any:
        tiled_calls.append(vae.use_tiling)
        if not vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(z, return_dict=return_dict)

    latents = torch.randn(2, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = wan_pipe.decode_batch(latents)
    monkeypatch.setattr(vae, "decode", short_of_memory)
    got = wan_pipe.decode_batch(latents)
    assert tiled_calls == [False, True] and not vae.use_tiling
    for g, e in zip(got, expected):  # smaller than one tile: the tiled decode is the plain one
        assert np.array_equal(g, e)

    def always_short(z: torch.Tensor, return_dict: bool = True) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(vae, "decode", always_short)
    with pytest.raises(torch.OutOfMemoryError):
        wan_pipe.decode_batch(latents)
    assert not vae.use_tiling


def test_text_of_requests_prepared_together_is_encoded_in_one_batch(wan_pipe: WanPipeline,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-request work outside the DiT runs batched: one text-encoder call for requests admitted together,
    with the same embeddings as each alone."""
    requests = [wan_pipe.validate(**REQUEST, guidance_scale=5.0, seed=1),
                wan_pipe.validate(**{**REQUEST, "prompt": "a blue cat"}, guidance_scale=1.0, seed=2)]
    alone = [wan_pipe.prepare(r) for r in requests]
    calls: list[int] = []
    real = wan_pipe.text_encoder.forward
    monkeypatch.setattr(wan_pipe.text_encoder, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    together = wan_pipe.prepare_batch(requests)
    assert calls == [1]
    for one, both in zip(alone, together):
        assert len(one.conditions) == len(both.conditions)
        for a, b in zip(one.conditions, both.conditions):
            assert torch.allclose(a.text, b.text, rtol=1e-5, atol=1e-6)
        assert torch.equal(one.latents, both.latents)


def test_text_encoded_to_the_longest_prompt_equals_diffusers_padding_to_512(wan_pipe: WanPipeline,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder runs only up to the batch's longest prompt (its attention mask hides the pads), then the
    embeddings are zero-padded to 512: the same as diffusers' Wan text stage, which pads the tokens to 512
    before the encoder. Prompts of very different lengths, one truncated at 512 tokens."""
    from ditserve.pipelines.text import encode_prompts, prompt_clean

    prompts = ["a cat", "a red ball rolling on the street, " * 3, "", "blue " * 600]
    ours = encode_prompts(wan_pipe.tokenizer, wan_pipe.text_encoder, prompts, max_sequence_length=512,
                          device=torch.device("cpu"))
    inputs = wan_pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=512,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
    with torch.no_grad():
        full = wan_pipe.text_encoder(inputs.input_ids, inputs.attention_mask).last_hidden_state
    lengths = inputs.attention_mask.sum(dim=1).tolist()
    reference = torch.stack([torch.cat([u[:n], u.new_zeros(512 - n, u.shape[1])]) for u, n in zip(full, lengths)])
    assert ours.shape == reference.shape == (4, 512, full.shape[-1])
    assert max(lengths) == 512 and min(lengths) <= 2  # the batch spans both ends
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert ours[0, lengths[0]:].abs().max() == 0
    seen: list[int] = []
    real = wan_pipe.text_encoder.forward
    monkeypatch.setattr(wan_pipe.text_encoder, "forward", lambda ids, *a, **k: seen.append(ids.shape[1]) or real(ids, *a, **k))
    short = encode_prompts(wan_pipe.tokenizer, wan_pipe.text_encoder, prompts[:2], max_sequence_length=512,
                           device=torch.device("cpu"))
    assert seen == [max(lengths[:2])] and short.shape[1] == 512  # the encoder ran over the longest prompt only
    assert torch.allclose(short, ours[:2], rtol=1e-5, atol=1e-6)
