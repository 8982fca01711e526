"""`ditserve serve --ray` before anything starts: flags checked with clear errors, Ray imported only when asked
for, and a clear message when it is not installed. No Ray cluster here (tests/test_rayserve.py runs one)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.server import source_env

from ditserve.cli import main, ray_app
from ditserve.rayserve.options import RayOptions
from ditserve.rayserve.requirement import RayNotInstalled, require_ray


def test_importing_ditserve_and_its_server_never_imports_ray() -> None:
    code = ("import sys, ditserve, ditserve.cli, ditserve.server.app, ditserve.server.main\n"
            "from ditserve.cli import build_parser\n"
            "build_parser(['serve']).parse_args(['serve', '--ray', '--replicas', '2'])\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=source_env(), timeout=120)


def test_a_missing_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayNotInstalled, match=r"pip install 'ditserve\[ray\]'"):
        require_ray()


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be >= --min-replicas (3)"),
    (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "4"], "--replicas must be an int in [--min-replicas"),
    (["--replicas", "0"], "--replicas must be an int >= 1"),
    (["--target-jobs-per-replica", "0"], "--target-jobs-per-replica must be a number of jobs > 0"),
    (["--max-attempts", "0"], "--max-attempts must be an int >= 1"),
    (["--replica-threads", "0"], "--replica-threads must be an int >= 1"),
    (["--num-gpus", "4", "--cfg-parallel", "3"], "--cfg-parallel 3 x --ulysses-degree 1 x --ring-degree 1 = 3 "
                                                "does not divide --num-gpus 4"),
    (["--num-gpus", "8", "--ulysses-degree", "8"], "the model's 4 attention heads do not divide by --ulysses-degree 8"),
])
def test_bad_flags_are_refused_before_ray_starts(flags: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ray", *flags]) == 2
    assert message in capsys.readouterr().err


def test_num_gpus_splits_each_replica() -> None:
    from ditserve.cli import build_parser
    from ditserve.rayserve.flags import ray_options

    args = build_parser(["serve"]).parse_args(["serve", "--ray", "--num-gpus", "4", "--cfg-parallel", "2"])
    assert ray_options(args, "cpu", (2, 2, 1)).ranks == (2, 2, 1)
    assert ray_options(args, "cuda", (2, 2, 1)).gpus == 4.0  # one GPU per rank
    with pytest.raises(ValueError, match="ranks must be three degrees >= 1"):
        RayOptions(ranks=(1, 0, 1))
    with pytest.raises(ValueError, match=r"--replica-gpus \(1\) must be --num-gpus \(2\)"):
        RayOptions(ranks=(1, 2, 1), gpus=1.0)


def test_replica_counts_follow_the_flags() -> None:
    fixed = RayOptions.fixed(3)
    assert (fixed.min_replicas, fixed.max_replicas, fixed.autoscaling, fixed.initial_replicas) == (3, 3, False, 3)
    scaled = RayOptions(min_replicas=0, max_replicas=4)
    assert (scaled.autoscaling, scaled.initial_replicas, scaled.torch_threads) == (True, 1, 1)
    assert RayOptions(app_name="video").hub_name == "video-jobs"
    with pytest.raises(ValueError, match="application name"):
        RayOptions(app_name="bad name!")


def test_serve_run_builder_needs_a_shared_output_folder() -> None:
    with pytest.raises(ValueError, match="serve run needs --output-dir"):
        ray_app({"cli": "--replicas 2"})
    with pytest.raises(ValueError, match="one argument, cli="):
        ray_app({"replicas": "2"})


def test_a_replica_rank_that_ends_while_joining_is_reported_at_once() -> None:
    """A child rank that fails before it joins (here: given 0 torch threads) ends its replica
    promptly, naming the rank and its exit status, instead of leaving rank 0 waiting for the join."""
    import threading
    import time

    from ditserve.distributed import ParallelLayout
    from ditserve.rayserve.replica_ranks import ReplicaRanks

    reasons: list[str] = []
    ended = threading.Event()
    started = time.monotonic()
    ranks = ReplicaRanks("unused", {}, ParallelLayout(1, 2, 1), "cpu", threads=0, log_level="error",
                         on_rank_ended=lambda reason: (reasons.append(reason), ended.set()))
    try:
        assert ended.wait(60), "the ended rank was not reported"
        assert time.monotonic() - started < 60
        assert reasons == ["rank(s) 1 (exit status 1) of this replica ended"]
        assert ranks.dead() == [1]
    finally:
        ranks.close(5.0)
