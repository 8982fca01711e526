"""The tiny model's training math: it must match what the pipeline computes at generation time.

A training objective with the wrong sign or scale, or text conditioning that differs from the
pipeline's, still trains, and then generates nonsense; these tests pin each convention to the
inference code it must agree with (the scheduler, the text stage, the DiT's cross-attention).
"""

from __future__ import annotations

import pytest
import torch

from ditserve.tiny.data import train_scenes
from tiny import arch  # tools/tiny (on pytest's pythonpath)
from tiny.text import BiasedCrossAttention, build_tokenizer, encode_prompts_for_training, tokenize
from tiny.train import TrainSettings, main
from tiny.train_dit import flow_matching_batch, shifted_sigmas, train_dit


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_grammar_words_are_single_tokens(tokenizer) -> None:
    ids, mask = tokenize(tokenizer, ["a red circle moving left on a blue background", ""])
    assert mask.sum(dim=1).tolist() == [10, 1]  # 9 words + </s>; the empty prompt is </s> alone
    assert tokenizer.unk_token_id not in ids[0].tolist()


def test_compressed_text_gives_the_pipelines_dit_output(tokenizer) -> None:
    """Training attends over (prompt + 1) rows with a log-count bias; generation over 512 zero-padded rows."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from ditserve.pipelines.text import encode_prompts

    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(**arch.text_encoder_config(len(tokenizer)))).eval()
    dit = WanTransformer3DModel(**arch.transformer_config()).eval()
    with torch.no_grad():
        for p in dit.parameters():  # a trained-looking DiT: no zero-initialised output layers
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a red circle moving left on a blue background", "", "a white square moving up on a black background"]
    x, t = torch.randn(3, 16, 5, 4, 4), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        full = encode_prompts(tokenizer, encoder, prompts, max_sequence_length=512, device=torch.device("cpu"))
        expected = dit(x, t, full, return_dict=False)[0]
        text, bias = encode_prompts_for_training(encoder, *tokenize(tokenizer, prompts))
        assert text.shape[1] == 11 and torch.equal(text[1, 1:], torch.zeros_like(text[1, 1:]))
        processor = BiasedCrossAttention()
        processor.install(dit)
        processor.bias = bias
        got = dit(x, t, text, return_dict=False)[0]
        BiasedCrossAttention.remove(dit)
        assert torch.equal(dit(x, t, full, return_dict=False)[0], expected)  # removed: diffusers' own processor
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_flow_matching_target_is_what_the_scheduler_integrates() -> None:
    """The training target, read by the shipped scheduler as a flow prediction, gives back the clean latents."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(**arch.scheduler_config())
    scheduler.set_timesteps(GEN_STEPS := 20)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 5, 4, 4, generator=g), torch.randn(1, 16, 5, 4, 4, generator=g)
    for i in (0, GEN_STEPS // 2, GEN_STEPS - 1):
        sigma = scheduler.sigmas[i].reshape(1)
        x_t, target, timestep = flow_matching_batch(x0, sigma, noise)
        torch.testing.assert_close(timestep, scheduler.timesteps[i].reshape(1).float(), atol=1.0, rtol=0)  # int timesteps
        scheduler._step_index = i
        torch.testing.assert_close(scheduler.convert_model_output(target, sample=x_t), x0, atol=1e-5, rtol=1e-5)
    # training draws sigmas from the same shifted schedule the scheduler steps through
    u = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(shifted_sigmas(u, 3.0)[[0, -1]], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_train_dit_runs_and_restores_the_processors(tokenizer) -> None:
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    dit = WanTransformer3DModel(**dict(arch.transformer_config(), num_layers=1))
    encoder = UMT5EncoderModel(UMT5Config(**arch.text_encoder_config(len(tokenizer))))
    scenes = train_scenes()
    record = train_dit(dit, encoder, tokenizer, torch.randn(8, 16, 5, 4, 4), torch.arange(8), scenes, steps=3,
                       batch_size=4, lr=1e-3, text_lr=1e-3, drop_prob=0.5, shift=3.0, ema_decay=0.9,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), log=lambda m: None)
    assert record["dit_steps"] == 3 and record["dit_loss"] == record["dit_loss"]  # not NaN
    assert isinstance(dit.blocks[0].attn2.processor, WanAttnProcessor) and not dit.training


def test_train_cli_documents_every_setting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in TrainSettings.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
