"""A family's request parameters as data (`RequestSpec`) and the one validator that reads them.

Each model family declares what a request may hold: names, types, defaults, limits and size
rules (`Param`), whether it makes videos or images, and whether it takes a first-frame image.
Validation, the CLI's flags and help, the server's request bodies and defaults, `ditserve ab`
and the engine's token count all read that declaration, so no family's constants live
anywhere else. Validation needs no torch, no model and no device: it runs before any work.

A `GenerationRequest` holds the fields every family has (prompt, size, frames, steps,
guidance, seed, fps, an optional image) as attributes, and a family's own parameters (e.g.
Wan2.2-A14B's `guidance_scale_2`) in `extras`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np

from ditserve.engine.errors import InvalidRequest
from ditserve.engine.images import load_image

__all__ = [
    "COMMON_FIELDS",
    "MAX_SEED",
    "GenerationRequest",
    "InvalidRequest",
    "Output",
    "Param",
    "RequestSpec",
    "standard_params",
]

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64 - 1]
MAX_PROMPT_CHARS = 8_192  # far beyond what any text encoder reads (Wan's UMT5: 512 tokens)
Output = Literal["video", "image"]


class FrozenParams(dict):
    """A read-only dict (a request's `extras`): hashable requests need no mutation, and unlike a
    MappingProxyType it pickles and deep-copies (`dataclasses.asdict`)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a request's parameters are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenParams, (dict(self),))


@dataclass(frozen=True)
class GenerationRequest:
    """A validated, normalised request: plain ints, floats and strings.

    `extras`: the family's own parameters by name (read-only). `image`: the first-frame
    image (uint8 `[H, W, 3]`) for families that take one, else None.
    """

    prompt: str
    negative_prompt: str = ""
    height: int = 32
    width: int = 32
    num_frames: int = 1
    num_inference_steps: int = 1
    guidance_scale: float = 1.0
    seed: int = 0
    fps: float = 16.0
    extras: Mapping[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", FrozenParams(self.extras))

    def fields(self) -> dict[str, Any]:
        """Every parameter by name (common ones and extras; not the image): what a spec validates."""
        common = {name: getattr(self, name) for name in COMMON_FIELDS}
        return {**common, **self.extras}

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)


COMMON_FIELDS = ("prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                 "guidance_scale", "seed", "fps")


@dataclass(frozen=True)
class Param:
    """One request parameter: its type, default and limits.

    kind: "int", "float" or "str". minimum / maximum: inclusive bounds (for "str": length in
    characters). multiple / offset: an int must satisfy (value - offset) % multiple == 0
    (sizes: multiples of 16; Wan frames: 4k+1). nullable: None is accepted and kept (its
    meaning is the help's, e.g. "same as guidance_scale"). flag: the CLI flag (default
    `--name-with-dashes`).
    """

    name: str
    kind: Literal["int", "float", "str"]
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    multiple: int = 1
    offset: int = 0
    nullable: bool = False
    flag: str | None = None
    limited_by: str | None = None  # what set `maximum` below the model's own, named in errors (a server flag)

    @property
    def python_type(self) -> type:
        """int, float or str: what a command line or a request body parses the value as."""
        return {"int": int, "float": float, "str": str}[self.kind]

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def accepted(self) -> str:
        """What values are accepted, in words (for errors and help)."""
        if self.kind == "str":
            noun = "a non-empty string" if self.minimum else "a string"
            return f"{noun} of at most {self.maximum:.0f} characters" if self.maximum is not None else noun
        noun = "an int" if self.kind == "int" else "a finite number"
        rules = []
        if self.multiple > 1:
            if self.offset:
                examples = ", ".join(str(self.multiple * k + self.offset) for k in range(3))
                rules.append(f"of the form {self.multiple}k+{self.offset} ({examples}, ...)")
            else:
                rules.append(f"a multiple of {self.multiple}")
        if self.minimum is not None and self.maximum is not None:
            rules.append(f"in [{_number(self.minimum)}, {_number(self.maximum)}]")
        elif self.minimum is not None:
            rules.append(f">= {_number(self.minimum)}")
        elif self.maximum is not None:
            rules.append(f"<= {_number(self.maximum)}")
        if self.limited_by is not None:
            rules.append(f"(max set by {self.limited_by})")
        return ", ".join([noun, *rules]) + (" or null" if self.nullable else "")

    def check(self, value: Any) -> Any:
        """The normalised value, or `InvalidRequest` naming this parameter and what it accepts."""
        if value is None and self.nullable:
            return None
        if self.kind == "str":
            return self._check_str(value)
        if self.kind == "int":
            if not isinstance(value, Integral) or isinstance(value, bool):
                raise InvalidRequest(self.name, f"{self.name} must be {self.accepted()}, got {_shown(value)}")
            number: int | float = int(value)
        else:
            if not isinstance(value, Real) or isinstance(value, bool):
                raise InvalidRequest(self.name, f"{self.name} must be {self.accepted()}, got {_shown(value)}")
            number = float(value)
            if not math.isfinite(number):
                raise InvalidRequest(self.name, f"{self.name} must be {self.accepted()}, got {number}")
        too_small = self.minimum is not None and number < self.minimum
        too_large = self.maximum is not None and number > self.maximum
        off_grid = self.kind == "int" and (number - self.offset) % self.multiple != 0
        if too_small or too_large or off_grid:
            raise InvalidRequest(self.name, f"{self.name} must be {self.accepted()}, got {_number(number)}")
        return number

    def _check_str(self, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidRequest(self.name, f"{self.name} must be {self.accepted()}, got {type(value).__name__}")
        if self.maximum is not None and len(value) > self.maximum:
            raise InvalidRequest(self.name, f"{self.name} must be at most {self.maximum:.0f} characters, "
                                            f"got {len(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(self.name, f"{self.name} must be valid Unicode text; it holds an unpaired "
                                            f"surrogate at character {e.start}") from None
        if "\x00" in value:
            raise InvalidRequest(self.name, f"{self.name} must not contain NUL characters")
        if self.minimum and not value.strip():
            raise InvalidRequest(self.name, f"{self.name} must be a non-empty string, got an empty or "
                                            "whitespace-only string")
        return value


def _number(x: float) -> str:
    """A number for a message; huge ints are summarised (str() of a 5,000-digit int raises)."""
    if isinstance(x, int):
        return str(x) if x.bit_length() <= 128 else f"an int of {x.bit_length()} bits"
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:g}"


def _shown(value: Any) -> str:
    text = _number(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _largest_valid(p: Param, limit: int) -> int:
    """The largest value of an int parameter's grid (offset + k * multiple) that is <= limit."""
    return p.offset + (limit - p.offset) // p.multiple * p.multiple


def standard_params(
    *,
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    fps: float,
    size_multiple: tuple[int, int],
    max_size: tuple[int, int],
    frame_multiple: int,
    max_frames: int,
    max_steps: int,
    guidance_help: str,
    negative_prompt: str = "",
) -> tuple[Param, ...]:
    """The parameters every family has, with the family's defaults and limits.

    size_multiple / max_size: (height, width). frame_multiple: frames are k*multiple + 1
    (1 for image models: any count, usually 1). max_frames: 1 for image models.
    """
    frame_rule = dict(multiple=frame_multiple, offset=1) if frame_multiple > 1 else {}
    return (
        Param("prompt", "str", None, "what to generate", minimum=1, maximum=MAX_PROMPT_CHARS),
        Param("negative_prompt", "str", negative_prompt, "what to steer away from (with guidance)",
              maximum=MAX_PROMPT_CHARS),
        Param("height", "int", height, "pixels", minimum=size_multiple[0], maximum=max_size[0],
              multiple=size_multiple[0]),
        Param("width", "int", width, "pixels", minimum=size_multiple[1], maximum=max_size[1],
              multiple=size_multiple[1]),
        Param("num_frames", "int", num_frames, "frames of the video (1: one image)", minimum=1, maximum=max_frames,
              **frame_rule),
        Param("num_inference_steps", "int", num_inference_steps, "denoising steps", minimum=1, maximum=max_steps,
              flag="--steps"),
        Param("guidance_scale", "float", guidance_scale, guidance_help, minimum=0, maximum=100),
        Param("seed", "int", 0, "noise seed", minimum=0, maximum=MAX_SEED),
        Param("fps", "float", fps, "frames per second of the written video", minimum=1, maximum=120),
    )


@dataclass(frozen=True)
class RequestSpec:
    """What a family's requests may hold (see the module docstring).

    params: the common parameters first (`standard_params`), then the family's own.
    output: "video" or "image" (an image model makes one frame). takes_image: a first-frame
    image may be given. max_image_pixels: the largest input image accepted (width x height,
    before resizing to the request's size). max_pixels: the largest frame (height x width),
    None for the size limits alone; `pixels_limited_by` names what set it (a server flag).
    modes: what the model serves, in words (e.g. "text-to-video and text-to-image"), added to
    the errors for inputs it does not take (an unknown parameter, an image), so a request for
    one of a model's other modes learns what is supported. cfg_param: the parameter whose value
    above 1 runs classifier-free guidance (two samples per request), None if the family has none;
    it tells how many samples a request with the defaults makes (`default_samples`).
    """

    params: tuple[Param, ...]
    output: Output = "video"
    takes_image: bool = False
    max_image_pixels: int = 4096 * 4096
    max_pixels: int | None = None
    pixels_limited_by: str | None = None
    modes: str | None = None
    cfg_param: str | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if self.cfg_param is not None and self.cfg_param not in names:
            raise ValueError(f"cfg_param {self.cfg_param!r} is not one of the parameters {names}")
        if tuple(names[: len(COMMON_FIELDS)]) != COMMON_FIELDS:
            raise ValueError(f"a RequestSpec starts with the common parameters {COMMON_FIELDS}, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        for p in self.params[1:]:  # a declaration whose defaults break its own limits is a bug
            try:
                p.check(p.default)
            except InvalidRequest as e:
                raise ValueError(f"default {e}") from None

    @property
    def default_samples(self) -> int:
        """Samples per step of a request that leaves every parameter at its default: 2 with
        classifier-free guidance, else 1 (what `--num-gpus` splits by default)."""
        if self.cfg_param is None:
            return 1
        return 2 if self.param(self.cfg_param).default > 1 else 1

    @property
    def extras(self) -> tuple[Param, ...]:
        """The family's own parameters (beyond the common ones)."""
        return self.params[len(COMMON_FIELDS):]

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        """Every parameter's default (the prompt's is None: it has none)."""
        return {p.name: p.default for p in self.params}

    def with_defaults(self, overrides: Mapping[str, Any]) -> RequestSpec:
        """This spec with other defaults (e.g. a checkpoint's own), each checked against its limits."""
        unknown = sorted(set(overrides) - {p.name for p in self.params} - {"prompt"})
        if unknown:
            raise ValueError(f"unknown request parameter(s) {unknown}; known: {[p.name for p in self.params]}")
        params = []
        for p in self.params:
            if p.name in overrides:
                try:
                    p.check(overrides[p.name])
                except InvalidRequest as e:
                    raise ValueError(f"default {e}") from None
                p = replace(p, default=overrides[p.name])
            params.append(p)
        return replace(self, params=tuple(params))

    def with_limits(self, *, max_steps: int | None = None, max_frames: int | None = None,
                    max_pixels: int | None = None, flags: Mapping[str, str] | None = None) -> RequestSpec:
        """This spec with tighter limits (an operator's; never looser than the model's own). `flags`
        names, per limit ("max_steps", "max_frames", "max_pixels"), what set it, for error messages."""
        flags = dict(flags or {})
        params = []
        for p in self.params:
            limit, key = {"num_inference_steps": (max_steps, "max_steps"),
                          "num_frames": (max_frames, "max_frames")}.get(p.name, (None, ""))
            if limit is not None:
                if limit < (p.minimum or 1):
                    raise ValueError(f"{key} must be >= {_number(p.minimum or 1)}, got {limit}")
                if p.maximum is None or limit < p.maximum:
                    p = replace(p, maximum=limit, limited_by=flags.get(key))
                    if p.default is not None and p.default > limit:  # the default must stay valid
                        p = replace(p, default=_largest_valid(p, limit))
            params.append(p)
        spec = replace(self, params=tuple(params))
        if max_pixels is not None:
            if max_pixels < 1:
                raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
            if self.max_pixels is None or max_pixels < self.max_pixels:
                spec = replace(spec, max_pixels=max_pixels, pixels_limited_by=flags.get("max_pixels"))
        return spec

    def _modes_note(self) -> str:
        return f" (it serves {self.modes} only)" if self.modes else ""

    def validate(self, fields: Mapping[str, Any], image: Any = None) -> GenerationRequest:
        """Check every field (missing ones take the defaults) and return the normalised request.

        Raises `InvalidRequest` on the first bad field, in declaration order (prompt first), so a
        request with several errors always reports the same one. Unknown names are refused.
        `negative_prompt=None` means the default. `image`: see `ditserve.engine.images`.
        """
        known = {p.name for p in self.params}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise InvalidRequest(unknown[0], f"unknown parameter(s) {unknown} for this model; it takes: "
                                             f"{', '.join(p.name for p in self.params)}{self._modes_note()}")
        values: dict[str, Any] = {}
        for p in self.params:
            value = fields.get(p.name, p.default)
            if value is None and p.name == "negative_prompt":
                value = p.default
            if value is None and p.name == "prompt":
                raise InvalidRequest("prompt", "prompt is required: a non-empty string")
            values[p.name] = p.check(value)
        if self.max_pixels is not None and values["height"] * values["width"] > self.max_pixels:
            by = f" ({self.pixels_limited_by})" if self.pixels_limited_by else ""
            raise InvalidRequest("height", f"height x width must be at most {self.max_pixels} pixels per frame{by}, "
                                           f"got {values['height']}x{values['width']} = "
                                           f"{values['height'] * values['width']}")
        if self.output == "image" and values["num_frames"] != 1:
            raise InvalidRequest("num_frames", f"this model makes images: num_frames must be 1, got "
                                               f"{values['num_frames']}")
        picture = None
        if image is not None:
            if not self.takes_image:
                raise InvalidRequest("image", f"this model does not take an input image{self._modes_note()}")
            picture = load_image(image, max_pixels=self.max_image_pixels)
        common = {name: values.pop(name) for name in COMMON_FIELDS}
        return GenerationRequest(**common, extras=values, image=picture)
