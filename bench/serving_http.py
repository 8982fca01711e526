"""A burst of image requests over HTTP against `ditserve serve`: batched vs one at a time.

Starts a real server process per mode (the default continuous batching, then
`--max-batch-size 1`), waits for /health (the server's own warm-up done), warms it up with the
same burst at 2 steps, sends `--requests` image requests of mixed sizes at once from
as many client threads, and reports throughput, p50/p95/max latency, how many
were refused (429), and where the server spent the time (from its job records). Everything a client sees is measured: HTTP, admission, text encoding,
denoising, VAE decode, PNG encoding and base64.

    python bench/serving_http.py --model /tmp/wan13 --sizes 512x512,832x480 --steps 8 --requests 32 \\
        --markdown docs/performance.md          # on a GPU (bench/build_wan_folder.py makes the folder)
    python bench/serving_http.py                # CPU smoke run: the embedded tiny model
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args  # noqa: E402  (bench/report.py)

SRC = Path(__file__).resolve().parent.parent / "src"
JOB_DB = Path(".ditserve") / "jobs.sqlite3"  # in the output folder: the server's job records (ditserve.server.jobdb)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str | None, extra: list[str], out: Path) -> tuple[subprocess.Popen, str]:
    """A `ditserve serve` process writing into `out` (its log: `out/server.log`), once /health answers."""
    port = _free_port()
    command = [sys.executable, "-m", "ditserve.cli", "serve", "--port", str(port), "--output-dir", str(out),
               "--log-level", "warning", *extra]  # the default --max-queue: a burst it admits gets no 429
    if model:
        command += ["--model", model]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "server.log"  # a file, not a pipe: a pipe nobody reads would stall a chatty server
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with httpx.Client(base_url=url, timeout=5) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if http.get("/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the server did not become ready in 10 minutes")
            time.sleep(0.2)


def burst(url: str, sizes: list[str], steps: int, count: int) -> dict:
    """`count` image requests at once (sizes in turn); per-request latency and status."""
    barrier = threading.Barrier(count)
    results: list[tuple[int, float]] = [(0, 0.0)] * count

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            barrier.wait()
            start = time.perf_counter()
            response = http.post("/v1/images/generations", json={
                "prompt": f"a red circle moving left on a blue background {i}", "size": sizes[i % len(sizes)],
                "steps": steps, "seed": i})
            results[i] = (response.status_code, time.perf_counter() - start)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    started_at = datetime.datetime.now().isoformat(timespec="seconds")  # to find the burst in the server's log
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = sorted(s for code, s in results if code == 200)
    return {"started_at": started_at, "wall_s": wall, "completed": len(done),
            "refused_429": sum(code == 429 for code, _ in results),
            "other_errors": sum(code not in (200, 429) for code, _ in results),
            "per_min": 60 * len(done) / wall, "p50_s": statistics.median(done) if done else None,
            "p95_s": done[min(len(done) - 1, int(0.95 * len(done)))] if done else None,
            "max_s": done[-1] if done else None}


def server_breakdown(out: Path, count: int) -> dict:
    """Where the server spent the last `count` jobs' wall time, from its job records (read-only): seconds from
    the first job's arrival to its admission, the denoising window (first admission to the last job's last step),
    the tail after that step (VAE decodes and writes nobody overlaps), and per-job means of text encoding,
    denoising, the wait for the decoder, the decode and the write."""
    with sqlite3.connect(f"{(out / JOB_DB).as_uri()}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute("SELECT created_at, started_at, finished_at, timings FROM jobs WHERE status = 'completed' "
                          "ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
    if not rows:
        return {}
    jobs = [(created, started, finished, json.loads(timings)) for created, started, finished, timings in rows]
    denoised = [started + t["text_encode_s"] + t["denoise_s"] for _, started, _, t in jobs]
    first_started = min(started for _, started, _, _ in jobs)
    result = {"admission_s": first_started - min(created for created, _, _, _ in jobs),
              "denoise_window_s": max(denoised) - first_started,
              "tail_s": max(finished for _, _, finished, _ in jobs) - max(denoised)}
    for key in ("text_encode_s", "denoise_s", "decode_wait_s", "decode_s", "save_s"):
        result[f"mean_{key}"] = statistics.fmean(t.get(key, 0.0) for _, _, _, t in jobs)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded tiny model)")
    parser.add_argument("--sizes", default="32x32,32x16", help="comma-separated WIDTHxHEIGHT, used in turn")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--server-args", default="", help="more `ditserve serve` arguments, e.g. '--compile'")
    parser.add_argument("--out", default="/tmp/ditserve-serving-http")
    parser.add_argument("--modes", default="batched,one at a time",
                        help="which servers to run, comma-separated (one alone gives no ratio: for a time breakdown)")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    rows = []
    modes = {"batched": [], "one at a time": ["--max-batch-size", "1"]}
    chosen = [m.strip() for m in args.modes.split(",")]
    if not chosen or any(m not in modes for m in chosen):
        parser.error(f"--modes takes {', '.join(modes)} (comma-separated), got {args.modes!r}")
    for mode, extra in ((m, modes[m]) for m in chosen):
        out = Path(args.out) / mode.replace(" ", "-")
        proc, url = start_server(args.model, [*args.server_args.split(), *extra], out)
        try:
            # Warm-up beyond the server's own (which compiles every kind of batch): the burst itself at 2
            # steps, so that the packed shapes its batching makes (attention choices, cuDNN plans) are met
            # before the clock starts.
            burst(url, sizes, steps=min(2, args.steps), count=args.requests)
            row = {"mode": mode, **burst(url, sizes, args.steps, args.requests)}
            row["server"] = server_breakdown(out, row["completed"])
        finally:
            proc.terminate()
            proc.wait(60)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by_mode = {r["mode"]: r for r in rows}
    batched, single = by_mode.get("batched"), by_mode.get("one at a time")
    speedup = float("nan")
    if batched and single and batched["completed"] == args.requests:
        speedup = single["wall_s"] / batched["wall_s"]
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available() and "--device cpu" not in args.server_args:
            device = torch.cuda.get_device_name()
    except ImportError:
        pass
    lines = [
        f"#### Serving over HTTP: a burst of {args.requests} images ({', '.join(sizes)}, {args.steps} steps), "
        f"batched vs one at a time — {datetime.date.today()}, {device}",
        "",
        f"Command: `python bench/serving_http.py {shown_args()}`. A real `ditserve serve` process per mode; all "
        "requests sent at once, each from its own connection; latency as the client sees it.",
        "",
        "| mode | completed | 429 | wall (s) | images/min | p50 (s) | p95 (s) | max (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[k]:.1f}" if r[k] is not None else "–" for k in ("wall_s", "per_min", "p50_s", "p95_s", "max_s")]
        lines.append(f"| {r['mode']} | {r['completed']} | {r['refused_429']} | " + " | ".join(cells) + " |")
    if batched and single:
        lines += ["", f"Batched: {speedup:.2f}x the throughput of one at a time (burst wall time, one at a time / batched)."]
    lines += ["", "Where the server's time went (its job records): first admission after the first arrival; the "
              "denoising window from it to the last job's last step; the tail after that (decodes and writes); "
              "per-job means.", "",
              "| mode | admission (s) | denoising window (s) | tail (s) | text encode (s) | denoise (s) | "
              "decode wait (s) | decode (s) | write (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["server"]
        keys = ("admission_s", "denoise_window_s", "tail_s", "mean_text_encode_s", "mean_denoise_s",
                "mean_decode_wait_s", "mean_decode_s", "mean_save_s")
        lines.append(f"| {r['mode']} | " + " | ".join(f"{b[k]:.2f}" if k in b else "–" for k in keys) + " |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
