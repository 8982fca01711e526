"""Whether outputs can be written (at start-up) and whether one was written whole (before `completed`).

A job is `completed` only once its file exists, is not empty and decodes to what was asked for
(the frame count of a video, the size of an image): a writer that fails quietly (a codec
refusing a frame rate, a full disk) fails the job instead of serving a broken file. A server
for a model that makes videos refuses to start without a working MP4 writer (imageio-ffmpeg
and its ffmpeg binary), rather than failing every job after its generation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["IncompleteOutput", "OutputWriterMissing", "check_output", "check_writer", "makes_video",
           "mp4_writer_problem"]


class OutputWriterMissing(Exception):
    """The model makes videos and this host cannot write MP4s."""


class IncompleteOutput(Exception):
    """The file written is missing, empty, undecodable or not what was asked for."""


def makes_video(pipeline: Any) -> bool:
    """What the family declares (`RequestSpec.output`); a pipeline without a spec is taken to make videos."""
    spec = getattr(pipeline, "request_spec", None)
    return spec is None or spec.output == "video"


def mp4_writer_problem() -> str | None:
    """Why MP4s cannot be written here (missing package, missing or broken ffmpeg binary), or None."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return "imageio-ffmpeg is not installed (pip install imageio-ffmpeg); it writes the MP4s this model makes"
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        return f"imageio-ffmpeg has no ffmpeg binary ({e}); reinstall imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE"
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return (f"the ffmpeg binary {exe} is missing or not executable; reinstall imageio-ffmpeg or set "
                "IMAGEIO_FFMPEG_EXE to a working ffmpeg")
    try:
        subprocess.run([exe, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"the ffmpeg binary {exe} does not run ({type(e).__name__}); reinstall imageio-ffmpeg"
    return None


def check_writer(pipeline: Any) -> None:
    """Raise `OutputWriterMissing` if `pipeline` makes videos and no MP4 writer works here."""
    problem = mp4_writer_problem() if makes_video(pipeline) else None
    if problem is not None:
        raise OutputWriterMissing(f"this model makes videos, and {problem}")


def check_output(path: Path, *, num_frames: int, width: int, height: int) -> None:
    """Raise `IncompleteOutput` unless `path` is a whole .png of width x height or an .mp4 of `num_frames`."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IncompleteOutput(f"{path.name}: no file was written") from None
    if size == 0:
        raise IncompleteOutput(f"{path.name}: the file written is empty")
    if path.suffix == ".png":
        _check_png(path, width, height)
    elif path.suffix == ".mp4":
        _check_mp4(path, num_frames)


def _check_png(path: Path, width: int, height: int) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            got = image.size
    except Exception as e:  # PIL raises many kinds for a broken file
        raise IncompleteOutput(f"{path.name}: not a readable PNG ({type(e).__name__}: {e})") from None
    if got != (width, height):
        raise IncompleteOutput(f"{path.name}: {got[0]}x{got[1]} pixels, expected {width}x{height}")


def _check_mp4(path: Path, num_frames: int) -> None:
    import imageio_ffmpeg

    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as e:  # RuntimeError from ffmpeg, or an unparseable report
        raise IncompleteOutput(f"{path.name}: ffmpeg cannot decode it ({type(e).__name__}: {e})") from None
    if frames != num_frames:
        raise IncompleteOutput(f"{path.name}: {frames} frame(s) decoded, expected {num_frames}")
