"""A/B harness: is a change safe? Same request, same seed, two loading configurations.

A configuration is a set of loading options (`attention_backend`, `compile`, `dtype`,
`device`, `cache`, `vae_dtype`, `quantize`), written on the command line as `"attention_backend=sdpa,compile=true"`
(or `"cache=0.1"`: step caching against the exact path; `"vae_dtype=bf16"`: the opt-in bf16 decode;
`"quantize=fp8"`: FP8 linear layers). Both
pipelines are loaded once, side by side, then each runs `warmup` untimed generations
(compilation, autotuning, the `auto` selector's trials) and `runs` timed ones, alternating
baseline / candidate within each round so drift (clocks, thermals) hits both alike.

What is compared, and how:
- Output identity: frames are converted exactly as `ditserve.output.to_uint8` does before
  writing a file: `np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)` (round half to
  even), C-contiguous (F, H, W, 3); `sha256` is the SHA-256 of those bytes. "Bit-identical"
  (across runs: `deterministic`; across configurations: `Comparison.bit_identical`) is
  stricter: the float32 frames themselves are equal.
- Differences (max / mean |diff|, PSNR) use the first timed run's float32 frames in [0, 1].
- Speed: the median over runs of each run's mean step time (`timings['step_mean_s']`) and
  total time, with min-max spread; ratios are baseline / candidate (> 1: candidate faster).
- Peak GPU memory: both pipelines are resident during every run, so the raw
  `max_memory_allocated` would count the other one's weights too. Reported instead: this
  configuration's resident bytes (measured across its load) plus the run's peak above what
  was allocated before it: what the run would peak at with this pipeline loaded alone.
  Loading both needs memory for two sets of weights (Wan2.1-1.3B in bf16: about 2 x 14 GB,
  mostly the UMT5 text encoder).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditserve.attention import BACKEND_FACTORIES, resolve_backend_name
from ditserve.engine.step_cache import parse_step_cache
from ditserve.output import to_uint8
from ditserve.pipelines.errors import PipelineConfigError
from ditserve.models.fp8 import QUANTIZE_MODES
from ditserve.pipelines.options import DTYPE_NAMES, resolve_device, resolve_dtype, resolve_quantize

__all__ = [
    "CONFIG_OPTIONS",
    "ABConfigError",
    "ABReport",
    "Comparison",
    "ConfigResult",
    "RunRecord",
    "Spread",
    "format_report",
    "frames_sha256",
    "parse_config",
    "run_ab",
]


class ABConfigError(PipelineConfigError):
    """A configuration string or mapping names an unknown option or a value it cannot take."""


# -- configuration options ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigOption:
    """One loading option: the values it accepts (for errors) and how to read one."""

    accepted: str
    parse: Callable[[Any], Any]  # raises ValueError with the reason


def _parse_backend(value: Any) -> str:
    if not isinstance(value, str) or (value != "auto" and value not in BACKEND_FACTORIES):
        raise ValueError("not an attention backend")
    return value


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("not true or false")


def _parse_dtype(value: Any) -> str:
    if isinstance(value, torch.dtype):
        names = [n for n, d in DTYPE_NAMES.items() if d == value]
        if names:
            return names[0]
    elif isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return value.lower()
    raise ValueError("not a supported dtype")


def _parse_device(value: Any) -> str:
    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError):
        raise ValueError("not a torch device") from None


def _parse_cache(value: Any) -> str:
    try:
        return "off" if parse_step_cache(value) is None else str(value).strip().lower()
    except ValueError:
        raise ValueError("not a step cache setting") from None


def _parse_quantize(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in ("none", *QUANTIZE_MODES):
        return value.strip().lower()
    raise ValueError("not a quantization mode")


# Keys are `Pipeline.from_pretrained` arguments; add a key here (and there) to A/B a new option.
CONFIG_OPTIONS: Mapping[str, ConfigOption] = {
    "attention_backend": ConfigOption("auto|" + "|".join(BACKEND_FACTORIES), _parse_backend),
    "compile": ConfigOption("true|false", _parse_bool),
    "dtype": ConfigOption("|".join(DTYPE_NAMES), _parse_dtype),
    "device": ConfigOption("cpu|cuda|cuda:N", _parse_device),
    "cache": ConfigOption("off|<threshold>|uniform:N", _parse_cache),
    "vae_dtype": ConfigOption("bf16|fp32", _parse_dtype),
    "quantize": ConfigOption("none|fp8", _parse_quantize),
}


def _accepted() -> str:
    return ", ".join(f"{key}=<{opt.accepted}>" for key, opt in CONFIG_OPTIONS.items())


def check_config(options: Mapping[str, Any], source: str = "configuration") -> dict[str, Any]:
    """Normalised copy of `options` (values as strings/bools); unknown keys or bad values raise."""
    checked: dict[str, Any] = {}
    for key, value in options.items():
        option = CONFIG_OPTIONS.get(key)
        if option is None:
            raise ABConfigError(f"{source}: unknown key {key!r}; accepted: {_accepted()}")
        try:
            checked[key] = option.parse(value)
        except ValueError as e:
            raise ABConfigError(f"{source}: {key}={value!r} is {e}; {key} accepts {option.accepted}") from None
    return checked


def parse_config(text: str, source: str = "configuration") -> dict[str, Any]:
    """`"key=value,key=value"` -> checked options; "" -> {} (every option at its default)."""
    options: dict[str, str] = {}
    where = f"{source} {text!r}"
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ABConfigError(f"{where}: {item!r} is not key=value; accepted: {_accepted()}")
        if key in options:
            raise ABConfigError(f"{where}: {key!r} given twice")
        options[key] = value
    return check_config(options, where)


def _format_config(options: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()) or "(defaults)"


def _load_kwargs(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`from_pretrained` keyword arguments with device, dtype and backend resolved (errors now, not at load)."""
    kwargs = {**defaults, **options}
    device = resolve_device(kwargs.get("device"))
    kwargs["device"] = device
    kwargs["dtype"] = resolve_dtype(kwargs.get("dtype"), device)
    try:
        kwargs["attention_backend"] = resolve_backend_name(kwargs.get("attention_backend"))
    except ValueError as e:
        raise ABConfigError(str(e)) from None
    kwargs["compile"] = bool(kwargs.get("compile", False))
    kwargs["cache"] = kwargs.get("cache", "off")
    try:
        resolve_quantize(kwargs.get("quantize"), device)
    except PipelineConfigError as e:
        raise ABConfigError(str(e)) from None
    return kwargs


# -- measurements --------------------------------------------------------------------------------


def frames_sha256(frames: np.ndarray) -> str:
    """SHA-256 (hex) of the frames as written to files: `ditserve.output.to_uint8(frames).tobytes()`."""
    return hashlib.sha256(to_uint8(frames).tobytes()).hexdigest()


@dataclass(frozen=True)
class Spread:
    """Median and range of one measurement over the timed runs."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class RunRecord:
    """One timed generation."""

    sha256: str  # of the uint8 frames
    float32_sha256: str  # of the float32 frames: the determinism check
    step_mean_s: float
    total_s: float
    timings: dict[str, Any]  # the pipeline's own, per_step_s included
    peak_memory_bytes: int | None  # None off CUDA; see the module docstring


@dataclass
class ConfigResult:
    """All timed runs of one configuration."""

    label: str  # the options as given
    load_options: dict[str, Any]  # resolved: device, dtype, attention_backend, compile
    backends_used: list[str]  # what the attention selector ran (tells what `auto` picked)
    resident_bytes: int | None
    runs: list[RunRecord]
    frames: np.ndarray = field(repr=False)  # the first timed run's, for the comparison

    @property
    def sha256(self) -> str:
        return self.runs[0].sha256

    @property
    def deterministic(self) -> bool:
        return len({r.float32_sha256 for r in self.runs}) == 1

    @property
    def distinct_outputs(self) -> int:
        return len({r.float32_sha256 for r in self.runs})

    @property
    def step_s(self) -> Spread:
        return Spread.of([r.step_mean_s for r in self.runs])

    @property
    def total_s(self) -> Spread:
        return Spread.of([r.total_s for r in self.runs])

    @property
    def peak_memory_bytes(self) -> int | None:
        peaks = [r.peak_memory_bytes for r in self.runs if r.peak_memory_bytes is not None]
        return max(peaks) if peaks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "load_options": self.load_options,
            "backends_used": self.backends_used,
            "sha256": self.sha256,
            "deterministic": self.deterministic,
            "distinct_outputs": self.distinct_outputs,
            "step_s": vars(self.step_s),
            "total_s": vars(self.total_s),
            "peak_memory_bytes": self.peak_memory_bytes,
            "resident_bytes": self.resident_bytes,
            "runs": [vars(r) for r in self.runs],
        }


@dataclass(frozen=True)
class Comparison:
    """Baseline vs candidate: first timed run's frames, median times."""

    bit_identical: bool  # float32 frames equal
    uint8_identical: bool  # same sha256
    max_abs_diff: float
    mean_abs_diff: float
    psnr_db: float  # inf when identical
    step_speedup: float  # baseline / candidate median step time
    total_speedup: float

    @classmethod
    def of(cls, baseline: ConfigResult, candidate: ConfigResult) -> Comparison:
        a, b = baseline.frames, candidate.frames
        if a.shape != b.shape:
            raise ValueError(f"frames of different shapes: {a.shape} vs {b.shape}")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        mse = float(np.mean(diff**2))
        return cls(
            bit_identical=bool(np.array_equal(a, b)),
            uint8_identical=baseline.sha256 == candidate.sha256,
            max_abs_diff=float(diff.max()),
            mean_abs_diff=float(diff.mean()),
            psnr_db=math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
            step_speedup=_ratio(baseline.step_s.median, candidate.step_s.median),
            total_speedup=_ratio(baseline.total_s.median, candidate.total_s.median),
        )


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


@dataclass
class ABReport:
    """Everything `run_ab` measured; `to_dict` / `write_json` for benchmarks."""

    model: str
    request: dict[str, Any]
    runs: int
    warmup: int
    baseline: ConfigResult
    candidate: ConfigResult
    comparison: Comparison
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats (PSNR of identical frames) become null."""
        data = {
            "model": self.model,
            "request": self.request,
            "runs": self.runs,
            "warmup": self.warmup,
            "frames_to_uint8": "np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8), C order (F, H, W, 3)",
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
            "comparison": vars(self.comparison),
            "environment": self.environment,
        }
        return _finite(data)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# -- the harness ---------------------------------------------------------------------------------


def _allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _timed_run(pipe: Any, request: Mapping[str, Any], resident: int | None) -> tuple[RunRecord, np.ndarray]:
    device = pipe.device
    before = _allocated(device)
    if before is not None:
        torch.cuda.reset_peak_memory_stats(device)
    out = pipe.generate(**request)
    peak = None
    if before is not None:
        torch.cuda.synchronize(device)
        peak = (resident or 0) + torch.cuda.max_memory_allocated(device) - before
    frames = np.ascontiguousarray(out.frames, dtype=np.float32)
    t = out.timings
    record = RunRecord(
        sha256=frames_sha256(frames),
        float32_sha256=hashlib.sha256(frames.tobytes()).hexdigest(),
        step_mean_s=float(t["step_mean_s"]),
        total_s=float(t["total_s"]),
        timings=dict(t),
        peak_memory_bytes=peak,
    )
    return record, frames


def _backends_used(pipe: Any) -> list[str]:
    used: set[str] = set()
    for module in pipe.denoisers():
        selector = getattr(module, "attention_selector", None)
        if selector is not None:
            used.update(selector.choices.values())
    return sorted(used)


def _environment(devices: list[torch.device]) -> dict[str, Any]:
    from ditserve import __version__

    names = {str(d): torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu" for d in devices}
    return {"ditserve": __version__, "torch": torch.__version__, "devices": names}


def run_ab(
    model: str | os.PathLike[str],
    baseline: Mapping[str, Any] | str,
    candidate: Mapping[str, Any] | str,
    request: Mapping[str, Any],
    runs: int = 3,
    *,
    warmup: int = 1,
    defaults: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ABReport:
    """Load `model` under both configurations and compare the same generation; see the module docstring.

    baseline / candidate: option mappings or `"key=value,..."` strings (keys in `CONFIG_OPTIONS`).
    request: `Pipeline.generate` keyword arguments (prompt, ..., seed); validated against the
    model's spec before loading (left-out parameters take the model's defaults).
    defaults: options for keys a configuration leaves out (the CLI's --device / --dtype).
    progress(message) is told what is about to run.
    """
    from ditserve.pipelines import Pipeline, read_request_spec

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    say = progress or (lambda message: None)
    shared = check_config({k: v for k, v in (defaults or {}).items() if v is not None}, "defaults")
    configs = {}
    for role, given in (("baseline", baseline), ("candidate", candidate)):
        options = parse_config(given, role) if isinstance(given, str) else check_config(given, role)
        configs[role] = (options, _load_kwargs(options, shared))
    # the model's own rules, before loading; the report shows every parameter, defaults included
    request = read_request_spec(model).validate(request).fields()

    pipes, resident = {}, {}
    for role, (options, kwargs) in configs.items():
        say(f"loading {role} ({_format_config(options)})")
        before = _allocated(kwargs["device"])
        pipes[role] = Pipeline.from_pretrained(model, **kwargs)
        after = _allocated(kwargs["device"])
        resident[role] = None if before is None else after - before
    for role, pipe in pipes.items():
        for i in range(warmup):
            say(f"warm-up {i + 1}/{warmup} {role}")
            pipe.generate(**request)

    records: dict[str, list[RunRecord]] = {role: [] for role in pipes}
    first_frames: dict[str, np.ndarray] = {}
    for round_index in range(runs):
        for role, pipe in pipes.items():
            say(f"run {round_index + 1}/{runs} {role}")
            record, frames = _timed_run(pipe, request, resident[role])
            records[role].append(record)
            first_frames.setdefault(role, frames)

    results = {}
    for role, (options, kwargs) in configs.items():
        resolved = {**kwargs, "device": str(kwargs["device"]), "dtype": str(kwargs["dtype"]).removeprefix("torch.")}
        results[role] = ConfigResult(label=_format_config(options), load_options=resolved,
                                     backends_used=_backends_used(pipes[role]), resident_bytes=resident[role],
                                     runs=records[role], frames=first_frames[role])
    return ABReport(
        model=str(model),
        request=request,
        runs=runs,
        warmup=warmup,
        baseline=results["baseline"],
        candidate=results["candidate"],
        comparison=Comparison.of(results["baseline"], results["candidate"]),
        environment=_environment([p.device for p in pipes.values()]),
    )


# -- the printed report --------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _spread(s: Spread, scale: float, unit: str, digits: int) -> str:
    return f"{s.median * scale:.{digits}f} {unit} [{s.min * scale:.{digits}f}-{s.max * scale:.{digits}f}]"


def _deterministic(result: ConfigResult) -> str:
    n = len(result.runs)
    if result.deterministic:
        return f"yes ({n}/{n} bit-identical)"
    return f"NO ({result.distinct_outputs} distinct outputs in {n} runs)"


def format_report(report: ABReport) -> str:
    """A plain-text table: each configuration's numbers side by side, then the verdict."""
    r = report.request
    b, c, cmp = report.baseline, report.candidate, report.comparison
    head = (f"ditserve ab: {report.model}\n{r.get('num_frames')} frame(s) {r.get('width')}x{r.get('height')}, "
            f"{r.get('num_inference_steps')} steps, guidance {r.get('guidance_scale')}, seed {r.get('seed')}; "
            f"{report.runs} timed run(s) each after {report.warmup} warm-up, alternating")

    def loaded(x: ConfigResult) -> str:
        o = x.load_options
        attn = "+".join(x.backends_used) or o["attention_backend"]
        cache = f" step cache {o['cache']}" if o.get("cache", "off") != "off" else ""
        cache += f" VAE {o['vae_dtype']}" if o.get("vae_dtype") else ""
        cache += f" {o['quantize']}" if o.get("quantize", "none") != "none" else ""
        return f"{o['device']} {o['dtype']} {attn}" + (" compiled" if o["compile"] else "") + cache

    rows = [
        ("", "baseline", "candidate", "base/cand"),
        ("options", b.label, c.label, ""),
        ("loaded as", loaded(b), loaded(c), ""),
        ("step time [min-max]", _spread(b.step_s, 1e3, "ms", 2), _spread(c.step_s, 1e3, "ms", 2),
         f"{cmp.step_speedup:.3f}x"),
        ("total time [min-max]", _spread(b.total_s, 1, "s", 3), _spread(c.total_s, 1, "s", 3),
         f"{cmp.total_speedup:.3f}x"),
        ("peak GPU memory", _bytes(b.peak_memory_bytes), _bytes(c.peak_memory_bytes), ""),
        ("deterministic", _deterministic(b), _deterministic(c), ""),
        ("sha256 (uint8)", b.sha256[:16], c.sha256[:16], ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if cmp.bit_identical:
        verdict = "bit-identical: baseline and candidate frames are equal (PSNR inf)"
    else:
        verdict = (f"NOT bit-identical: max |diff| {cmp.max_abs_diff:.3g}, mean |diff| {cmp.mean_abs_diff:.3g}, "
                   f"PSNR {cmp.psnr_db:.1f} dB"
                   + ("; same uint8 video (same sha256)" if cmp.uint8_identical else ""))
    speed = (f"speed: candidate step time {cmp.step_speedup:.3f}x, total {cmp.total_speedup:.3f}x "
             "(baseline / candidate median; > 1 means the candidate is faster)")
    hashes = [f"sha256 baseline   {b.sha256}", f"sha256 candidate  {c.sha256}"]
    return "\n".join([head, "", *table, "", *hashes, verdict, speed])
