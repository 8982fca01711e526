"""ditserve.output: .mp4 / .gif / .png written atomically; clear errors for unusable paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from ditserve.output import OutputFormatError, check_output_path, output_format, to_uint8, write_frames
from ditserve.engine.result import GenerationOutput


def _frames(num: int = 5, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps (compress well, survive H.264) that change per frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = [np.stack([x / width, y / height, np.full_like(x, (i + seed) / (num + seed))], axis=-1) for i in range(num)]
    return np.stack(frames).astype(np.float32)


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_mp4_written_readable_no_temp_left(tmp_path: Path) -> None:
    frames = _frames()
    path = write_frames(tmp_path / "clip.mp4", frames, fps=8)
    assert path == tmp_path / "clip.mp4" and _only(tmp_path) == ["clip.mp4"]
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    decoded = [np.frombuffer(f, np.uint8).reshape(32, 48, 3) for f in reader]
    assert meta["size"] == (48, 32) and meta["fps"] == 8 and len(decoded) == 5
    assert np.abs(decoded[2].astype(np.float32) / 255 - frames[2]).mean() < 0.03
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_mp4_odd_size_padded_to_even(tmp_path: Path) -> None:
    path = write_frames(tmp_path / "odd.mp4", _frames(3, 17, 31))
    meta = imageio_ffmpeg.read_frames(str(path)).__next__()
    assert meta["size"] == (32, 18)


def test_gif_all_frames(tmp_path: Path) -> None:
    path = write_frames(tmp_path / "clip.GIF", _frames(4), fps=10)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.size == (48, 32) and gif.n_frames == 4
        assert gif.info["duration"] == 100
    assert _only(tmp_path) == ["clip.GIF"]


def test_png_first_frame_exact(tmp_path: Path) -> None:
    frames = _frames(3)
    path = write_frames(tmp_path / "still.png", frames)
    with Image.open(path) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), to_uint8(frames)[0])
    assert _only(tmp_path) == ["still.png"]


def test_overwrite_keeps_permissions(tmp_path: Path) -> None:
    target = tmp_path / "still.png"
    target.write_bytes(b"old")
    target.chmod(0o600)
    write_frames(target, _frames(1))
    assert target.read_bytes()[:4] == b"\x89PNG" and target.stat().st_mode & 0o777 == 0o600


def _fake_ffmpeg(tmp_path: Path, body: str) -> str:
    """An executable standing in for ffmpeg: Python `body` runs with `out` = the output path (the last
    argument) and stdin holding the raw frames."""
    script = tmp_path / "fake_ffmpeg"
    script.write_text(f"#!{sys.executable}\nimport os, sys\nout = sys.argv[-1]\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_failing_ffmpeg_leaves_nothing_keeps_previous_file_and_says_why(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    fake = _fake_ffmpeg(tmp_path, "sys.stdin.buffer.read(); open(out, 'wb').write(b'half a video'); "
                                  "sys.stderr.write('Unknown encoder libx264'); sys.exit(1)")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: fake)
    with pytest.raises(OSError, match="ffmpeg exited with status 1 writing .*: Unknown encoder libx264"):
        write_frames(folder / "new.mp4", _frames())
    assert _only(folder) == []

    previous = folder / "old.mp4"
    previous.write_bytes(b"previous video")
    with pytest.raises(OSError, match="Unknown encoder libx264"):
        write_frames(previous, _frames())
    assert _only(folder) == ["old.mp4"] and previous.read_bytes() == b"previous video"


def test_ffmpeg_runs_in_its_own_session_away_from_a_terminals_ctrl_c(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C goes to the terminal's foreground process group: ffmpeg must not be in ours, or a server's
    graceful stop would kill the encodes of the jobs it is draining."""
    ids = tmp_path / "ids"
    fake = _fake_ffmpeg(tmp_path, f"frames = sys.stdin.buffer.read(); open({str(ids)!r}, 'w').write("
                                  "f'{os.getsid(0)} {os.getpgrp()} {len(frames)}'); open(out, 'wb').write(b'video')")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: fake)
    (tmp_path / "out").mkdir()
    write_frames(tmp_path / "out" / "clip.mp4", _frames(5, 32, 48))
    session, group, size = map(int, ids.read_text().split())
    assert session != os.getsid(0) and group != os.getpgrp()
    assert size == 5 * 32 * 48 * 3  # every frame reached it


@pytest.mark.parametrize("name", ["out.avi", "out.webm", "out", "out.mp4.tmp"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    suffix = Path(name).suffix
    shown = f"extension {suffix!r}" if suffix else "no extension"
    expected = f"{tmp_path / name}: {shown} is not supported; use one of .mp4 .gif .png"
    with pytest.raises(OutputFormatError) as info:
        write_frames(tmp_path / name, _frames())
    assert str(info.value) == expected
    assert _only(tmp_path) == []


def test_output_checks(tmp_path: Path) -> None:
    assert output_format("a/b/C.Mp4") == "mp4"
    assert check_output_path(tmp_path / "x.png") == tmp_path / "x.png"
    with pytest.raises(OutputFormatError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.mp4")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OutputFormatError, match="is a folder"):
        check_output_path(tmp_path / "dir.mp4")


def test_to_uint8() -> None:
    frames = np.array([[[[0.0, 0.5, 1.0], [-0.2, 1.3, 0.002]]]], dtype=np.float32)
    assert to_uint8(frames).tolist() == [[[[0, 128, 255], [0, 255, 1]]]]
    assert to_uint8(np.zeros((1, 2, 2, 3), np.uint8)).dtype == np.uint8
    with pytest.raises(ValueError, match=r"\(num_frames, height, width, 3\)"):
        to_uint8(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="floats in \\[0, 1\\] or uint8"):
        to_uint8(np.zeros((1, 2, 2, 3), np.int32))


def test_generation_output_save(tmp_path: Path) -> None:
    out = GenerationOutput(frames=_frames(2), seed=1, timings={})
    assert out.save(tmp_path / "a.gif", fps=4) == tmp_path / "a.gif"
    with pytest.raises(ValueError, match="fps must be a positive number"):
        out.save(tmp_path / "b.gif", fps=0)


def test_mp4_frame_count_is_read_from_the_boxes_and_a_cut_file_is_incomplete(tmp_path: Path) -> None:
    """The server's completeness check counts an MP4's video samples in-process; it agrees with ffmpeg's
    count and refuses a file cut anywhere, a file of zeros and a wrong frame count, naming the file."""
    from ditserve.server.output_check import IncompleteOutput, check_output, mp4_video_frames

    path = write_frames(tmp_path / "clip.mp4", np.random.default_rng(0).random((17, 32, 48, 3)), fps=16)
    assert mp4_video_frames(path) == imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 17
    check_output(path, num_frames=17, width=48, height=32)
    with pytest.raises(IncompleteOutput, match=r"clip.mp4: 17 frame\(s\) in its video track, expected 21"):
        check_output(path, num_frames=21, width=48, height=32)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    for size in (len(data) - 1, len(data) // 2, 40, 7):
        cut.write_bytes(data[:size])
        with pytest.raises(IncompleteOutput, match=r"cut.mp4: .*(runs past the end|cut short|not a whole MP4)"):
            mp4_video_frames(cut)
    cut.write_bytes(bytes(261))
    with pytest.raises(IncompleteOutput, match="cut.mp4: not a whole MP4"):
        check_output(cut, num_frames=17, width=48, height=32)
