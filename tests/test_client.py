"""`ditserve.client.Client` and `ditserve generate --url` against a real server on 127.0.0.1."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ditserve.cli import main
from ditserve.client import APIError, Client, JobFailed, QueueFullError, ServerUnreachable
from ditserve.server import ServerSettings, create_app
from helpers.server import GatedPipeline, serve_in_thread

SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def server(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = ServerSettings(model_name="tiny-wan", output_dir=tmp_path_factory.mktemp("client_out"))
    with serve_in_thread(create_app(tiny_pipeline, settings)) as url:
        yield url


def test_video_round_trip(server: str, tmp_path: Path) -> None:
    with Client(server) as client:
        assert client.health()["status"] == "ok"
        assert [m["id"] for m in client.models()] == ["tiny-wan"]
        job = client.create_video("a red ball", **SMALL)
        assert job["status"] in ("queued", "in_progress")
        done = client.wait(job["id"], timeout=30)
        assert done["status"] == "completed" and client.get(job["id"]) == done
        assert job["id"] in [v["id"] for v in client.list_videos()]
        path = client.download(job["id"], tmp_path / "ball.mp4")
        assert path.read_bytes()[4:8] == b"ftyp"
        assert [p.name for p in tmp_path.iterdir()] == ["ball.mp4"]  # no temp file left beside it


def test_images_both_formats(server: str) -> None:
    from PIL import Image

    with Client(server) as client:
        b64 = client.generate_image("a red ball", size="32x32", num_inference_steps=2, seed=5)
        by_url = client.generate_image("a red ball", size="32x32", num_inference_steps=2, seed=5, response_format="url")
    assert b64 == by_url and Image.open(io.BytesIO(b64)).size == (32, 32)


def test_errors_carry_the_server_message(server: str, tmp_path: Path) -> None:
    with Client(server) as client:
        with pytest.raises(APIError) as bad:
            client.create_video("x", size="30x32")
        assert bad.value.status_code == 400 and bad.value.param == "size" and "multiple of 16" in bad.value.message
        with pytest.raises(APIError) as missing:
            client.get("video_missing")
        assert missing.value.status_code == 404
        with pytest.raises(APIError) as unfinished:
            client.download("video_missing", tmp_path / "x.mp4")
        assert unfinished.value.status_code == 404 and list(tmp_path.iterdir()) == []


def test_cancel_queue_full_and_job_failed(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    app = create_app(pipe, ServerSettings(output_dir=tmp_path, max_queue=2))  # the running job counts
    with serve_in_thread(app) as url, Client(url) as client:
        running = client.create_video("one", **SMALL)["id"]
        assert pipe.running.wait(30)
        queued = client.create_video("two", **SMALL)["id"]
        with pytest.raises(QueueFullError) as full:
            client.create_video("three", **SMALL)
        assert full.value.status_code == 429 and full.value.retry_after >= 1
        assert client.cancel(queued)["status"] == "cancelled"
        with pytest.raises(JobFailed, match="cancelled while queued"):
            client.wait(queued, timeout=5)
        client.cancel(running)
        pipe.gate.set()
        with pytest.raises(JobFailed) as stopped:
            client.wait(running, timeout=30)
        assert stopped.value.job["status"] == "cancelled"
        assert client.delete(running) == {"id": running, "object": "video.deleted", "deleted": True}
        with pytest.raises(APIError) as again:
            client.get(running)
        assert again.value.status_code == 404


def test_wait_times_out(tiny_pipeline: Any, tmp_path: Path) -> None:
    pipe = GatedPipeline(tiny_pipeline, gated=True)
    with serve_in_thread(create_app(pipe, ServerSettings(output_dir=tmp_path))) as url, Client(url) as client:
        job = client.create_video("slow", **SMALL)["id"]
        with pytest.raises(TimeoutError, match="in_progress|queued"):
            client.wait(job, timeout=0.2, poll_interval=0.05)
        pipe.gate.set()
        assert client.wait(job, timeout=30)["status"] == "completed"


def test_unreachable_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    with Client(f"http://127.0.0.1:{port}") as client, pytest.raises(ServerUnreachable, match="cannot reach"):
        client.health()


def test_generate_url_writes_video_and_image(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", server, "--prompt", "a red ball", "--height", "32", "--width", "32", "--steps", "2", "--quiet"]
    assert main(["generate", *common, "--num-frames", "5", "--seed", "3", "--output", str(tmp_path / "v.mp4")]) == 0
    assert (tmp_path / "v.mp4").read_bytes()[4:8] == b"ftyp"
    assert "5 frame(s) 32x32" in capsys.readouterr().out
    assert main(["generate", *common, "--output", str(tmp_path / "i.png")]) == 0
    assert (tmp_path / "i.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.png", "v.mp4"]


def test_generate_url_errors(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", server, "--prompt", "a red ball", "--quiet"]
    assert main(["generate", *common, "--output", str(tmp_path / "v.gif")]) == 2
    assert ".mp4 (a video) or .png" in capsys.readouterr().err
    assert main(["generate", *common, "--model", str(tmp_path), "--output", str(tmp_path / "v.mp4")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", *common, "--num-frames", "6", "--output", str(tmp_path / "v.mp4")]) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "4k+1" in err
    assert list(tmp_path.iterdir()) == []


def test_client_waits_while_the_server_loads(tiny_pipeline: Any, tmp_path: Path) -> None:
    loaded = threading.Event()

    def factory() -> Any:
        loaded.wait(30)
        return tiny_pipeline

    app = create_app(factory, ServerSettings(output_dir=tmp_path), spec=tiny_pipeline.request_spec)
    with serve_in_thread(app) as url, Client(url) as client:
        with pytest.raises(APIError) as loading:
            client.health()
        assert loading.value.status_code == 503
        threading.Timer(0.2, loaded.set).start()
        assert client.wait_ready(timeout=30, poll_interval=0.05)["status"] == "ok"


def test_files_of_a_batch_are_written_at_once(tiny_pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs that finish in one packed step have their files written side by side (`runner.WRITERS`), not
    one after another: each write here takes 0.3 s longer, and the writes of 4 jobs overlap."""
    from ditserve.server import runner

    active, most = [0], [0]
    lock = threading.Lock()

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            threading.Event().wait(0.3)
            return write(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    write = runner.write_output
    monkeypatch.setattr(runner, "write_output", slow_write)
    with serve_in_thread(create_app(tiny_pipeline, ServerSettings(output_dir=tmp_path))) as url, Client(url) as client:
        jobs = [client.create_video("a red ball", **{**SMALL, "seed": i}) for i in range(4)]
        done = [client.wait(job["id"], timeout=60) for job in jobs]
    assert [d["status"] for d in done] == ["completed"] * 4
    assert runner.WRITERS >= 4 and most[0] >= 2, most[0]  # the jobs batch, so their writes meet
