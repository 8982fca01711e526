"""The embedded tiny model, end to end: the shipped folder, `ditserve generate` without --model, eval-tiny.

The adherence test is the one that guards generation itself: a broken scheduler, a flipped
guidance sign, or wrong VAE (de)normalisation all still produce a clip, but not one whose
colours and motion match the prompt.
"""

from __future__ import annotations

import re

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ditserve import cli
from ditserve.tiny import GENERATION, default_model_path, held_out_scenes, score_clip

PROMPTS = [s.prompt for s in held_out_scenes()[:6]]  # never seen in training


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads, and on a shared CPU extra threads can
    slow them down many times over; one thread keeps these tests fast anywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_gif(path: Path) -> np.ndarray:
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        frames = [np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0 for frame in ImageSequence.Iterator(image)]
    return np.stack(frames)


def test_embedded_folder_is_a_small_diffusers_wan_pipeline() -> None:
    root = default_model_path()
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"][1] == "WanTransformer3DModel" and index["vae"][1] == "AutoencoderKLWan"
    assert index["text_encoder"][1] == "UMT5EncoderModel"
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in root.iterdir()}
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MiB"
    assert cli.default_model_path() == str(root)


def test_cli_generate_without_model_follows_held_out_prompts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`ditserve generate --prompt ...` alone: the embedded model at its own size, frames, steps and guidance."""
    scores = []
    for i, prompt in enumerate(PROMPTS):
        out = tmp_path / f"clip{i}.gif"
        rc = cli.main(["generate", "--prompt", prompt, "--seed", str(i), "--output", str(out), "--device", "cpu",
                       "--quiet"])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert captured.out.startswith(f"{GENERATION.num_frames} frame(s) {GENERATION.width}x{GENERATION.height}, "
                                       f"{GENERATION.num_inference_steps} steps")
        assert captured.err == ""  # grammar prompts get no note
        scores.append(score_clip(prompt, _read_gif(out)))
    # the model follows ~90% of held-out prompts; a broken scheduler, guidance or VAE scaling follows few
    assert sum(s.adherent for s in scores) >= len(PROMPTS) - 1, [s.as_dict() for s in scores]
    assert all(s.background_ok for s in scores), [s.as_dict() for s in scores]


def test_cli_generate_notes_prompts_outside_the_grammar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(["generate", "--prompt", "a cat on the moon", "--steps", "2", "--output", str(tmp_path / "x.png"),
                   "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0 and "note: the embedded tiny model was trained only on prompts of its grammar" in captured.err


def test_eval_tiny_reports_adherence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = tmp_path / "eval.json"
    rc = cli.main(["eval-tiny", "--limit", "2", "--steps", "10", "--quiet", "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 held-out prompts, 10 steps" in out and f"guidance {GENERATION.guidance_scale:g} vs 1.0: adherence" in out
    record = json.loads(report.read_text())
    assert [r["guidance_scale"] for r in record] == [GENERATION.guidance_scale, 1.0]
    assert [c["prompt"] for c in record[0]["clips"]] == PROMPTS[:2]


def test_the_folder_carries_the_embedded_defaults(capsys: pytest.CaptureFixture) -> None:
    """`request_defaults.json` (written by tools/train_tiny.py from GENERATION) is what every interface uses."""
    import dataclasses

    from ditserve.pipelines import read_request_spec

    spec = read_request_spec(default_model_path())
    assert {k: spec.defaults()[k] for k in dataclasses.asdict(GENERATION)} == dataclasses.asdict(GENERATION)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, value in (("height", GENERATION.height), ("width", GENERATION.width),
                        ("num-frames", GENERATION.num_frames), ("steps", GENERATION.num_inference_steps),
                        ("guidance-scale", GENERATION.guidance_scale)):
        assert re.search(rf"--{flag} [A-Z_]+ (?:(?! --).)*\(default: {value}\)", text), flag
