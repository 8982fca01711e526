"""Input images (a first frame to animate): decoded and checked before any work.

Accepted: a PIL image, a uint8 array `[H, W, 3]`, encoded bytes (PNG, JPEG, WebP, ...) or a
path to such a file. Anything else, an undecodable file, a size of zero or one beyond
`max_pixels` is an `InvalidRequest` on the field `image`.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ditserve.engine.errors import InvalidRequest

__all__ = ["load_image"]


def _decode(data: bytes, max_pixels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(io.BytesIO(data))
        width, height = picture.size
        if width * height > max_pixels:  # checked from the header, before decoding the pixels
            raise InvalidRequest("image", f"image is {width}x{height}, more than the {max_pixels} pixels accepted")
        picture.load()
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest("image", f"image could not be decoded as a picture (PNG, JPEG, WebP, ...): {e}") from None
    return picture


def load_image(image: Any, *, max_pixels: int) -> np.ndarray:
    """The image as uint8 RGB `[H, W, 3]` (alpha dropped, palette and greyscale converted)."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        try:
            with open(image, "rb") as f:
                image = f.read()
        except OSError as e:
            raise InvalidRequest("image", f"image file {os.fspath(image)!r} cannot be read: {e.strerror}") from None
    if isinstance(image, bytes | bytearray | memoryview):
        if not image:
            raise InvalidRequest("image", "image is empty (0 bytes)")
        image = _decode(bytes(image), max_pixels)
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise InvalidRequest("image", f"image is {image.width}x{image.height}, more than the {max_pixels} "
                                          "pixels accepted")
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise InvalidRequest("image", f"image must be a PIL image, a uint8 array [H, W, 3], encoded bytes or a "
                                      f"file path, got {type(image).__name__}")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidRequest("image", f"image array must be uint8 [H, W, 3] (RGB), got {array.dtype} "
                                      f"{list(array.shape)}")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise InvalidRequest("image", f"image is {width}x{height}: it has no pixels")
    if height * width > max_pixels:
        raise InvalidRequest("image", f"image is {width}x{height}, more than the {max_pixels} pixels accepted")
    return np.ascontiguousarray(array)
