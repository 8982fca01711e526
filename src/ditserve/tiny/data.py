"""The tiny model's world: a prompt grammar, a held-out split, and a procedural clip renderer.

A scene is one shape of one colour moving in one direction over a uniform background,
e.g. "a red circle moving left on a blue background". Clips are rendered in code (no data
set to download), anti-aliased so that sub-pixel motion is smooth, and deterministic given a
seed. Colours are corners of the RGB cube, at least 1.0 apart, so a scorer can tell them
apart from pixel statistics alone (`ditserve.tiny.score`).

The held-out scenes (`held_out_scenes`) are never used in training: evaluating on them
measures whether the model composes attributes it saw separately, not whether it memorised
prompts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import product
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "DIRECTIONS",
    "FRAMES",
    "GRAMMAR_WORDS",
    "NUM_HELD_OUT",
    "SHAPES",
    "SIZE",
    "Scene",
    "all_scenes",
    "held_out_scenes",
    "parse_prompt",
    "render_clip",
    "render_clips",
    "train_scenes",
]

SIZE = 32  # height = width in pixels: 4x4 latents after the Wan VAE's 8x spatial compression
FRAMES = 17  # 4k+1 frames: 5 latent frames after the Wan VAE's 4x temporal compression

COLOURS: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "red": (1.0, 0.0, 0.0),
        "green": (0.0, 1.0, 0.0),
        "blue": (0.0, 0.0, 1.0),
        "yellow": (1.0, 1.0, 0.0),
        "white": (1.0, 1.0, 1.0),
        "black": (0.0, 0.0, 0.0),
    }
)
BACKGROUND_COLOURS = COLOURS  # same palette; a scene's object and background colours differ
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# (dx, dy) per unit of travel; image coordinates, y grows downwards.
DIRECTIONS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
)
GRAMMAR_WORDS: tuple[str, ...] = ("a", "moving", "on", "background", *COLOURS, *SHAPES, *DIRECTIONS)
NUM_HELD_OUT = 36  # 10% of the 360 scenes

_PROMPT = re.compile(r"^a (\w+) (\w+) moving (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    """One prompt of the grammar; `Scene(...).prompt` is its text."""

    colour: str
    shape: str
    direction: str
    background: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("background", self.background, BACKGROUND_COLOURS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}, got {value!r}")
        if self.colour == self.background:
            raise ValueError(f"object and background are both {self.colour!r}; a scene needs two colours")

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """The scene a grammar prompt describes; ValueError (saying the grammar) for any other text."""
    match = _PROMPT.match(" ".join(prompt.lower().split()))
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a tiny-model prompt; expected 'a <colour> <shape> moving <direction> on a "
            f"<colour> background' with colours {', '.join(COLOURS)}, shapes {', '.join(SHAPES)}, "
            f"directions {', '.join(DIRECTIONS)}"
        )
    colour, shape, direction, background = match.groups()
    return Scene(colour, shape, direction, background)


@cache
def all_scenes() -> tuple[Scene, ...]:
    """Every scene of the grammar (6 colours x 5 other backgrounds x 3 shapes x 4 directions = 360)."""
    return tuple(
        Scene(c, s, d, b)
        for c, b, s, d in product(COLOURS, BACKGROUND_COLOURS, SHAPES, DIRECTIONS)
        if c != b
    )


def _rank(scene: Scene) -> str:
    """A fixed pseudo-random order (sha256 of the prompt): the same split on every Python and OS."""
    return hashlib.sha256(scene.prompt.encode()).hexdigest()


@cache
def held_out_scenes() -> tuple[Scene, ...]:
    """The NUM_HELD_OUT scenes never trained on: the first ones in sha256-of-prompt order."""
    chosen = set(sorted(all_scenes(), key=_rank)[:NUM_HELD_OUT])
    return tuple(s for s in all_scenes() if s in chosen)


@cache
def train_scenes() -> tuple[Scene, ...]:
    """All scenes but the held-out ones, in `all_scenes` order."""
    held = set(held_out_scenes())
    return tuple(s for s in all_scenes() if s not in held)


# -- rendering -----------------------------------------------------------------------------

# Sizes as fractions of the frame side, so a larger SIZE renders the same scenes.
_RADIUS = (0.15, 0.19)  # circle radius (4.8-6.1 px at 32x32); other shapes have about the same area
_TRAVEL = (0.28, 0.34)  # distance the centre moves over the clip (9-11 px at 32x32)
_EXTENT = 1.35  # farthest shape point from its centre, in radii (the triangle's corners)
_SQUARE_HALF = 0.886  # half side, in radii: the square has the circle's area
_TRIANGLE_INRADIUS = 0.675  # in radii: an equilateral triangle of circumradius 1.35


def _uniform(lo: Tensor, hi: Tensor, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(lo.shape, generator=generator, dtype=torch.float64)


def _signed_distance(shape_index: Tensor, dx: Tensor, dy: Tensor, radius: Tensor) -> Tensor:
    """Distance outside the shape's edge in pixels (negative inside), for every shape at once."""
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    square = torch.maximum(dx.abs(), dy.abs()) - _SQUARE_HALF * radius
    # Equilateral triangle pointing up: the largest distance past its three edges.
    s, c = 0.5, 0.8660254037844386
    triangle = torch.maximum(torch.maximum(dy, -c * dx - s * dy), c * dx - s * dy) - _TRIANGLE_INRADIUS * radius
    return torch.where(shape_index == 0, circle, torch.where(shape_index == 1, square, triangle))


def render_clips(
    scenes: Sequence[Scene],
    generator: torch.Generator,
    *,
    size: int = SIZE,
    frames: int = FRAMES,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Clips `(len(scenes), frames, size, size, 3)` float32 in [0, 1], one per scene.

    Per clip the generator (a CPU generator) draws the object's size, speed, start and cross
    position, so the same generator state gives the same clips on any device. The object
    stays wholly inside the frame and moves at constant speed.
    """
    if frames < 2:
        raise ValueError(f"frames must be at least 2 to show motion, got {frames}")
    n = len(scenes)
    f64 = torch.float64
    ones = torch.ones(n, dtype=f64)
    radius = _uniform(ones * _RADIUS[0] * size, ones * _RADIUS[1] * size, generator)
    travel = _uniform(ones * _TRAVEL[0] * size, ones * _TRAVEL[1] * size, generator)
    margin = _EXTENT * radius + 1.0
    start = _uniform(margin, size - margin - travel, generator)  # along the motion, from the side it leaves
    cross = _uniform(margin, size - margin, generator)

    step = torch.tensor([DIRECTIONS[s.direction] for s in scenes], dtype=f64)  # (n, 2)
    positive = step.sum(dim=1) > 0
    along0 = torch.where(positive, start, size - start)  # moving left/up starts near the far side
    t = torch.linspace(0.0, 1.0, frames, dtype=f64)
    along = along0[:, None] + step.sum(dim=1)[:, None] * travel[:, None] * t[None, :]  # (n, F)
    horizontal = (step[:, 0] != 0)[:, None]
    cx = torch.where(horizontal, along, cross[:, None].expand(n, frames))
    cy = torch.where(horizontal, cross[:, None].expand(n, frames), along)

    device = torch.device(device)
    pix = torch.arange(size, dtype=torch.float32, device=device) + 0.5  # pixel centres
    dx = pix[None, None, None, :] - cx.to(device, torch.float32)[:, :, None, None]
    dy = pix[None, None, :, None] - cy.to(device, torch.float32)[:, :, None, None]
    shape_index = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)[:, None, None, None]
    rad = radius.to(device, torch.float32)[:, None, None, None]
    alpha = (0.5 - _signed_distance(shape_index, dx, dy, rad)).clamp(0.0, 1.0)[..., None]  # 1-pixel soft edge

    colour = torch.tensor([COLOURS[s.colour] for s in scenes], device=device)[:, None, None, None, :]
    background = torch.tensor([COLOURS[s.background] for s in scenes], device=device)[:, None, None, None, :]
    return background + alpha * (colour - background)


def render_clip(scene: Scene, seed: int = 0, *, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """One clip `(frames, size, size, 3)` float32 in [0, 1]; the same seed gives the same clip."""
    generator = torch.Generator().manual_seed(seed)
    return render_clips([scene], generator, size=size, frames=frames)[0].numpy()
