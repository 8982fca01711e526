"""Generation on several ranks (real processes, gloo on CPU): the same video as one process.

Every rank runs `Pipeline.generate` on the same request (SPMD). Modes: Ulysses, ring, and
Ulysses inside ring (2 x 2) sequence parallelism inside the DiT, CFG parallelism (cond and uncond
on two ranks: `ditserve.engine.parallel.SampleParallel`), and CFG x Ulysses; for Wan, FLUX.1 and
Cosmos3 (its prompt K/V whole on every rank: the wrappers' key-only joint tokens).
The groups come from `ditserve.distributed.build_groups`, as the CLI and server make them. Each
rank's frames must equal the single-process frames (float32 rounding) and each other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.distributed import run_ranks
from helpers.server import free_port, source_env, wait_healthy

REQUEST = dict(prompt="a red ball rolling on the street", negative_prompt="blurry", height=32, width=48,
               num_frames=9, num_inference_steps=3, guidance_scale=5.0, seed=3)  # 18 tokens: 9 per rank
MIXED = [dict(REQUEST, seed=1), dict(REQUEST, height=16, width=32, num_frames=5, guidance_scale=1.0, seed=2),
         dict(REQUEST, height=48, width=16, num_frames=1, num_inference_steps=2, seed=4)]  # 18, 4 and 3 tokens
# FLUX.1 (an image model): its text whole on every rank, its image tokens split; true CFG gives it two samples
FLUX_REQUEST = dict(prompt="a red ball on the grass", negative_prompt="blurry", height=32, width=48,
                    num_inference_steps=3, true_cfg_scale=2.0, seed=3)
FLUX_MIXED = [dict(FLUX_REQUEST, seed=1), dict(FLUX_REQUEST, height=16, width=24, true_cfg_scale=1.0, seed=2),
              dict(FLUX_REQUEST, height=40, width=16, num_inference_steps=2, seed=4)]
# Cosmos3 (4 query heads, 2 K/V heads): 18 vision tokens unguided (one sample: the dense layout), then a packed
# batch of 18 (guided: cond and uncond prompts of different lengths), 3 and 6 tokens
COSMOS3_REQUEST = dict(prompt="a red ball rolling on the street", negative_prompt="blurry", height=64, width=96,
                       num_frames=9, num_inference_steps=2, guidance_scale=1.0, fps=16.0, seed=3)
COSMOS3_MIXED = [dict(COSMOS3_REQUEST, guidance_scale=5.0, seed=1),
                 dict(COSMOS3_REQUEST, height=32, width=32, seed=2),
                 dict(COSMOS3_REQUEST, height=48, width=80, num_frames=1, guidance_scale=5.0, seed=4)]
# Wan2.2: A14B's two experts (a step on each), TI2V-5B's per-token timesteps and 32-pixel sizes
TI2V_REQUEST = dict(REQUEST, height=32, width=64)
TI2V_MIXED = [dict(TI2V_REQUEST, seed=1), dict(TI2V_REQUEST, height=64, width=32, num_frames=5, guidance_scale=1.0, seed=2),
              dict(TI2V_REQUEST, width=32, num_frames=1, num_inference_steps=2, seed=4)]
REQUESTS = {"wan": (REQUEST, MIXED), "flux": (FLUX_REQUEST, FLUX_MIXED), "cosmos3": (COSMOS3_REQUEST, COSMOS3_MIXED),
            "a14b": (REQUEST, MIXED), "ti2v": (TI2V_REQUEST, TI2V_MIXED)}
# family, samples (CFG), Ulysses degree, ring degree. CFG parallelism is the engine's, the same for every
# family (tested on Wan); each family's DiT is tested with each sequence layout. The tiny Wan DiT has 2 heads.
MODES = {"ulysses2": ("wan", 1, 2, 1), "cfg2": ("wan", 2, 1, 1), "cfg2xulysses2": ("wan", 2, 2, 1),
         "ring2": ("wan", 1, 1, 2), "ulysses2xring2": ("wan", 1, 2, 2),
         "a14b-ulysses2": ("a14b", 1, 2, 1), "ti2v-ring2": ("ti2v", 1, 1, 2),
         "flux-ulysses2": ("flux", 1, 2, 1), "flux-ring2": ("flux", 1, 1, 2), "flux-ulysses2xring2": ("flux", 1, 2, 2),
         "cosmos3-cfg2": ("cosmos3", 2, 1, 1),  # what --num-gpus 2 picks for Cosmos3 (CFG by default)
         "cosmos3-ulysses2": ("cosmos3", 1, 2, 1), "cosmos3-ring2": ("cosmos3", 1, 1, 2),
         "cosmos3-ulysses2xring2": ("cosmos3", 1, 2, 2)}
SPAWN_TIMEOUT_S = 120  # a spawn's start-up; each mode it runs adds MODE_TIMEOUT_S
MODE_TIMEOUT_S = 30


def _world(mode: str) -> int:
    _, samples, ulysses, ring = MODES[mode]
    return samples * ulysses * ring


def _worker(rank: int, modes: list[str], folders: dict[str, str], store: str, out: str) -> None:
    """Every mode of one world size on this rank, in the same order on every rank (each mode's groups are
    new groups of the one process group): one request, then a packed batch of three sizes."""
    from ditserve.distributed import ParallelLayout, build_groups

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=_world(modes[0]),
                                         timeout=timedelta(seconds=60))
    try:
        import ditserve

        for mode in modes:
            family, samples, ulysses, ring = MODES[mode]
            sample_group, sequence = build_groups(ParallelLayout(samples, ulysses, ring), rank)
            pipe = ditserve.Pipeline.from_pretrained(folders[family], device="cpu", dtype="fp32")
            pipe.parallelize(sample_group=sample_group, sequence=sequence)
            request, mixed = REQUESTS[family]
            folder = os.path.join(out, mode)
            os.makedirs(folder, exist_ok=True)
            np.save(os.path.join(folder, f"rank{rank}.npy"), pipe.generate(**request).frames)
            for i, result in enumerate(pipe.generate_batch(mixed)):  # a packed batch: each sample split on its own
                np.save(os.path.join(folder, f"rank{rank}-mixed{i}.npy"), result.frames)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def models(tiny_wan_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """Per family: its tiny folder and the single-process frames (the request, then each mixed one alone)."""
    import ditserve
    from helpers.checkpoints import build_tiny_flux_pipeline, build_tiny_wan22_a14b_pipeline, build_tiny_wan22_ti2v_pipeline
    from helpers.cosmos3_checkpoints import build_tiny_cosmos3_pipeline

    folders = {"wan": tiny_wan_path, "flux": build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipeline"),
               "cosmos3": build_tiny_cosmos3_pipeline(tmp_path_factory.mktemp("cosmos3") / "pipeline"),
               "a14b": build_tiny_wan22_a14b_pipeline(tmp_path_factory.mktemp("a14b") / "pipeline"),
               "ti2v": build_tiny_wan22_ti2v_pipeline(tmp_path_factory.mktemp("ti2v") / "pipeline")}
    out = {}
    for family, folder in folders.items():
        pipe = ditserve.Pipeline.from_pretrained(folder, device="cpu", dtype="fp32")
        request, mixed = REQUESTS[family]
        out[family] = (folder, [pipe.generate(**r).frames for r in (request, *mixed)])
    return out


@pytest.fixture(scope="module")
def per_rank(models: dict, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[list[np.ndarray]]]:
    """mode -> each rank's videos. The modes of one world size run in one spawn of that many ranks, so
    process start-up and imports are paid once per world size rather than once per mode."""
    done: dict[int, Path | BaseException] = {}
    folders = {family: str(folder) for family, (folder, _) in models.items()}

    def videos(mode: str) -> list[list[np.ndarray]]:
        world = _world(mode)
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            modes = [m for m in sorted(MODES) if _world(m) == world]
            try:
                run_ranks(_worker, world, (modes, folders, str(out / "store"), str(out)),
                          SPAWN_TIMEOUT_S + MODE_TIMEOUT_S * len(modes))
                done[world] = out
            except BaseException as e:  # every mode of this world size reports it, without spawning again
                done[world] = e
        if isinstance(done[world], BaseException):
            raise done[world]
        folder = done[world] / mode
        mixed = len(REQUESTS[MODES[mode][0]][1])
        return [[np.load(folder / f"rank{r}.npy"), *(np.load(folder / f"rank{r}-mixed{i}.npy") for i in range(mixed))]
                for r in range(world)]

    return videos


@pytest.mark.parametrize("mode", sorted(MODES))
def test_several_ranks_make_the_same_output_as_one(mode: str, models: dict, per_rank: Callable) -> None:
    """One request, then a batch of three sizes (tokens not divisible by the ranks: padded chunks)."""
    _, alone = models[MODES[mode][0]]
    videos_per_rank = per_rank(mode)
    for rank, videos in enumerate(videos_per_rank):
        for i, (frames, ref) in enumerate(zip(videos, alone)):
            assert frames.shape == ref.shape, (rank, i)
            assert np.abs(frames - ref).max() <= 1e-5 * np.abs(ref).max(), f"rank {rank}, video {i}"
            assert np.array_equal(frames, videos_per_rank[0][i])  # every rank ends with the same video


def test_num_gpus_alone_splits_cfg_first_for_models_that_guide_by_default(tmp_path: Path) -> None:
    """The default split: CFG parallelism first (measured fastest on two GPUs) when a default request makes two
    samples (Wan, the embedded model), tokens only otherwise (FLUX.1: guidance is an embedding)."""
    from ditserve.cli import _default_request_uses_cfg
    from ditserve.distributed import ParallelLayout, default_layout
    from helpers.checkpoints import build_tiny_flux_pipeline

    assert default_layout(2, None, None, None, 12, cfg=True) == ParallelLayout(2, 1, 1)
    assert default_layout(4, None, None, None, 12, cfg=True) == ParallelLayout(2, 2, 1)
    assert default_layout(8, None, None, None, 5, cfg=True) == ParallelLayout(2, 1, 4)  # 5 heads: ring
    assert default_layout(3, None, None, None, 12, cfg=True) == ParallelLayout(1, 3, 1)  # odd: no CFG split
    assert default_layout(2, None, None, None, 12, cfg=False) == ParallelLayout(1, 2, 1)
    assert default_layout(4, None, 4, None, 12, cfg=True) == ParallelLayout(1, 4, 1)  # a degree given: as given
    assert _default_request_uses_cfg(None)  # the embedded Wan model: guidance 3.0 by default
    assert not _default_request_uses_cfg(str(build_tiny_flux_pipeline(tmp_path / "flux")))


def test_ditserve_generate_under_torchrun(tiny_wan_path: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """`torchrun --nproc_per_node 2 -m ditserve generate --cfg-parallel 2` (with step caching), and `ditserve generate
    --num-gpus 2 --ulysses-degree 2` (its ranks started by the command; compiled, and with FP8), write what one
    process writes."""
    import subprocess
    import sys

    from PIL import Image

    from ditserve import cli

    def frames(name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)

    env = source_env()
    # torchrun's two CFG ranks with step caching, which decides from each request's predictions: the ranks decide
    # alike, so they match one process (on the embedded model, whose predictions change enough that a reused
    # step shows in the frames)
    embedded = ["--prompt", REQUEST["prompt"], "--negative-prompt", "blurry", "--height", "32", "--width", "48",
                "--num-frames", "9", "--guidance-scale", "5", "--seed", "3", "--device", "cpu", "--dtype", "fp32",
                "--quiet"]
    six = [*embedded, "--steps", "6"]
    assert cli.main(["generate", *six, "--output", str(tmp_path / "exact6.png")]) == 0
    assert cli.main(["generate", *six, "--cache", "0.5", "--output", str(tmp_path / "cached6.png")]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "ditserve", "generate", *six, "--cache", "0.5", "--cfg-parallel", "2",
         "--output", str(tmp_path / "cached6x2.png")],
        env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("frame(s)") == 1  # rank 0 reports and writes; rank 1 stays quiet
    assert np.abs(frames("exact6") - frames("cached6")).max() > 1  # some steps were reused
    assert np.abs(frames("cached6") - frames("cached6x2")).max() <= 1  # the same frame (uint8 rounding aside)
    # ranks started by the command, compiled blocks with Ulysses inside them (the parallel attention is a graph
    # break, as attention is)
    flags = ["--model", str(tiny_wan_path), *embedded, "--steps", "3"]
    assert cli.main(["generate", *flags, "--output", str(tmp_path / "one.png")]) == 0
    done = subprocess.run([sys.executable, "-m", "ditserve", "generate", *flags, "--num-gpus", "2", "--ulysses-degree",
                           "2", "--compile", "--output", str(tmp_path / "compiled.png")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.abs(frames("one") - frames("compiled")).max() <= 1
    # eager Ulysses through the same launcher, with FP8 (on the embedded model, whose layers take FP8; the tiny
    # test DiT's do not)
    fp8 = [*embedded, "--steps", "3", "--quantize", "fp8"]
    assert cli.main(["generate", *fp8, "--output", str(tmp_path / "fp8.png")]) == 0
    done = subprocess.run([sys.executable, "-m", "ditserve", "generate", *fp8, "--num-gpus", "2", "--ulysses-degree", "2",
                           "--output", str(tmp_path / "fp8x2.png")], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.abs(frames("fp8") - frames("fp8x2")).max() <= 1
    assert cli.main(["generate", *flags, "--num-gpus", "4", "--cfg-parallel", "3", "--output", str(tmp_path / "y.png")]) == 2
    assert "--cfg-parallel 3 x --ulysses-degree 1 x --ring-degree 1 = 3 does not divide --num-gpus 4" in \
        capsys.readouterr().err
    assert cli.main(["generate", *flags, "--num-gpus", "4", "--ulysses-degree", "2", "--ring-degree", "3",
                     "--output", str(tmp_path / "y.png")]) == 2
    assert "--ulysses-degree 2 x --ring-degree 3 = 6 does not divide --num-gpus 4" in capsys.readouterr().err
    assert cli.main(["generate", *flags, "--num-gpus", "4", "--ulysses-degree", "4", "--output",
                     str(tmp_path / "y.png")]) == 2  # the tiny DiT has 2 heads
    assert "2 attention heads do not divide by --ulysses-degree 4: use --ring-degree 4" in capsys.readouterr().err
    assert cli.main(["generate", *flags, "--cfg-parallel", "2", "--output", str(tmp_path / "x.png")]) == 2
    assert "start with `torchrun --nproc_per_node 2 -m ditserve ...`" in capsys.readouterr().err


def test_a_server_on_two_ranks_serves_what_one_process_makes(tiny_wan_path: Path, tmp_path: Path) -> None:
    """`ditserve serve --num-gpus 2 --cfg-parallel 2 --device cpu` starts two gloo ranks itself: rank 0 serves
    HTTP and leads each step, rank 1 follows; an image equals the single-process one, a job of another size
    completes, and SIGTERM to the command ends both ranks cleanly."""
    import base64
    import io
    import signal
    import subprocess
    import sys

    import httpx
    from PIL import Image

    import ditserve
    from ditserve.output import to_uint8

    port = free_port()
    env = source_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditserve", "serve", "--model", str(tiny_wan_path), "--port", str(port),
         "--device", "cpu", "--dtype", "fp32", "--output-dir", str(tmp_path / "out"), "--num-gpus", "2",
         "--cfg-parallel", "2", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_healthy(proc, http, timeout=120)
            deadline = time.monotonic() + 120
            video = http.post("/v1/videos", json={"prompt": "a dog", "size": "32x32", "num_frames": 5, "steps": 2,
                                                  "seed": 1}).json()
            body = {"prompt": REQUEST["prompt"], "negative_prompt": "blurry", "size": "48x32", "steps": 3,
                    "guidance_scale": 5.0, "seed": 3}
            image = http.post("/v1/images/generations", json=body)
            assert image.status_code == 200, image.text
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.json()["data"][0]["b64_json"]))),
                                dtype=np.int16)
            while http.get(f"/v1/videos/{video['id']}").json()["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline + 60
                time.sleep(0.1)
            assert http.get(f"/v1/videos/{video['id']}").json()["status"] == "completed"
        alone = ditserve.Pipeline.from_pretrained(tiny_wan_path, device="cpu", dtype="fp32").generate(
            **dict(REQUEST, num_frames=1, seed=3)).frames
        assert np.abs(served - to_uint8(alone)[0].astype(np.int16)).max() <= 1
        proc.send_signal(signal.SIGTERM)  # as an orchestrator stops the server
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output[-3000:]  # rank 1 ended with rank 0, and both exited 0
        assert "Traceback" not in output, output[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_rank_that_dies_stops_the_server_instead_of_hanging(tiny_wan_path: Path, tmp_path: Path) -> None:
    """Killing a follower rank (a crashed GPU process) ends the whole command with an error, promptly."""
    import signal
    import subprocess
    import sys

    import httpx
    import psutil  # accelerate's dependency

    port = free_port()
    env = source_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditserve", "serve", "--model", str(tiny_wan_path), "--port", str(port), "--device",
         "cpu", "--dtype", "fp32", "--output-dir", str(tmp_path / "out"), "--num-gpus", "2", "--log-level", "error"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_healthy(proc, http, timeout=120)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        ranks[0].send_signal(signal.SIGKILL)
        started = time.monotonic()
        proc.communicate(timeout=90)
        assert proc.returncode != 0 and time.monotonic() - started < 90  # an error, not a hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("split", [["--ulysses-degree", "2"], ["--cfg-parallel", "2"], ["--ring-degree", "2"]],
                         ids=["ulysses", "cfg", "ring"])
def test_gpu_two_ranks_over_nccl_match_one(split: list[str], tiny_wan_path: Path, tmp_path: Path) -> None:
    """`ditserve generate --num-gpus 2` on two GPUs (NCCL, bf16) against one GPU: PSNR >= 40 dB."""
    import math
    import subprocess
    import sys

    from PIL import Image

    src = Path(__file__).resolve().parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    flags = ["--model", str(tiny_wan_path), "--prompt", REQUEST["prompt"], "--negative-prompt", "blurry",
             "--height", "64", "--width", "96", "--num-frames", "9", "--steps", "4", "--guidance-scale", "5",
             "--seed", "3", "--quiet"]
    outs = {}
    for name, extra in (("one", []), ("two", ["--num-gpus", "2", *split])):
        done = subprocess.run([sys.executable, "-m", "ditserve", "generate", *flags, *extra, "--output",
                               str(tmp_path / f"{name}.png")], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float64) / 255
    mse = float(np.mean((outs["one"] - outs["two"]) ** 2))
    assert mse == 0 or 10 * math.log10(1 / mse) >= 40.0
