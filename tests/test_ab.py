"""`ditserve ab` / `ditserve.ab.run_ab` on the tiny Wan folder (CPU, float32).

On this model the float64-capable `reference` attention and `sdpa` give frames ~2e-7 apart:
not bit-identical, yet far above any PSNR threshold. An A/A run (sdpa vs sdpa) must be
bit-identical, which also checks that the same seed gives the same video across two loads.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

import ditserve
from ditserve import cli
from ditserve.ab import ABConfigError, ABReport, format_report, frames_sha256, parse_config, run_ab
from ditserve.pipelines import Pipeline

REQUEST = dict(prompt="a red ball", negative_prompt="blurry", height=32, width=32, num_frames=5,
               num_inference_steps=2, guidance_scale=5.0, seed=3)
CPU = {"device": "cpu", "dtype": "fp32"}


@pytest.fixture(scope="module")
def sdpa_vs_reference(tiny_wan_path: Path) -> ABReport:
    return run_ab(tiny_wan_path, "attention_backend=sdpa", "attention_backend=reference", REQUEST, runs=2,
                  defaults=CPU)


def test_different_backends_are_close_not_identical(sdpa_vs_reference: ABReport) -> None:
    report = sdpa_vs_reference
    cmp = report.comparison
    assert not cmp.bit_identical
    assert 0 < cmp.max_abs_diff < 1e-4 and 0 < cmp.mean_abs_diff <= cmp.max_abs_diff
    assert 60 < cmp.psnr_db < math.inf
    assert cmp.step_speedup > 0 and cmp.total_speedup > 0
    for result, backend in ((report.baseline, "sdpa"), (report.candidate, "reference")):
        assert result.deterministic and len(result.runs) == 2
        assert result.backends_used == [backend]
        assert result.load_options == {"attention_backend": backend, "device": "cpu", "dtype": "float32",
                                       "compile": False, "cache": "off"}
        assert result.peak_memory_bytes is None  # CPU
        assert result.step_s.min <= result.step_s.median <= result.step_s.max
        assert len(result.runs[0].timings["per_step_s"]) == 2
    text = format_report(report)
    assert "NOT bit-identical" in text and "PSNR" in text and "n/a" in text
    assert report.baseline.sha256 in text and report.candidate.sha256 in text


def test_same_config_is_bit_identical(tiny_wan_path: Path) -> None:
    report = run_ab(tiny_wan_path, {"attention_backend": "sdpa"}, "attention_backend=sdpa, dtype=fp32", REQUEST,
                    runs=2, warmup=0, defaults={"device": "cpu"})
    cmp = report.comparison
    assert cmp.bit_identical and cmp.uint8_identical
    assert cmp.psnr_db == math.inf and cmp.max_abs_diff == 0 and cmp.mean_abs_diff == 0
    assert report.baseline.deterministic and report.candidate.deterministic
    assert report.baseline.sha256 == report.candidate.sha256
    assert "bit-identical: baseline and candidate frames are equal (PSNR inf)" in format_report(report)
    assert report.to_dict()["comparison"]["psnr_db"] is None  # JSON has no inf


def test_sha256_is_of_documented_uint8_conversion(tiny_wan_path: Path, sdpa_vs_reference: ABReport) -> None:
    pipe = ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32", attention_backend="sdpa")
    frames = pipe.generate(**REQUEST).frames
    as_uint8 = np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
    expected = hashlib.sha256(np.ascontiguousarray(as_uint8).tobytes()).hexdigest()
    assert frames_sha256(frames) == expected
    assert sdpa_vs_reference.baseline.sha256 == expected
    assert all(run.sha256 == expected for run in sdpa_vs_reference.baseline.runs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("attention_backend=sdpa,foo=1", "unknown key 'foo'; accepted: attention_backend=<auto|"),
        ("attention_backend=nope", "attention_backend='nope' is not an attention backend; attention_backend accepts auto|"),
        ("compile=maybe", "compile='maybe' is not true or false; compile accepts true|false"),
        ("dtype=fp8", "dtype='fp8' is not a supported dtype; dtype accepts bf16|"),
        ("compile", "'compile' is not key=value; accepted: "),
        ("=sdpa", "'=sdpa' is not key=value"),
        ("dtype=fp32,dtype=bf16", "'dtype' given twice"),
        ("cache=uniform:1", "cache='uniform:1' is not a step cache setting; cache accepts off|<threshold>|uniform:N"),
    ],
)
def test_bad_config_strings(text: str, message: str) -> None:
    with pytest.raises(ABConfigError, match="^candidate ") as info:
        parse_config(text, "candidate")
    assert message in str(info.value)


def test_config_parsing() -> None:
    assert parse_config("") == {}
    assert parse_config(" attention_backend=auto , compile=TRUE,dtype=BF16,device=cuda:1 ") == {
        "attention_backend": "auto", "compile": True, "dtype": "bf16", "device": "cuda:1"}
    assert parse_config("cache=0.1") == {"cache": "0.1"} and parse_config("cache=Uniform:3") == {"cache": "uniform:3"}


def test_step_cache_against_the_exact_path(tiny_wan_path: Path) -> None:
    """`cache=uniform:2` vs the exact path: fewer DiT calls, close but not identical frames."""
    report = run_ab(tiny_wan_path, "", "cache=uniform:2", dict(REQUEST, num_inference_steps=8), runs=1, warmup=0,
                    defaults=CPU)
    cmp = report.comparison
    assert report.candidate.load_options["cache"] == "uniform:2" and report.baseline.load_options["cache"] == "off"
    assert not cmp.bit_identical and 20 < cmp.psnr_db < math.inf


def test_fp8_against_the_exact_path() -> None:
    """`quantize=fp8` vs the exact path on the embedded model (128 wide: every block layer takes FP8)."""
    from ditserve.tiny.embedded import default_model_path

    report = run_ab(default_model_path(), "", "quantize=fp8", dict(REQUEST, num_inference_steps=4), runs=1, warmup=0,
                    defaults=CPU)
    cmp = report.comparison
    assert report.candidate.load_options["quantize"] == "fp8"
    assert not cmp.bit_identical and 25 < cmp.psnr_db < math.inf
    assert " fp8" in format_report(report)


def test_bad_configs_fail_before_loading(tiny_wan_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        pytest.fail("run_ab loaded a model before rejecting its arguments")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(refuse))
    with pytest.raises(ABConfigError, match="^candidate: unknown key 'backend'"):
        run_ab(tiny_wan_path, {}, {"backend": "sdpa"}, REQUEST, defaults=CPU)
    with pytest.raises(ABConfigError, match="compile=1 is not true or false"):
        run_ab(tiny_wan_path, {"compile": 1}, {}, REQUEST, defaults=CPU)
    with pytest.raises(ValueError, match="height must be an int, a multiple of 16"):
        run_ab(tiny_wan_path, {}, {}, {**REQUEST, "height": 33}, defaults=CPU)
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        run_ab(tiny_wan_path, {}, {}, REQUEST, runs=0)


def test_cli_end_to_end_prints_table_and_writes_json(tiny_wan_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ab.json"
    rc = cli.main(["ab", "--model", str(tiny_wan_path), "--baseline", "attention_backend=sdpa",
                   "--candidate", "attention_backend=reference", "--runs", "2", "--prompt", "a red ball",
                   "--height", "32", "--width", "32", "--num-frames", "5", "--steps", "2", "--seed", "3",
                   "--negative-prompt", "blurry", "--device", "cpu", "--dtype", "fp32", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for row in ("options", "step time [min-max]", "total time [min-max]", "peak GPU memory", "deterministic",
                "sha256 (uint8)", "NOT bit-identical", "speed: candidate step time"):
        assert row in captured.out
    assert "ditserve ab: run 2/2 candidate" in captured.err  # progress lines
    assert captured.out.rstrip().endswith(f"wrote {out}")
    data = json.loads(out.read_text())
    assert data["runs"] == 2 and data["request"]["seed"] == 3
    assert data["comparison"]["bit_identical"] is False and data["comparison"]["psnr_db"] > 60
    assert [len(r["timings"]["per_step_s"]) for r in data["baseline"]["runs"]] == [2, 2]
    assert data["baseline"]["deterministic"] is True and data["candidate"]["peak_memory_bytes"] is None
    assert data["baseline"]["step_s"].keys() == {"median", "min", "max"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "foo=1"], "argument --baseline 'foo=1': unknown key 'foo'"),
        (["--candidate", "compile=yes"], "argument --candidate 'compile=yes': compile='yes' is not true or false"),
        (["--dtype", "fp8"], "argument --dtype: dtype='fp8' is not a supported dtype"),
        (["--runs", "0"], "argument --runs: must be >= 1, got 0"),
        (["--num-frames", "4"], "argument --num-frames: num_frames must be an int, of the form 4k+1"),
        (["--json", "/no/such/folder/ab.json"], "argument --json: folder /no/such/folder does not exist"),
    ],
)
def test_cli_user_errors(args: list[str], message: str, tiny_wan_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    base = {"--model": str(tiny_wan_path), "--baseline": "attention_backend=sdpa", "--candidate": "attention_backend=sdpa"}
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["ab", *[x for k, v in {**base, **flags}.items() for x in (k, v)]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditserve ab: error: ") and message in err and "Traceback" not in err
