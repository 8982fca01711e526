"""The official OpenAI Python client, end to end against a real server on loopback."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import ditserve
from ditserve.server import ServerSettings, create_app
from helpers.checkpoints import build_tiny_wan22_ti2v_pipeline
from helpers.server import GatedPipeline, serve_in_thread

openai = pytest.importorskip("openai")

KEY = "openai-client-key-0123456789"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks its videos API deprecated


@pytest.fixture(scope="module")
def served(tiny_wan_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("openai-model") / "model"
    shutil.copytree(tiny_wan_path, folder)
    (folder / "request_defaults.json").write_text(json.dumps({"num_inference_steps": 2}))  # quick jobs
    pipe = GatedPipeline(ditserve.Pipeline.from_pretrained(folder, device="cpu"))
    out = tmp_path_factory.mktemp("openai") / "out"
    settings = ServerSettings(model_name="tiny-wan", output_dir=out, api_keys=(KEY,))
    app = create_app(pipe, settings)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield client, app, pipe, out, url


def wait_done(client: Any, video_id: str) -> Any:
    deadline = time.monotonic() + 60
    while (video := client.videos.retrieve(video_id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, video.status
        time.sleep(0.05)
    return video


def test_models_and_a_video_from_create_to_delete(served: Any, tmp_path: Path) -> None:
    client, _, _, out, _ = served
    assert [m.id for m in client.models.list()] == ["tiny-wan"]
    created = client.videos.create(model="tiny-wan", prompt="a red ball", seconds="1", size="32x32")
    assert created.id.startswith("video_") and created.status in ("queued", "in_progress")
    video = wait_done(client, created.id)
    assert video.status == "completed" and video.size == "32x32" and video.seconds == "1"
    content = client.videos.download_content(created.id)
    data = content.read()
    assert data == (out / f"{created.id}.mp4").read_bytes() and len(data) > 0
    deleted = client.videos.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "video.deleted")
    assert not (out / f"{created.id}.mp4").exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)


def test_extra_fields_in_the_form_are_typed_and_user_is_ignored(served: Any) -> None:
    client, _, pipe, _, _ = served
    video = client.videos.create(prompt="a blue cube", size="32x32", seconds="0.25",
                                 extra_body={"num_inference_steps": 1, "guidance_scale": 1.0, "seed": 7, "fps": 16,
                                             "user": "end-user-42"})
    assert (video.num_inference_steps, video.guidance_scale, video.seed, video.num_frames) == (1, 1.0, 7, 5)
    assert wait_done(client, video.id).status == "completed"
    with pytest.raises(openai.UnprocessableEntityError, match="steps: Input should be a valid integer"):
        client.videos.create(prompt="x", size="32x32", extra_body={"steps": "two"})


def test_list_pages_with_after_limit_and_order(served: Any) -> None:
    client, _, _, _, _ = served
    for video in client.videos.list(limit=100):  # start from none of the other tests' videos
        wait_done(client, video.id)
        client.videos.delete(video.id)
    ids = [client.videos.create(prompt=f"clip {i}", size="32x32", seconds="0.25").id for i in range(3)]
    for video_id in ids:
        wait_done(client, video_id)
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == ids[:0:-1] and first.has_more and first.last_id == ids[1]
    assert [v.id for v in client.videos.list(limit=2)] == ids[::-1]  # auto-paging follows `after`
    assert [v.id for v in client.videos.list(limit=1, order="asc")] == ids
    with pytest.raises(openai.BadRequestError, match="after: no video with id"):
        client.videos.list(after="video_nope")


def test_delete_cancels_a_running_video(served: Any) -> None:
    client, _, pipe, _, _ = served
    video = client.videos.create(prompt="a long one", size="32x32", seconds="0.25",
                                 extra_body={"num_inference_steps": 1000})
    while client.videos.retrieve(video.id).status == "queued":
        time.sleep(0.01)
    cancelled = client.videos.delete(video.id)  # running: asked to stop (a video object, not a deletion)
    assert cancelled.id == video.id
    assert wait_done(client, video.id).status == "cancelled"
    assert client.videos.delete(video.id).deleted  # then, finished, it can be deleted


def test_input_reference_needs_a_model_that_takes_an_image(served: Any, tmp_path: Path) -> None:
    client, _, _, _, _ = served
    png = _png()
    with pytest.raises(openai.BadRequestError, match="this model does not take an input image"):
        client.videos.create(prompt="a cat", size="32x32", seconds="0.25", input_reference=("cat.png", png))
    # Wan2.2-TI2V takes a first frame: the upload is decoded and animated
    folder = build_tiny_wan22_ti2v_pipeline(tmp_path / "ti2v")
    (folder / "request_defaults.json").write_text(json.dumps({"num_inference_steps": 2}))
    app = create_app(ditserve.Pipeline.from_pretrained(folder, device="cpu"),
                     ServerSettings(model_name="ti2v", output_dir=tmp_path / "out", api_keys=(KEY,)))
    with serve_in_thread(app) as url:
        ti2v = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        video = ti2v.videos.create(prompt="a cat", size="64x32", seconds="0.25",
                                   input_reference=("cat.png", png, "image/png"))
        assert app.state.ditserve.store.get(video.id).request.image.shape == (32, 32, 3)  # decoded, handed to the job
        assert wait_done(ti2v, video.id).status == "completed"
        with pytest.raises(openai.BadRequestError, match="input_reference: image could not be decoded"):
            ti2v.videos.create(prompt="a cat", size="64x32", seconds="0.25",
                               input_reference=("cat.png", b"not a png", "image/png"))
        as_json = httpx.post(f"{url}/v1/videos", headers={"Authorization": f"Bearer {KEY}"},
                             json={"prompt": "a cat", "input_reference": {"image_url": "https://x/cat.png"}})
        assert as_json.status_code == 400 and "as a file part" in as_json.json()["error"]["message"]


def test_images_generate_b64_and_url(served: Any) -> None:
    from PIL import Image

    client, _, _, _, url = served
    made = client.images.generate(model="tiny-wan", prompt="a red ball", size="32x32", user="end-user-42",
                                  extra_body={"seed": 3})
    image = Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json)))
    assert (image.format, image.size) == ("PNG", (32, 32))
    by_url = client.images.generate(prompt="a red ball", size="32x32", response_format="url", extra_body={"seed": 3})
    assert by_url.data[0].url.startswith(f"{url}/v1/files/img_")


def test_a_wrong_key_is_an_authentication_error(served: Any) -> None:
    _, _, _, _, url = served
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()
