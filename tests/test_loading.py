"""ditserve.loading against diffusers' own loader, on the tiny random Wan2.1 folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ditserve.loading import (
    PipelineFolderError,
    WeightLoadError,
    component_path,
    find_checkpoint,
    instantiate_on_meta,
    load_component,
    load_weights,
    read_config,
    read_model_index,
)
from helpers.checkpoints import build_tiny_wan_pipeline, build_tiny_wan_transformer_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _meta_transformer(config: dict) -> torch.nn.Module:
    return instantiate_on_meta(lambda: diffusers.WanTransformer3DModel.from_config(config))


def _reference_transformer(path: Path) -> torch.nn.Module:
    return diffusers.WanTransformer3DModel.from_pretrained(path, subfolder="transformer")


@pytest.fixture
def transformer_copy(tiny_wan_path: Path, tmp_path: Path) -> Path:
    """A private copy of the transformer folder, to be edited by one test."""
    return Path(shutil.copytree(tiny_wan_path / "transformer", tmp_path / "transformer"))


def _edit_weights(folder: Path, edit) -> Path:  # noqa: ANN001
    file = folder / WEIGHTS
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return file


# --- folder layout -------------------------------------------------------------------------


def test_model_index_and_configs(tiny_wan_path: Path) -> None:
    index = read_model_index(tiny_wan_path)
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["tokenizer"][0] == "transformers"
    config = read_config(component_path(tiny_wan_path, "transformer"))
    assert config["_class_name"] == "WanTransformer3DModel"
    for key, value in build_tiny_wan_transformer_config().items():
        assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    sched = read_config(component_path(tiny_wan_path, "scheduler"), "scheduler_config.json")
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["flow_shift"] == 3.0


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PipelineFolderError, match="model_index.json") as e:
        read_model_index(missing)
    assert str(missing) in str(e.value) and "no such folder" in str(e.value)


def test_not_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(PipelineFolderError, match="is not a folder") as e:
        read_model_index(file)
    assert str(file) in str(e.value)


def test_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(PipelineFolderError, match="has no model_index.json") as e:
        read_model_index(tmp_path)
    assert str(tmp_path) in str(e.value) and "transformer/" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_component_lists_declared(tiny_wan_path: Path) -> None:
    with pytest.raises(PipelineFolderError, match="'transformer_2' not found") as e:
        component_path(tiny_wan_path, "transformer_2")
    assert "text_encoder, tokenizer, transformer, vae" in str(e.value)


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(PipelineFolderError, match="config.json not found") as e:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PipelineFolderError, match="not valid JSON") as e:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


# --- weights -------------------------------------------------------------------------------


def test_instantiate_on_meta_keeps_buffers_real() -> None:
    model = _meta_transformer(build_tiny_wan_transformer_config())
    assert all(p.is_meta for p in model.parameters())
    assert not model.rope.freqs_cos.is_meta  # non-persistent: no checkpoint holds it
    with_buffers = instantiate_on_meta(
        lambda: diffusers.WanTransformer3DModel(**build_tiny_wan_transformer_config()), include_buffers=True
    )
    assert with_buffers.rope.freqs_cos.is_meta


def test_load_matches_diffusers(tiny_wan_path: Path) -> None:
    folder = tiny_wan_path / "transformer"
    model = _meta_transformer(read_config(folder))
    load_weights(model, folder, device="cpu", dtype=torch.float32)
    ref = _reference_transformer(tiny_wan_path)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    for (name, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 16, 2, 4, 4)
    t = torch.tensor([500.0])
    text = torch.randn(1, 8, 32)
    with torch.no_grad():
        assert torch.equal(model(x, t, text).sample, ref(x, t, text).sample)


def test_load_sharded(tiny_wan_path: Path, tmp_path: Path) -> None:
    _reference_transformer(tiny_wan_path).save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / f"{WEIGHTS}.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    assert find_checkpoint(tmp_path).source == index
    model = _meta_transformer(read_config(tmp_path))
    load_weights(model, tmp_path, device="cpu", dtype=torch.float32)
    ref = _reference_transformer(tiny_wan_path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_load_bf16_with_fp32_modules(tiny_wan_path: Path) -> None:
    keep = diffusers.WanTransformer3DModel._keep_in_fp32_modules
    model = load_component(
        tiny_wan_path, "transformer", diffusers.WanTransformer3DModel.from_config,
        device="cpu", dtype=torch.bfloat16, keep_float32=keep,
    )
    assert not model.training
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.norm2.weight"] == torch.float32 and dtypes["scale_shift_table"] == torch.float32
    plain = _meta_transformer(read_config(tiny_wan_path / "transformer"))
    load_weights(plain, tiny_wan_path / "transformer", device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())


def test_load_text_encoder_keeps_tied_weights(tiny_wan_path: Path) -> None:
    def factory(config: dict) -> torch.nn.Module:
        return transformers.UMT5EncoderModel(transformers.UMT5Config.from_dict(config))

    model = load_component(tiny_wan_path, "text_encoder", factory, device="cpu", dtype=torch.float32)
    assert model.encoder.embed_tokens.weight is model.shared.weight  # only shared.weight is in the file
    ref = transformers.UMT5EncoderModel.from_pretrained(tiny_wan_path / "text_encoder")
    ids = torch.tensor([[4, 5, 6, 1, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        assert torch.equal(model(ids, mask).last_hidden_state, ref(ids, mask).last_hidden_state)


def test_missing_key(transformer_copy: Path) -> None:
    file = _edit_weights(transformer_copy, lambda s: s.pop("blocks.1.ffn.net.2.weight"))
    model = _meta_transformer(read_config(transformer_copy))
    with pytest.raises(WeightLoadError, match="1 missing key") as e:
        load_weights(model, transformer_copy, device="cpu", dtype=torch.float32)
    assert str(file) in str(e.value) and "blocks.1.ffn.net.2.weight" in str(e.value)
    assert "unexpected" not in str(e.value)


def test_unexpected_key(transformer_copy: Path) -> None:
    file = _edit_weights(transformer_copy, lambda s: s.update({"blocks.9.extra.weight": torch.zeros(3)}))
    model = _meta_transformer(read_config(transformer_copy))
    with pytest.raises(WeightLoadError, match="1 unexpected key") as e:
        load_weights(model, transformer_copy, device="cpu", dtype=torch.float32)
    assert str(file) in str(e.value) and "blocks.9.extra.weight" in str(e.value)


def test_shape_mismatch(transformer_copy: Path) -> None:
    file = _edit_weights(transformer_copy, lambda s: s.update({"proj_out.bias": torch.zeros(5)}))
    model = _meta_transformer(read_config(transformer_copy))
    with pytest.raises(WeightLoadError, match="1 shape mismatch") as e:
        load_weights(model, transformer_copy, device="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert str(file) in msg and "proj_out.bias: checkpoint [5] vs module [64]" in msg
    assert all(p.is_meta for p in model.parameters())  # nothing was half-loaded


def test_many_missing_keys_are_counted(tiny_wan_path: Path) -> None:
    config = dict(read_config(tiny_wan_path / "transformer"), num_layers=4)  # 2 layers more than the file
    model = _meta_transformer(config)
    with pytest.raises(WeightLoadError, match=r"missing key\(s\)") as e:
        load_weights(model, tiny_wan_path / "transformer", device="cpu", dtype=torch.float32)
    n = sum(1 for k in model.state_dict() if k.startswith(("blocks.2.", "blocks.3.")))
    assert f"{n} missing key(s)" in str(e.value) and f"(+{n - 10} more)" in str(e.value)


def test_sharded_errors_name_the_shard(tiny_wan_path: Path, tmp_path: Path) -> None:
    _reference_transformer(tiny_wan_path).save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / f"{WEIGHTS}.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"]["proj_out.weight"]
    data["weight_map"]["proj_out.weight"] = "missing-shard.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(WeightLoadError, match="missing-shard.safetensors") as e:
        load_weights(_meta_transformer(read_config(tmp_path)), tmp_path, device="cpu", dtype=torch.float32)
    assert str(index) in str(e.value)
    data["weight_map"]["proj_out.weight"] = shard
    data["weight_map"]["extra.key"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(WeightLoadError, match="1 unexpected key") as e:
        load_weights(_meta_transformer(read_config(tmp_path)), tmp_path, device="cpu", dtype=torch.float32)
    assert f"extra.key (in {shard})" in str(e.value)
    del data["weight_map"]["extra.key"]
    wrong = next(f for f in data["weight_map"].values() if f != shard)
    data["weight_map"]["proj_out.weight"] = wrong  # the index points at a shard that lacks the key
    index.write_text(json.dumps(data))
    with pytest.raises(WeightLoadError, match="'proj_out.weight'.*cannot be read") as e:
        load_weights(_meta_transformer(read_config(tmp_path)), tmp_path, device="cpu", dtype=torch.float32)
    assert str(tmp_path / wrong) in str(e.value)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightLoadError, match="no safetensors weights") as e:
        find_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value) and "pytorch_model.bin" in str(e.value)


def test_meta_leftovers_are_reported(tiny_wan_path: Path) -> None:
    model = instantiate_on_meta(
        lambda: diffusers.WanTransformer3DModel(**build_tiny_wan_transformer_config()), include_buffers=True
    )
    with pytest.raises(WeightLoadError, match="still on the meta device") as e:
        load_weights(model, tiny_wan_path / "transformer", device="cpu", dtype=torch.float32)
    assert "rope.freqs_cos" in str(e.value) and "reset_non_persistent_buffers" in str(e.value)


def test_reset_hook_rebuilds_meta_buffers(tiny_wan_path: Path) -> None:
    class WithHook(diffusers.WanTransformer3DModel):
        def reset_non_persistent_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
            with torch.device(device):
                fresh = type(self.rope)(self.rope.attention_head_dim, self.rope.patch_size, self.rope.max_seq_len)
            self.rope = fresh

    model = instantiate_on_meta(lambda: WithHook(**build_tiny_wan_transformer_config()), include_buffers=True)
    load_weights(model, tiny_wan_path / "transformer", device="cpu", dtype=torch.float32)
    assert not model.rope.freqs_cos.is_meta


# --- the tiny folder itself -----------------------------------------------------------------


def test_tiny_pipeline_runs_in_diffusers(tiny_wan_path: Path) -> None:
    pipe = diffusers.WanPipeline.from_pretrained(tiny_wan_path)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        prompt="a red circle", negative_prompt="blurry", height=32, width=32, num_frames=5,
        num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames
    assert frames.shape == (1, 5, 32, 32, 3)
    assert np.isfinite(frames).all() and frames.std() > 1e-3
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=512, truncation=True,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    assert ids.input_ids.shape == (1, 512) and int(ids.attention_mask.sum()) == 4  # 3 words + </s>
    assert ids.input_ids[0, 3].item() == pipe.tokenizer.eos_token_id == 1 and pipe.tokenizer.pad_token_id == 0


def test_tiny_pipeline_is_reproducible(tiny_wan_path: Path, tmp_path: Path) -> None:
    other = build_tiny_wan_pipeline(tmp_path / "again", seed=0, scheduler="euler")
    a = load_file(tiny_wan_path / "transformer" / WEIGHTS)
    b = load_file(other / "transformer" / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_config(other / "scheduler", "scheduler_config.json")["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(FileExistsError):
        build_tiny_wan_pipeline(other)
