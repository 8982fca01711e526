"""ditserve on Ray Serve, for real: a local Ray cluster on this CPU, the embedded tiny model, HTTP over loopback.

Two generator replicas take a burst of 40 jobs between them; two ingress replicas each answer for
every job, whichever replica made it; a replica killed (SIGKILL) mid-run loses no accepted job; and
an autoscaled application grows from one replica to two under queued work, then shrinks back,
finishing every job.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from helpers.rayserve import (
    Deployed,
    deployed,
    local_cluster,
    submit,
    wait_finished,
    wait_for,
)

from ditserve.rayserve.options import RayOptions

pytestmark = pytest.mark.ray

SMALL = {"size": "32x32", "num_frames": 5, "steps": 4}
KEY, OTHER_KEY = "ray-test-key-0123456789", "ray-test-key-abcdefghij"
LONG = {"size": "32x32", "num_frames": 5, "steps": 120}  # seconds per batch on one core: time to kill mid-run


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with local_cluster(num_cpus=3) as url:
        yield url


@pytest.fixture(scope="class")
def two_replicas(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    options = RayOptions.fixed(2, threads=1, ingress_replicas=2, app_name="two")
    with deployed(cluster, tmp_path_factory.mktemp("two"), options, headers={"Authorization": f"Bearer {KEY}"},
                  api_keys=(KEY, OTHER_KEY)) as app:
        wait_for(lambda: app.view().live_replicas == 2, 60, "both replicas to report")
        yield app


class TestTwoReplicas:
    def test_forty_requests_spread_over_both_replicas_and_any_ingress_answers_for_any_job(
            self, two_replicas: Deployed) -> None:
        http = two_replicas.http
        ids = submit(http, 40, **SMALL)
        jobs = wait_finished(http, ids, timeout=60)
        assert Counter(j["status"] for j in jobs.values()) == {"completed": 40}
        ran_on = Counter(j["timings"]["replica"] for j in jobs.values())
        assert len(ran_on) == 2 and min(ran_on.values()) >= 10, ran_on  # routed by queue length: about half each

        # every job, whichever generator made it, answered with the same state and bytes by both ingress replicas
        answered_by: dict[str, set[str]] = {}
        for job_id in ids:
            contents = set()
            for _ in range(6):
                response = http.get(f"/v1/videos/{job_id}/content")
                assert response.status_code == 200, response.text
                assert response.headers["content-type"] == "video/mp4"
                contents.add(response.content)
                answered_by.setdefault(job_id, set()).add(response.headers["x-ditserve-replica"])
            assert len(contents) == 1 and len(contents.pop()) > 100
            assert http.get(f"/v1/videos/{job_id}").json()["status"] == "completed"
        ingress = set().union(*answered_by.values())
        assert len(ingress) == 2, ingress
        by_generator: dict[str, set[str]] = {}
        for job_id, job in jobs.items():
            by_generator.setdefault(job["timings"]["replica"], set()).update(answered_by[job_id])
        assert all(seen == ingress for seen in by_generator.values()), by_generator

    def test_same_errors_and_limits_as_one_server(self, two_replicas: Deployed) -> None:
        http = two_replicas.http
        bad = http.post("/v1/videos", json={"prompt": "a cat", "size": "33x32"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
        assert "multiple of 16" in bad.json()["error"]["message"]
        assert http.post("/v1/videos", json={"prompt": 3}).status_code == 422
        missing = http.get("/v1/videos/video_" + "0" * 32)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        image = http.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", "steps": 2})
        assert image.status_code == 200 and image.json()["data"][0]["b64_json"]
        assert http.get("/health").json()["status"] == "ok"
        job_id = submit(http, 1, **SMALL)[0]  # keys: each sees only its own jobs, through any replica
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        assert http.get(f"/v1/videos/{job_id}", headers={"Authorization": ""}).status_code == 401
        assert http.get(f"/v1/videos/{job_id}", headers=other).status_code == 404
        assert http.get("/v1/videos", headers=other).json()["data"] == []
        assert http.get(f"/v1/videos/{job_id}").status_code == 200
        metrics = http.get("/metrics").text
        assert "ditserve_replicas 2.0" in metrics and 'ditserve_jobs{status="completed"}' in metrics

    def test_killing_a_replica_mid_run_loses_no_accepted_job(self, two_replicas: Deployed) -> None:
        http = two_replicas.http
        ids = submit(http, 12, **LONG)
        ours = set(ids)  # a replica may still report a job of an earlier test of this class

        def running_ours(report) -> list:
            return [p for p in report.progress if p.job_id in ours]

        view = wait_for(lambda: (v := two_replicas.view()) and all(running_ours(r) for r in v.replicas.values())
                        and len(v.replicas) == 2 and v, 60, "both replicas to be running jobs", period=0.05)
        # the replica whose jobs are least advanced (none can finish between its last heartbeat and the kill)
        victim_id, victim = min(view.replicas.items(),
                                key=lambda item: max(p.step / p.total for p in running_ours(item[1])))
        cut_short = {p.job_id for p in running_ours(victim) if p.step < p.total // 2}
        assert cut_short, victim.progress
        os.kill(victim.pid, signal.SIGKILL)

        jobs = wait_finished(http, ids, timeout=120)
        statuses = Counter(j["status"] for j in jobs.values())
        assert set(statuses) <= {"completed", "failed"}, statuses
        for job in jobs.values():
            if job["status"] == "failed":
                assert job["error"]["code"] == "replica_died", job["error"]
        for job_id in cut_short:  # re-queued and run again, to the end, by another replica
            assert jobs[job_id]["status"] == "completed", jobs[job_id]
            assert jobs[job_id]["timings"]["replica"] != victim_id
            assert http.get(f"/v1/videos/{job_id}/content").status_code == 200
        requeued = [line for line in http.get("/metrics").text.splitlines()
                    if line.startswith('ditserve_jobs_requeued_total{reason="replica_died"}')]
        assert requeued and float(requeued[0].split()[-1]) >= len(cut_short) >= 1


@pytest.fixture(scope="class")
def autoscaled(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    options = RayOptions(replicas=1, min_replicas=1, max_replicas=2, target_jobs=2, threads=1, app_name="scaling",
                         upscale_delay_s=0.5, downscale_delay_s=3.0, look_back_s=2.0, drain_timeout_s=30.0)
    with deployed(cluster, tmp_path_factory.mktemp("scaling"), options, max_queue=3) as app:
        yield app


class TestAutoscaling:
    def test_scales_from_one_to_two_replicas_under_load_and_back(self, autoscaled: Deployed) -> None:
        http = autoscaled.http
        assert autoscaled.running_replicas() == 1
        ids: list[str] = []
        stop = threading.Event()

        def load() -> None:  # keep the hub full (6 = --max-queue 3 x 2 replicas): 3 run, 3 wait at the router
            seed = 0
            while not stop.is_set():
                response = http.post("/v1/videos", json={"prompt": "a red circle moving left on a blue background",
                                                         "seed": seed, **SMALL, "steps": 30})
                if response.status_code == 200:
                    ids.append(response.json()["id"])
                    seed += 1
                else:
                    assert response.status_code == 429, response.text
                    time.sleep(0.1)

        submitter = threading.Thread(target=load, daemon=True)
        submitter.start()
        try:
            wait_for(lambda: autoscaled.running_replicas() == 2, 60, "a second replica under load")
            wait_for(lambda: len(autoscaled.view().replicas) == 2 and all(
                r.stats.running for r in autoscaled.view().replicas.values()), 30, "both replicas running jobs")
        finally:
            stop.set()
            submitter.join(10)
        jobs = wait_finished(http, ids, timeout=60)
        not_completed = {i: (j["status"], j.get("error")) for i, j in jobs.items() if j["status"] != "completed"}
        assert not not_completed, not_completed
        assert len({j["timings"]["replica"] for j in jobs.values()}) == 2
        wait_for(lambda: autoscaled.running_replicas() == 1, 60, "scaling back to one replica")
        assert Counter(j["status"] for j in wait_finished(http, ids, timeout=5).values()) == {"completed": len(ids)}


@pytest.fixture(scope="class")
def two_rank_replica(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    options = RayOptions.fixed(1, threads=1, app_name="ranks", ranks=(1, 2, 1))  # --num-gpus 2: Ulysses over 2
    with deployed(cluster, tmp_path_factory.mktemp("ranks"), options) as app:
        wait_for(lambda: app.view().live_replicas == 1, 120, "the replica to report")
        yield app


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _followers(replica_pid: int) -> list:
    import psutil  # accelerate's dependency

    return [p for p in psutil.Process(replica_pid).children()
            if "ditserve.rayserve.follower" in " ".join(p.cmdline())]


class TestReplicaOnSeveralRanks:
    def test_a_replica_runs_its_jobs_on_its_two_ranks(self, two_rank_replica: Deployed) -> None:
        (replica,) = two_rank_replica.view().replicas.values()
        assert len(_followers(replica.pid)) == 1  # rank 1, started by the replica (rank 0)
        ids = submit(two_rank_replica.http, 6, **SMALL)
        jobs = wait_finished(two_rank_replica.http, ids, timeout=120)
        assert Counter(j["status"] for j in jobs.values()) == {"completed": 6}
        assert two_rank_replica.http.get(f"/v1/videos/{ids[0]}/content").status_code == 200

    def test_a_rank_that_dies_ends_its_replica_and_its_jobs_run_again_on_the_next(
            self, two_rank_replica: Deployed) -> None:
        http = two_rank_replica.http
        ids = submit(http, 2, **LONG)
        view = wait_for(lambda: (v := two_rank_replica.view()) and any(r.progress for r in v.replicas.values()) and v,
                        60, "the replica to be running jobs", period=0.05)
        (old,) = view.replicas.values()
        (follower,) = _followers(old.pid)
        follower.kill()
        wait_for(lambda: not psutil_alive(old.pid), 30, "the replica (rank 0) to end with its rank")
        jobs = wait_finished(http, ids, timeout=180)  # re-queued, run again from the start by the new replica
        assert Counter(j["status"] for j in jobs.values()) == {"completed": 2}, jobs
        assert all(j["timings"]["replica"] != old.replica_id for j in jobs.values())
        new = wait_for(lambda: next((r for r in two_rank_replica.view().replicas.values() if r.pid != old.pid), None),
                       60, "the new replica's report")
        assert len(_followers(new.pid)) == 1  # new ranks too
        requeued = [line for line in http.get("/metrics").text.splitlines()
                    if line.startswith('ditserve_jobs_requeued_total{reason="replica_died"}')]
        assert requeued and float(requeued[0].split()[-1]) >= 2
