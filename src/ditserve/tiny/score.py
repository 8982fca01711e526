"""Does a clip show what its prompt says? Decided from pixel statistics, with no learned model.

- background: the per-channel median of the border pixels of all frames (the object covers
  a small part of the border at most), snapped to the nearest palette colour;
- object: pixels farther than `OBJECT_DISTANCE` from that background colour (palette colours
  are at least 1.0 apart, so 0.5 is halfway). Each votes for the palette colour C whose
  segment background->C passes nearest to it: a soft edge (a blend of object and background)
  still points at the object's colour, where snapping it to the nearest colour would not
  (green blended with white is as near yellow as green). The object's colour is the most
  voted one, and only its voters count as the object below (stray pixels of other colours
  in a generated clip do not move it);
- motion: the object's centroid per frame, a least-squares line through it, and the
  larger of the x/y displacements (it must be long enough and clearly dominant);
- shape (reported, not part of adherence): how much of its bounding box the object fills
  (square ~1, circle ~0.79, triangle ~0.5), averaged over frames.

A clip *adheres* when object colour, background colour and direction all match the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ditserve.tiny.data import COLOURS, Scene, parse_prompt

__all__ = ["ClipScore", "OBJECT_DISTANCE", "describe_clip", "score_clip"]

OBJECT_DISTANCE = 0.5  # RGB distance from the background beyond which a pixel is the object
MIN_OBJECT_PIXELS = 3  # a frame with fewer object pixels has no centroid
MIN_TRAVEL = 0.15  # centroid displacement over the clip, as a fraction of the frame side
DOMINANCE = 2.0  # the main axis must move this many times more than the other
# Fill ratio (object area / bounding-box area) boundaries between triangle | circle | square.
_SHAPE_BOUNDS = (0.64, 0.89)

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class ClipScore:
    """What a clip shows (None: could not be decided) next to what its prompt asked for."""

    expected: Scene
    colour: str | None
    background: str | None
    direction: str | None
    shape: str | None

    @property
    def colour_ok(self) -> bool:
        return self.colour == self.expected.colour

    @property
    def background_ok(self) -> bool:
        return self.background == self.expected.background

    @property
    def direction_ok(self) -> bool:
        return self.direction == self.expected.direction

    @property
    def shape_ok(self) -> bool:
        return self.shape == self.expected.shape

    @property
    def adherent(self) -> bool:
        """Object colour, background colour and motion all as prompted (shape is not counted)."""
        return self.colour_ok and self.background_ok and self.direction_ok

    def as_dict(self) -> Mapping[str, object]:
        return {"prompt": self.expected.prompt, "colour": self.colour, "background": self.background,
                "direction": self.direction, "shape": self.shape, "adherent": self.adherent}


def _nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _towards(pixels: np.ndarray, background: np.ndarray, background_index: int) -> np.ndarray:
    """For pixels (N, 3): the index of the palette colour C (not the background) whose segment background->C is nearest."""
    direction = _PALETTE - background  # (K, 3)
    length2 = np.maximum((direction**2).sum(axis=1), 1e-12)
    offset = pixels - background  # (N, 3)
    share = np.clip(offset @ direction.T / length2, 0.0, 1.0)  # (N, K): how far along each segment
    residual = ((offset[:, None, :] - share[..., None] * direction) ** 2).sum(axis=-1)
    residual[:, background_index] = np.inf
    return np.argmin(residual, axis=1)


def _check_clip(clip: np.ndarray) -> np.ndarray:
    clip = np.asarray(clip, dtype=np.float32)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 2:
        raise ValueError(f"clip must be (frames >= 2, height, width, 3), got shape {clip.shape}")
    return clip


def _direction(centroids: np.ndarray, valid: np.ndarray, side: int) -> str | None:
    """Direction name from centroid (x, y) per frame, or None when the motion is unclear."""
    frames = np.arange(len(centroids), dtype=np.float64)[valid]
    if len(frames) < max(2, len(centroids) // 2):
        return None
    pts = centroids[valid].astype(np.float64)
    slope = np.polyfit(frames, pts, deg=1)[0]  # (dx/frame, dy/frame)
    dx, dy = slope * (len(centroids) - 1)
    main, other = (dx, dy) if abs(dx) >= abs(dy) else (dy, dx)
    if abs(main) < MIN_TRAVEL * side or abs(main) < DOMINANCE * abs(other):
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _shape(masks: np.ndarray) -> str | None:
    ratios = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        if len(xs) >= MIN_OBJECT_PIXELS:
            box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
            ratios.append(len(xs) / box)
    if not ratios:
        return None
    fill = float(np.median(ratios))
    return "triangle" if fill < _SHAPE_BOUNDS[0] else "circle" if fill < _SHAPE_BOUNDS[1] else "square"


def describe_clip(clip: np.ndarray) -> dict[str, str | None]:
    """What the clip shows: {"colour", "background", "direction", "shape"} (None where unclear)."""
    clip = _check_clip(clip)
    frames, height, width, _ = clip.shape
    border = np.concatenate(
        [clip[:, 0].reshape(-1, 3), clip[:, -1].reshape(-1, 3), clip[:, :, 0].reshape(-1, 3), clip[:, :, -1].reshape(-1, 3)]
    )
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((clip - background_rgb) ** 2).sum(axis=-1))  # (F, H, W)
    background = _nearest_colour(background_rgb)
    candidates = distance > OBJECT_DISTANCE
    nearest = _towards(clip[candidates], _PALETTE[_NAMES.index(background)], _NAMES.index(background))
    votes = np.bincount(nearest, minlength=len(_NAMES))
    colour = _NAMES[int(np.argmax(votes))] if candidates.any() else None
    masks = np.zeros_like(candidates)
    masks[candidates] = nearest == int(np.argmax(votes))
    counts = masks.sum(axis=(1, 2))
    valid = counts >= MIN_OBJECT_PIXELS

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = np.stack([(masks * xs).sum(axis=(1, 2)) / counts, (masks * ys).sum(axis=(1, 2)) / counts], axis=1)
    return {
        "colour": colour,
        "background": background,
        "direction": _direction(centroids, valid, min(height, width)),
        "shape": _shape(masks[valid]),
    }


def score_clip(prompt: str | Scene, clip: np.ndarray) -> ClipScore:
    """Compare a clip `(F, H, W, 3)` float in [0, 1] with a grammar prompt (or its `Scene`)."""
    expected = prompt if isinstance(prompt, Scene) else parse_prompt(prompt)
    return ClipScore(expected=expected, **describe_clip(clip))
