"""Writing generated frames to .mp4 / .gif / .png, atomically.

Every file is written to a hidden temporary file in the destination's folder and moved
into place with `os.replace`, so a reader (a browser polling a server's output folder, a
script waiting for the file) never sees half a video, and a failed write leaves neither a
partial file nor a clobbered previous one.

Formats (chosen by extension; check with `output_format` before generating):
  .mp4  H.264 (libx264, yuv420p, CRF 18) through imageio-ffmpeg's bundled ffmpeg. yuv420p
        needs even sizes: an odd height or width is padded by one edge-replicated row/column.
  .gif  every frame, looping, through Pillow.
  .png  the first frame (an image model's only frame).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

__all__ = ["SUPPORTED_EXTENSIONS", "OutputFormatError", "output_format", "check_output_path", "to_uint8", "write_frames"]

SUPPORTED_EXTENSIONS = (".mp4", ".gif", ".png")
MP4_CRF = 18  # visually lossless for H.264; imageio-ffmpeg's default (quality=5) is CRF 25


class OutputFormatError(ValueError):
    """The output path cannot be written: unknown extension or missing folder."""


def output_format(path: str | os.PathLike[str]) -> str:
    """The format of `path` ("mp4", "gif" or "png") from its extension, case-insensitive."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        shown = f"extension {suffix!r}" if suffix else "no extension"
        raise OutputFormatError(f"{path}: {shown} is not supported; use one of {' '.join(SUPPORTED_EXTENSIONS)}")
    return suffix[1:]


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Check before generating that `path` can be written (extension, existing folder); return it."""
    path = Path(path)
    output_format(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputFormatError(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise OutputFormatError(f"{path}: is a folder, not a file name")
    return path


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) floats in [0, 1] (or uint8) -> contiguous uint8, rounded like diffusers' numpy_to_pil."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be a non-empty (num_frames, height, width, 3) array, got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be floats in [0, 1] or uint8, got dtype {frames.dtype}")
    return np.ascontiguousarray(np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8))


def _pad_even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    """H.264 through imageio-ffmpeg's bundled binary, started here rather than by its `write_frames`.

    That helper starts ffmpeg with `preexec_fn=os.setpgrp` (so a Ctrl-C does not reach it), which runs
    Python in the forked child: unsafe in a process with other threads (a server's writer threads, a Ray
    worker's gRPC threads), where the child can die before ffmpeg starts and the write fails with a broken
    pipe. `start_new_session` keeps ffmpeg away from the terminal's Ctrl-C the same way, done by the C
    code between fork and exec."""
    import imageio_ffmpeg

    frames = _pad_even(frames)
    height, width = frames.shape[1:3]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
               "-pix_fmt", "rgb24", "-r", f"{fps:.02f}", "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
               "-v", "warning", "-crf", str(MP4_CRF), "-movflags", "+faststart", path]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    _, stderr = process.communicate(memoryview(frames).cast("B"))
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip()[-2000:] or "no message"
        raise OSError(f"ffmpeg exited with status {process.returncode} writing {path}: {message}")


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )


def _write_png(path: str, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    Image.fromarray(frames[0]).save(path, format="PNG")


_WRITERS: Mapping[str, Callable[[str, np.ndarray, float], None]] = MappingProxyType(
    {"mp4": _write_mp4, "gif": _write_gif, "png": _write_png}
)


def _final_mode(path: Path) -> int:
    """Keep an existing file's permissions; new files get rw-r--r-- (mkstemp makes them 0600)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o644


def write_frames(path: str | os.PathLike[str], frames: np.ndarray, fps: float = 16) -> Path:
    """Write frames ((F, H, W, 3) floats in [0, 1], or uint8) to `path` atomically; return the path."""
    path = check_output_path(path)
    fmt = output_format(path)
    if not (isinstance(fps, int | float) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    data = to_uint8(frames)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        _WRITERS[fmt](tmp, data, fps)
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
