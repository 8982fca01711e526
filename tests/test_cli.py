"""`ditserve generate` in-process: end to end on the tiny folder, and user errors (exit 2, no traceback).

Order of checks (cheapest first, all before a model's weights are read): output path, --model
present, the folder's configs (they carry the model's request rules), the request fields,
device/dtype/attention backend.
"""

from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import pytest

from ditserve import cli
from ditserve.pipelines import Pipeline

TINY = ["--prompt", "a red ball", "--height", "32", "--width", "32", "--num-frames", "5", "--device", "cpu"]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*args, **kwargs):
        pytest.fail("the CLI loaded a model before rejecting the arguments")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(refuse))


def test_generate_end_to_end_writes_mp4(tiny_wan_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "video.mp4"
    rc = cli.main(["generate", "--model", str(tiny_wan_path), *TINY, "--steps", "2", "--seed", "3",
                   "--negative-prompt", "blurry", "--output", str(out), "--fps", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]
    meta = imageio_ffmpeg.read_frames(str(out)).__next__()
    assert meta["size"] == (32, 32) and meta["fps"] == 8
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("5 frame(s) 32x32, 2 steps at ") and "ms/step; total " in lines[0]
    assert "seed 3" in lines[0] and lines[0].endswith(f"-> {out}")
    assert "denoising" in captured.err  # the progress bar


def test_generate_png_with_attention_backend(tiny_wan_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "still.png"
    rc = cli.main(["generate", "--model", str(tiny_wan_path), *TINY, "--steps", "1", "--guidance-scale", "1",
                   "--attention-backend", "reference", "--dtype", "fp32", "--quiet", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.read_bytes()[:4] == b"\x89PNG" and captured.err == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "33"], "argument --height: height must be an int, a multiple of 16, in [16, 512], got 33"),
        (["--num-frames", "4"], "argument --num-frames: num_frames must be an int, of the form 4k+1 (1, 5, 9, ...), "
                                "in [1, 125], got 4"),
        (["--steps", "0"], "argument --steps: num_inference_steps must be an int, in [1, 1000], got 0"),
        (["--steps", "1001"], "argument --steps: num_inference_steps must be an int, in [1, 1000], got 1001"),
        (["--guidance-scale", "nan"], "argument --guidance-scale: guidance_scale must be a finite number, in [0, 100], "
                                      "got nan"),
        (["--seed", "-5"], "argument --seed: seed must be an int, in [0, 18446744073709551615], got -5"),
        (["--prompt", " "], "argument --prompt: prompt must be a non-empty string, got an empty or whitespace-only string"),
        (["--output", "clip.avi"], "clip.avi: extension '.avi' is not supported; use one of .mp4 .gif .png"),
        (["--output", "no/such/dir/clip.mp4"], "no/such/dir/clip.mp4: folder no/such/dir does not exist"),
        (["--dtype", "int8"], "dtype must be one of bf16, bfloat16, fp16, float16, fp32, float32 (or that torch.dtype), got 'int8'"),
        (["--attention-backend", "nope"], "unknown attention backend 'nope' (from argument)"),
        (["--device", "cpu", "--attention-backend", "triton_fp8"],
         "attention backend 'triton_fp8' cannot run on cpu in float32: runs on ['cuda'], not cpu; choose 'auto' or one of ["),
        (["--fps", "0"], "argument --fps: fps must be a finite number, in [1, 120], got 0"),
    ],
)
def test_bad_arguments_exit_2_before_loading(
    args: list[str], message: str, tiny_wan_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, no_loading: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["generate", "--model", str(tiny_wan_path), "--prompt", "a cat", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"ditserve generate: error: {message}")
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_missing_model_folder_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "a cat",
                   "--output", str(tmp_path / "x.mp4"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {tmp_path / 'missing'}: no such folder" in err and "Traceback" not in err


def test_model_required(capsys: pytest.CaptureFixture, no_loading: None, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --model and without the embedded model (an install that lacks its package data)."""
    monkeypatch.setattr(cli, "default_model_path", lambda: None)
    rc = cli.main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4")])
    assert rc == 2
    assert "error: --model is required" in capsys.readouterr().err


def test_default_model_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`default_model_path` (the embedded tiny model) is what runs without --model."""
    monkeypatch.setattr(cli, "default_model_path", lambda: str(tmp_path / "bundled"))
    rc = cli.main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "x.mp4"), "--device", "cpu"])
    assert rc == 2 and f"{tmp_path / 'bundled'}: no such folder" in capsys.readouterr().err


def test_argparse_type_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", "m", "--prompt", "a", "--height", "abc"])
    assert info.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", "m"])
    assert info.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_bench_attention_still_registered() -> None:
    args = cli.build_parser().parse_args(["bench-attention", "--seq-len", "64"])
    assert args.func is cli._bench_attention and args.seq_len == 64


def test_serve_defaults_to_the_embedded_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its request defaults travel in its folder (request_defaults.json), read by the server from there."""
    monkeypatch.setattr(cli, "default_model_path", lambda: str(tmp_path / "bundled"))
    seen: dict = {}
    monkeypatch.setattr("ditserve.server.main.serve",
                        lambda model, settings, **kw: seen.update(model=model, settings=settings, warm=kw["warm"]) or 0)
    assert cli.main(["serve"]) == 0
    assert seen["model"] == str(tmp_path / "bundled") and seen["settings"].model_name == "bundled"
    assert seen["warm"] is True
    assert cli.main(["serve", "--model", str(tmp_path / "other"), "--no-warm-up"]) == 0
    assert seen["model"] == str(tmp_path / "other") and seen["warm"] is False


def test_generate_help_lists_the_models_own_parameters(tiny_wan_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The request flags, their limits and defaults come from the model named by --model."""
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tiny_wan_path), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--width WIDTH pixels; an int, a multiple of 16, in [16, 512] (default: 512)" in text
    assert "--steps STEPS denoising steps; an int, in [1, 1000] (default: 50)" in text
    assert "--image" not in text and "--guidance-scale-2" not in text  # Wan2.1 takes neither


def test_generate_animates_an_image_with_a_model_that_takes_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--image` exists for models that take a first frame (Wan2.2-TI2V), and a bad file is a usage error."""
    from PIL import Image

    from helpers.checkpoints import build_tiny_wan22_ti2v_pipeline

    model = build_tiny_wan22_ti2v_pipeline(tmp_path / "ti2v")
    picture = tmp_path / "first.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(picture)
    out = tmp_path / "clip.mp4"
    base = ["generate", "--model", str(model), "--prompt", "a red ball", "--height", "32", "--width", "64",
            "--num-frames", "5", "--steps", "1", "--device", "cpu", "--quiet"]
    assert cli.main([*base, "--image", str(picture), "--output", str(out)]) == 0, capsys.readouterr().err
    assert out.is_file()
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    assert cli.main([*base, "--image", str(tmp_path / "broken.png"), "--output", str(tmp_path / "x.mp4")]) == 2
    assert "error: argument --image: image could not be decoded" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a model that takes no image has no such flag
        cli.main(["generate", "--prompt", "a", "--image", str(picture)])
    assert "unrecognized arguments: --image" in capsys.readouterr().err
