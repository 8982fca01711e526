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
           "mp4_video_frames", "mp4_writer_problem"]


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
    frames = mp4_video_frames(path)
    if frames != num_frames:
        raise IncompleteOutput(f"{path.name}: {frames} frame(s) in its video track, expected {num_frames}")


def mp4_video_frames(path: Path) -> int:
    """The sample (frame) count of the MP4's video track, read from its boxes (no ffmpeg process: this
    runs once per job); `IncompleteOutput` if a box runs past the end of the file, there is no video
    track, or the media data is shorter than the track's samples."""
    size = path.stat().st_size
    with path.open("rb") as f:
        top = dict(_boxes(f, 0, size, path))
        if "moov" not in top or "mdat" not in top:
            raise IncompleteOutput(f"{path.name}: not a whole MP4 (boxes {sorted(top)})")
        start, end = top["moov"]
        f.seek(start)
        moov = f.read(end - start)
    media = top["mdat"][1] - top["mdat"][0]
    for trak in _children(moov, "trak", path):
        mdia = _child(trak, "mdia", path)
        if _child(mdia, "hdlr", path)[8:12] != b"vide":
            continue
        stsz = _child(_child(_child(mdia, "minf", path), "stbl", path), "stsz", path)
        sample_size, count = int.from_bytes(stsz[4:8], "big"), int.from_bytes(stsz[8:12], "big")
        if sample_size:
            total = sample_size * count
        else:
            table = stsz[12 : 12 + 4 * count]
            if len(table) != 4 * count:
                raise IncompleteOutput(f"{path.name}: its sample size table is cut short")
            total = sum(int.from_bytes(table[i : i + 4], "big") for i in range(0, len(table), 4))
        if total > media:
            raise IncompleteOutput(f"{path.name}: {total} bytes of video samples, {media} bytes of media data")
        return count
    raise IncompleteOutput(f"{path.name}: no video track")


def _boxes(f: Any, start: int, end: int, path: Path) -> list[tuple[str, tuple[int, int]]]:
    """(type, (payload start, payload end)) of the top-level boxes in [start, end) of file `f`."""
    out, at = [], start
    while at < end:
        f.seek(at)
        header = f.read(16)
        length, kind, skip = _box_header(header, end - at, path)
        out.append((kind, (at + skip, at + length)))
        at += length
    return out


def _box_header(header: bytes, room: int, path: Path) -> tuple[int, str, int]:
    """(box length, type, header length) from a box's first bytes; IncompleteOutput if it does not fit `room`."""
    if len(header) < 8:
        raise IncompleteOutput(f"{path.name}: a box header is cut short")
    length, kind, skip = int.from_bytes(header[:4], "big"), header[4:8].decode("latin-1"), 8
    if length == 1:  # a 64-bit length follows
        if len(header) < 16:
            raise IncompleteOutput(f"{path.name}: a box header is cut short")
        length, skip = int.from_bytes(header[8:16], "big"), 16
    elif length == 0:  # to the end
        length = room
    if length < skip or length > room:
        raise IncompleteOutput(f"{path.name}: box {kind!r} of {length} bytes runs past the end of the file")
    return length, kind, skip


def _children(data: bytes, kind: str, path: Path) -> list[bytes]:
    """The payloads of the boxes of type `kind` directly inside `data` (a box's payload)."""
    out, at = [], 0
    while at < len(data):
        length, found, skip = _box_header(data[at : at + 16], len(data) - at, path)
        if found == kind:
            out.append(data[at + skip : at + length])
        at += length
    return out


def _child(data: bytes, kind: str, path: Path) -> bytes:
    found = _children(data, kind, path)
    if not found:
        raise IncompleteOutput(f"{path.name}: no {kind!r} box where the MP4 format puts one")
    return found[0]
