"""Checking a generation request before any heavy work (no torch, no model, no GPU).

The Python API, the CLI and the HTTP server all call `validate_request`, so a bad request
fails the same way everywhere: an `InvalidRequest` naming the field and the values it
accepts, raised before a single weight is read or a kernel launched.

Size rules come from the model's compression: a Wan2.1 latent is the video divided by the
VAE's factors (8 spatial, 4 temporal), then patchified by 2x2, so height and width must be
multiples of 8 * 2 = 16 and frame counts of the form 4k + 1. The defaults are Wan2.1's; a
loaded pipeline passes its own (derived from its configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

__all__ = ["MAX_SEED", "GenerationRequest", "InvalidRequest", "validate_request"]

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64 - 1]


class InvalidRequest(ValueError):
    """A request field is out of range or of the wrong type. `field` names it (for HTTP 422s)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    """A validated, normalised request: plain ints, a float guidance, strings."""

    prompt: str
    negative_prompt: str = ""
    height: int = 480
    width: int = 832
    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 0


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_int(value: Any) -> bool:
    """ints and numpy integers; not bools (True is an int in Python, never a size)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _int_field(field: str, value: Any, accepted: str) -> int:
    if not _is_int(value):
        raise InvalidRequest(field, f"{field} must be {accepted}, got {_type_name(value)} {value!r}")
    return int(value)


def _size(field: str, value: Any, multiple: int) -> int:
    accepted = f"a positive multiple of {multiple}"
    number = _int_field(field, value, f"an int ({accepted})")
    if number <= 0 or number % multiple:
        raise InvalidRequest(field, f"{field} must be {accepted}, got {number}")
    return number


def _frames(value: Any, multiple: int) -> int:
    examples = ", ".join(str(multiple * k + 1) for k in range(3))
    accepted = f"of the form {multiple}k+1 ({examples}, ...)"
    number = _int_field("num_frames", value, f"an int {accepted}")
    if number < 1 or (number - 1) % multiple:
        raise InvalidRequest("num_frames", f"num_frames must be {accepted}, got {number}")
    return number


def validate_request(
    prompt: Any,
    negative_prompt: Any = "",
    height: Any = 480,
    width: Any = 832,
    num_frames: Any = 81,
    num_inference_steps: Any = 50,
    guidance_scale: Any = 5.0,
    seed: Any = 0,
    *,
    height_multiple: int = 16,
    width_multiple: int = 16,
    frame_multiple: int = 4,
) -> GenerationRequest:
    """Check every field and return the normalised request; raise `InvalidRequest` on the first bad one.

    Fields are checked in signature order (prompt first), so a request with several errors
    always reports the same one. `negative_prompt=None` means "" (as in diffusers).
    """
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt", f"prompt must be a non-empty string, got {_type_name(prompt)}")
    if not prompt.strip():
        raise InvalidRequest("prompt", "prompt must be a non-empty string, got an empty or whitespace-only string")
    if negative_prompt is None:
        negative_prompt = ""
    if not isinstance(negative_prompt, str):
        raise InvalidRequest("negative_prompt", f"negative_prompt must be a string, got {_type_name(negative_prompt)}")

    height = _size("height", height, height_multiple)
    width = _size("width", width, width_multiple)
    num_frames = _frames(num_frames, frame_multiple)

    steps = _int_field("num_inference_steps", num_inference_steps, "an int >= 1")
    if steps < 1:
        raise InvalidRequest("num_inference_steps", f"num_inference_steps must be an int >= 1, got {steps}")

    if not isinstance(guidance_scale, Real) or isinstance(guidance_scale, bool):
        raise InvalidRequest(
            "guidance_scale",
            f"guidance_scale must be a finite number >= 0, got {_type_name(guidance_scale)} {guidance_scale!r}",
        )
    guidance = float(guidance_scale)
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidRequest("guidance_scale", f"guidance_scale must be a finite number >= 0, got {guidance}")

    seed_value = _int_field("seed", seed, "an int in [0, 2**64-1]")
    if not 0 <= seed_value <= MAX_SEED:
        raise InvalidRequest("seed", f"seed must be an int in [0, 2**64-1], got {seed_value}")

    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed_value,
    )
