"""How fast the HTTP front end answers while the engine is busy: 429s under a full queue, /health under load.

Starts a real `ditserve serve` (the embedded tiny model by default) with `--max-queue 2`, fills it
with long jobs that keep the engine stepping, then sends `--probes` more video requests (each must
be refused with 429) and as many `GET /health`, one after another from one keep-alive client, and
reports p50/p99/max of each. Issue 13's targets: a 429 within 50 ms at p99 under a full queue and
/health within 50 ms while the engine runs at full load.

    python bench/admission_latency.py --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish, shown_args  # noqa: E402  (bench/report.py)
from serving_http import start_server  # noqa: E402  (bench/serving_http.py)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * ordered[min(len(ordered) - 1,
                                                                                     int(0.99 * len(ordered)))],
            "max_ms": 1e3 * ordered[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded tiny model)")
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--out", default="/tmp/ditserve-admission-latency")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args()
    proc, url = start_server(args.model, ["--max-queue", "2"], Path(args.out))
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            long = {"prompt": "a red circle moving left on a blue background", "size": args.size, "steps": 1000}
            jobs = [http.post("/v1/videos", json=long).json()["id"] for _ in range(2)]  # the queue is full now
            while http.get(f"/v1/videos/{jobs[0]}").json()["step"] < 1:
                time.sleep(0.05)  # the engine is stepping
            refused, statuses = [], []
            for _ in range(args.probes):
                start = time.perf_counter()
                response = http.post("/v1/videos", json=long)
                refused.append(time.perf_counter() - start)
                statuses.append(response.status_code)
            health = []
            for _ in range(args.probes):
                start = time.perf_counter()
                assert http.get("/health").status_code == 200
                health.append(time.perf_counter() - start)
            still_running = http.get(f"/v1/videos/{jobs[0]}").json()["status"] == "in_progress"
            for job in jobs:
                http.delete(f"/v1/videos/{job}")
    finally:
        proc.terminate()
        proc.wait(60)
    rows = [{"probe": "POST /v1/videos with the queue full", "status": sorted(set(statuses)), **_percentiles(refused)},
            {"probe": "GET /health while generating", "status": [200], **_percentiles(health)}]
    lines = [
        f"#### HTTP answers while the engine is busy — {datetime.date.today()}, CPU",
        "",
        f"Command: `{f'python bench/admission_latency.py {shown_args()}'.strip()}`. A real `ditserve serve` (--max-queue 2) "
        f"holding two {args.size} jobs of 1,000 steps (the engine stepping throughout: {still_running}); "
        f"{args.probes} requests of each kind, one after another on one keep-alive connection.",
        "",
        "| probe | status | p50 (ms) | p99 (ms) | max (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['probe']} | {', '.join(map(str, r['status']))} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['max_ms']:.1f} |")
    publish("\n".join(lines) + "\n", rows, args.markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
