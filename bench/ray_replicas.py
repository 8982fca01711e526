"""Throughput of `ditserve serve --ray` on a burst of small jobs: one replica vs several, over HTTP.

Each round starts, for each replica count in turn, a real `ditserve serve --ray --replicas N` (a
local Ray cluster, one torch thread and one CPU per replica, the embedded tiny model unless
--model), waits until every replica reports, pays one-off costs with a small warm-up burst, sends
`--jobs` video jobs at once from 8 client threads, times the burst from the first POST until the
last job is finished (its completion time in the job hub's records, so no poll interval is in the
figure), and stops the server before the next one starts: an idle Ray cluster beside the measured
one takes about a seventh of a core. The counts alternate within each round, in an order flipped
every round, because a small shared machine's speed drifts by more than the effect measured over
the minutes one count's rounds would take back to back. Run it on a quiet machine. Reports jobs/s
per replica count (median of the rounds), the speed-up over one replica and each round's time;
every job must complete.

    python bench/ray_replicas.py                            # CPU: 1 vs 2 replicas of the tiny model
    python bench/ray_replicas.py --replicas 1,2,4 --model /tmp/wan13 --replica-gpus 1 --size 832x480 --frames 17
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from report import publish, shown_args  # bench/report.py, after the path insert

SRC = Path(__file__).resolve().parent.parent / "src"
PROMPT = "a red circle moving left on a blue background"
POLL_S = 1.0  # each poll through Serve costs the shared cores ~15-20 ms of CPU; the end time comes from the job records
JOB_DB = Path(".ditserve") / "jobs.sqlite3"  # in the output folder: the job hub's records (ditserve.server.jobdb)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(replicas: int, args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, str]:
    """`ditserve serve --ray --replicas N`, ready with every replica reporting."""
    port = _free_port()
    command = [sys.executable, "-m", "ditserve.cli", "serve", "--ray", "--replicas", str(replicas), "--port",
               str(port), "--output-dir", str(out), "--log-level", "warning", "--app-name", f"bench{replicas}",
               "--replica-cpus", str(args.replica_cpus), "--replica-threads", str(args.replica_threads),
               "--max-queue", str(args.jobs)]
    if args.model:
        command += ["--model", args.model]
    if args.replica_gpus is not None:
        command += ["--replica-gpus", str(args.replica_gpus)]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with httpx.Client(base_url=url, timeout=10) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ditserve serve --ray exited with {proc.returncode}")
            try:
                if http.get("/health").status_code == 200 and f"ditserve_replicas {replicas}.0" in http.get(
                        "/metrics").text:
                    return proc, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never became ready")
            time.sleep(0.5)


def finished_at(out: Path, ids: set[str]) -> float:
    """The last of the jobs' completion times (Unix seconds) as the job hub recorded them (the job database,
    read-only): the API's `completed_at` is whole seconds, and the poll that notices the end comes up to a
    poll interval plus /health's refresh later."""
    with sqlite3.connect(f"{(out / JOB_DB).as_uri()}?mode=ro", uri=True, timeout=30) as db:
        marks = ",".join("?" * len(ids))
        rows = db.execute(f"SELECT finished_at FROM jobs WHERE id IN ({marks})", sorted(ids)).fetchall()
    if len(rows) != len(ids) or any(t is None for (t,) in rows):
        raise RuntimeError(f"the job database has {len(rows)} of {len(ids)} jobs, not all finished")
    return max(t for (t,) in rows)


def burst(http: httpx.Client, out: Path, n: int, body: dict, seed: int) -> tuple[float, dict[str, int]]:
    """`n` jobs at once: seconds from the first POST until all are finished (the hub's record of the last
    job's end, same clock), and jobs per replica."""
    started = time.time()

    def post(i: int) -> str:
        response = http.post("/v1/videos", json={"prompt": PROMPT, "seed": seed + i, **body})
        response.raise_for_status()
        return response.json()["id"]

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(post, range(n)))
    while True:  # /health (the ingress's cached counts) is cheap to poll; the job list confirms
        health = http.get("/health").json()
        if health["queued"] == 0 and health["running"] == 0:
            listed = [v for v in http.get("/v1/videos", params={"limit": 100}).json()["data"] if v["id"] in ids]
            if len(listed) == n and all(v["status"] in ("completed", "failed", "cancelled") for v in listed):
                break
        time.sleep(POLL_S)
    elapsed = finished_at(out, ids) - started
    bad = [v for v in listed if v["status"] != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} job(s) did not complete: {bad[0]['error']}")
    per_replica: dict[str, int] = {}
    for v in listed:
        per_replica[v["timings"]["replica"]] = per_replica.get(v["timings"]["replica"], 0) + 1
    for job_id in ids:  # keep the folder small between rounds
        http.delete(f"/v1/videos/{job_id}")
    return elapsed, per_replica


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare (default: 1,2)")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded tiny model)")
    parser.add_argument("--jobs", type=int, default=48, help="jobs per burst (default: 48)")
    parser.add_argument("--rounds", type=int, default=3, help="timed bursts per replica count (default: 3)")
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--replica-threads", type=int, default=1)
    parser.add_argument("--replica-gpus", type=float, default=None)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    body = {"size": args.size, "num_frames": args.frames, "steps": args.steps}
    counts = [int(r) for r in args.replicas.split(",")]
    times: dict[int, list[float]] = {n: [] for n in counts}
    spread: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-ray-") as scratch:
        for r in range(args.rounds):  # servers in turn, the order flipped every round: the host's drift falls on all
            for n in counts if r % 2 == 0 else counts[::-1]:
                out = Path(scratch) / f"{n}-{r}"
                proc, url = start(n, args, out)
                try:
                    with httpx.Client(base_url=url, timeout=60) as client:
                        burst(client, out, 4 * n, body, seed=10_000)  # warm-up: first calls, first MP4s
                        elapsed, spread[n] = burst(client, out, args.jobs, body, seed=r * args.jobs)
                        times[n].append(elapsed)
                        print(f"{n} replica(s), round {r + 1}: {args.jobs} jobs in {elapsed:.2f} s "
                              f"({args.jobs / elapsed:.2f} jobs/s), per replica {sorted(spread[n].values())}",
                              file=sys.stderr)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
    rows = []
    for n in counts:
        median = statistics.median(times[n])
        rows.append({"replicas": n, "seconds": times[n], "median_s": median, "jobs_per_s": args.jobs / median,
                     "last_spread": sorted(spread[n].values())})
    base = rows[0]["jobs_per_s"]
    lines = [
        (f"#### Ray Serve replicas: a burst of {args.jobs} small jobs — {datetime.date.today()}, "
         f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"),
        "",
        (f"Command: `{f'python bench/ray_replicas.py {shown_args()}'.strip()}`. A real `ditserve serve --ray "
         f"--replicas N` per row (local Ray cluster, {args.replica_cpus:g} CPU and {args.replica_threads} torch "
         f"thread(s) per replica, {'the embedded tiny model' if not args.model else args.model}); each job "
         f"{args.size}, {args.frames} frames, {args.steps} steps; {args.jobs} jobs posted at once from 8 client "
         f"threads, timed from the first POST until the job hub recorded the last one completed; median of {args.rounds} "
         "rounds; each round starts each server in turn (order flipped every round), warms it up, times one burst and "
         "stops it: one server at a time."),
        "",
        "| replicas | burst (s), median | jobs/s | vs 1 replica | bursts (s) | jobs per replica (last burst) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['replicas']} | {row['median_s']:.2f} | {row['jobs_per_s']:.2f} | "
                     f"{row['jobs_per_s'] / base:.2f}x | {', '.join(f'{t:.1f}' for t in row['seconds'])} | "
                     f"{' / '.join(map(str, row['last_spread']))} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
