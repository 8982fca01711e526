"""Sequence-parallel attention (Ulysses, ring) in real gloo processes, 2 and 4 ranks, against float64
maths on the whole sequence; plus the single-process pieces (splits, log-sum-exp merging, errors).

The multi-process runs are few and shared: one spawn per world size executes every case and
saves what each rank got; the tests then judge those results. Each spawn runs everything twice,
each time in a process group of its own (destroyed and made anew from another store), so that
bit-identical results across runs are checked between separate process groups.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from helpers.distributed import run_ranks

from ditserve.attention import Attention, AttentionBackendError, AttentionMetadata
from ditserve.attention.backends.reference import ReferenceBackend, dense_attention_math
from ditserve.attention.backends.sdpa import SdpaBackend
from ditserve.attention.parallel import (
    HybridSplit,
    RingAttention,
    SequenceParallel,
    UlyssesAttention,
    agree_on_choice,
    kv_head_replication,
    lse_backend_names,
    merge_partials,
    hybrid_split,
    split_dense,
    split_packed,
)

SPAWN_TIMEOUT_S = 120
RUNS = (0, 1)  # each world size runs every case twice, in two process groups
LENGTHS = (7, 13, 5)  # packed samples: none divisible by 2 or 4; 5 over 4 ranks leaves rank 3 an empty chunk
JOINT_LENGTHS = (3, 0, 4)  # a sample without joint tokens too


@dataclass(frozen=True)
class Case:
    """One parallel attention call: what is split, how, and which inner attention runs it."""

    name: str
    mode: str  # "ulysses" | "ring" | "hybrid" (Ulysses 2 inside ring: 4 ranks only)
    packed: bool
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    seq_len: int = 13  # dense; 13 is uneven for 2 and 4 ranks
    batch: int = 2
    joint: int | None = None  # dense: joint tokens per sample; packed: any int means JOINT_LENGTHS
    joint_queries: bool = True  # False: the joint tokens are keys only (`forward_joint_keys`, Cosmos3's text K/V)
    dtype: torch.dtype = torch.float64
    inner: str = "auto"  # "auto", a backend name, or "reference-instance"
    no_split: bool = False  # pass split=None (dense, evenly divisible)


CASES = [
    Case("ulysses_dense", "ulysses", packed=False),
    Case("ulysses_dense_even_no_split", "ulysses", packed=False, seq_len=12, no_split=True),
    Case("ulysses_packed", "ulysses", packed=True),
    Case("ulysses_gqa_dense", "ulysses", packed=False, heads=8, kv_heads=2),
    Case("ulysses_gqa_packed_one_kv_head", "ulysses", packed=True, heads=8, kv_heads=1),
    Case("ulysses_joint_dense", "ulysses", packed=False, joint=5),
    Case("ulysses_joint_packed", "ulysses", packed=True, joint=0),
    Case("ulysses_reference_float32", "ulysses", packed=True, dtype=torch.float32, inner="reference"),
    Case("ring_dense", "ring", packed=False),
    Case("ring_dense_even_no_split", "ring", packed=False, seq_len=12, no_split=True, inner="reference-instance"),
    Case("ring_packed", "ring", packed=True),
    Case("ring_packed_varlen", "ring", packed=True, inner="varlen"),
    Case("ring_gqa_dense", "ring", packed=False, heads=8, kv_heads=2),
    Case("ring_gqa_packed_6_heads", "ring", packed=True, heads=6, kv_heads=2),
    Case("ring_joint_dense", "ring", packed=False, joint=5),
    Case("ring_joint_packed", "ring", packed=True, joint=0),
    Case("ring_float32", "ring", packed=False, dtype=torch.float32, inner="reference"),
    Case("hybrid_dense", "hybrid", packed=False),
    Case("hybrid_packed", "hybrid", packed=True),
    Case("hybrid_gqa_packed_one_kv_head", "hybrid", packed=True, heads=4, kv_heads=1),
    Case("hybrid_joint_dense", "hybrid", packed=False, joint=5),
    Case("hybrid_joint_packed", "hybrid", packed=True, joint=0),
    # key-only joint tokens with grouped-query heads (2 K/V heads: replicated for 4 Ulysses ranks)
    Case("ulysses_joint_keys_gqa_dense", "ulysses", packed=False, heads=8, kv_heads=2, joint=5, joint_queries=False),
    Case("ulysses_joint_keys_gqa_packed", "ulysses", packed=True, heads=8, kv_heads=2, joint=0, joint_queries=False),
    Case("ring_joint_keys_gqa_dense", "ring", packed=False, heads=8, kv_heads=2, joint=5, joint_queries=False),
    Case("ring_joint_keys_gqa_packed", "ring", packed=True, heads=8, kv_heads=2, joint=0, joint_queries=False),
    Case("hybrid_joint_keys_gqa_dense", "hybrid", packed=False, heads=4, kv_heads=1, joint=5, joint_queries=False),
    Case("hybrid_joint_keys_gqa_packed", "hybrid", packed=True, heads=4, kv_heads=1, joint=0, joint_queries=False),
]
HYBRID_ULYSSES = 2  # hybrid cases run on 4 ranks as 2 (Ulysses) x 2 (ring)


def _inputs(case: Case) -> dict[str, torch.Tensor]:
    """The whole-sequence tensors of a case, the same on every rank and in the test process."""
    gen = torch.Generator().manual_seed(sum(map(ord, case.name)))
    lead = (sum(LENGTHS),) if case.packed else (case.batch, case.seq_len)
    shapes = {"q": (case.heads,), "k": (case.kv_heads,), "v": (case.kv_heads,)}
    out = {name: torch.randn(*lead, *h, case.head_dim, generator=gen, dtype=torch.float64).to(case.dtype) for name, h in shapes.items()}
    if case.joint is not None:
        jlead = (sum(JOINT_LENGTHS),) if case.packed else (case.batch, case.joint)
        for name, h in shapes.items():
            out["j" + name] = torch.randn(*jlead, *h, case.head_dim, generator=gen, dtype=torch.float64).to(case.dtype)
    return out


def _has_joint_queries(case: Case) -> bool:
    return case.joint is not None and case.joint_queries


def _expected(case: Case) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 attention over `[joint; sequence]` of each whole sample: (sequence output, joint output);
    key-only joint tokens: the sequence's queries over `[joint; sequence]` keys, no joint output."""
    x = {k: t.double() for k, t in _inputs(case).items()}
    scale = case.head_dim**-0.5
    queries = "qkv" if case.joint_queries else "kv"  # which of q, k, v the joint tokens hold
    if not case.packed:
        if case.joint is None:
            return dense_attention_math(x["q"], x["k"], x["v"], scale), None
        cat = {n: torch.cat([x["j" + n], x[n]], dim=1) if n in queries else x[n] for n in "qkv"}
        full = dense_attention_math(cat["q"], cat["k"], cat["v"], scale)
        if not case.joint_queries:
            return full, None
        return full[:, case.joint :], full[:, : case.joint]
    seq_outs, joint_outs, s0, j0 = [], [], 0, 0
    for n, j in zip(LENGTHS, JOINT_LENGTHS if case.joint is not None else [0] * len(LENGTHS)):
        j_q = j if "q" in queries else 0
        cat = {name: torch.cat([x["j" + name][j0 : j0 + j] if j and name in queries else x[name][:0],
                                x[name][s0 : s0 + n]])[None] for name in "qkv"}
        full = dense_attention_math(cat["q"], cat["k"], cat["v"], scale)[0]
        joint_outs.append(full[:j_q])
        seq_outs.append(full[j_q:])
        s0, j0 = s0 + n, j0 + j
    return torch.cat(seq_outs), (torch.cat(joint_outs) if _has_joint_queries(case) else None)


# ---- what runs in each rank -------------------------------------------------------------------
def _inner(case: Case):
    return ReferenceBackend() if case.inner == "reference-instance" else Attention(case.inner)


def _run_case(case: Case, rank: int, size: int, hybrid: SequenceParallel | None = None) -> dict[str, object]:
    x = _inputs(case)
    joint_lengths = JOINT_LENGTHS if case.joint is not None else None
    if case.mode == "hybrid":
        split = hybrid.split(LENGTHS if case.packed else case.seq_len, joint_lengths=joint_lengths)
        wrapper = hybrid.attention(_inner(case))
    else:
        if case.packed:
            split = split_packed(LENGTHS, size, rank, joint_lengths=joint_lengths)
        else:
            split = split_dense(case.seq_len, size, rank)
        wrapper = (UlyssesAttention if case.mode == "ulysses" else RingAttention)(_inner(case))
    q, k, v = (split.shard(x[n]) for n in "qkv")
    arg = None if case.no_split else split
    if case.joint is None:
        local, joint = wrapper(q, k, v, arg), None
    elif not case.joint_queries:
        local, joint = wrapper.forward_joint_keys(x["jk"], x["jv"], q, k, v, arg), None
    else:
        joint, local = wrapper.forward_joint(x["jq"], x["jk"], x["jv"], q, k, v, arg)
    out = hybrid.gather(split, local) if case.mode == "hybrid" else split.gather(local)
    return {"out": out, "local": local, "joint": joint, "choices": wrapper.backends.choices}


def _cases(size: int) -> list[Case]:
    return [c for c in CASES if c.mode != "hybrid" or size == 2 * HYBRID_ULYSSES]


def _run_errors(rank: int, size: int) -> dict[str, tuple[str, str]]:
    """Calls that must fail cleanly, the same way on every rank (no rank left waiting)."""
    errors = {}
    heads = 2 * size - 1  # not divisible by the degree
    q = torch.randn(1, 3, heads, 8, dtype=torch.float64)
    try:
        UlyssesAttention("reference")(q, q, q)
    except ValueError as exc:
        errors["ulysses_heads"] = (type(exc).__name__, str(exc))
    try:
        RingAttention("sdpa")
    except AttentionBackendError as exc:
        errors["ring_sdpa"] = (type(exc).__name__, str(exc))
    return errors


def _run_agreement(rank: int, size: int) -> dict[str, object]:
    """Rank 0 decides: given different pinned backends per rank, every rank runs rank 0's."""
    x = _inputs(CASES[0])
    split = split_dense(13, size, rank)
    wrapper = UlyssesAttention("sdpa" if rank == 0 else "reference")
    out = split.gather(wrapper(*(split.shard(x[n]) for n in "qkv"), split))
    return {"choice": agree_on_choice(f"rank{rank}"), "choices": wrapper.backends.choices, "out": out}


def _worker(rank: int, size: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 to 4 ranks on 2 cores
    for run in RUNS:
        _run_in_a_new_group(rank, size, os.path.join(out_dir, f"store{run}"), os.path.join(out_dir, f"rank{rank}_run{run}.pt"))


def _run_in_a_new_group(rank: int, size: int, store_path: str, out_path: str) -> None:
    """Every case, the errors and the agreement in a process group made for this run, saved to `out_path`."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=size, timeout=timedelta(seconds=30)
    )
    try:
        results: dict[str, object] = {"cases": {}}
        hybrid = None
        if size == 2 * HYBRID_ULYSSES:  # the grid build_groups makes: neighbours share a Ulysses group
            ulysses = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
            ring = [torch.distributed.new_group([0, 2]), torch.distributed.new_group([1, 3])]
            hybrid = SequenceParallel.hybrid(ulysses[rank // 2], ring[rank % 2])
        for case in _cases(size):  # an exception ends this rank; the spawner then stops the others and re-raises it
            start = time.perf_counter()
            results["cases"][case.name] = _run_case(case, rank, size, hybrid)
            results["cases"][case.name]["seconds"] = time.perf_counter() - start
        results["errors"] = _run_errors(rank, size)
        results["agreement"] = _run_agreement(rank, size)
        torch.save(results, out_path)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(size: int, tmp: Path) -> dict[int, list[dict]]:
    """Run number -> each rank's results, from one spawn of `size` ranks."""
    tmp.mkdir(parents=True)
    run_ranks(_worker, size, (size, str(tmp)), SPAWN_TIMEOUT_S)
    return {run: [torch.load(tmp / f"rank{r}_run{run}.pt", weights_only=False) for r in range(size)] for run in RUNS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], list[dict]]:
    """(world size, run number) -> each rank's results."""
    base = tmp_path_factory.mktemp("parallel")
    return {(size, run): results for size in (2, 4) for run, results in _spawn(size, base / f"p{size}").items()}


# ---- multi-process tests --------------------------------------------------------------------------
def _tol(case: Case) -> float:
    return 1e-10 if case.dtype == torch.float64 else 1e-5


@pytest.mark.parametrize(("case", "size"), [(c, n) for n in (2, 4) for c in _cases(n)], ids=lambda x: getattr(x, "name", x))
def test_matches_float64_whole_sequence(runs, case: Case, size: int):
    """Every rank's gathered output (and joint output) equals attention over the whole sequence."""
    expected, expected_joint = _expected(case)
    for rank, result in enumerate(runs[(size, 0)]):
        got = result["cases"][case.name]
        assert got["out"].dtype == case.dtype and got["out"].shape == expected.shape
        err = (got["out"].double() - expected).abs().max().item()
        assert err <= _tol(case), f"rank {rank}: max error {err:.2e}"
        assert (got["joint"] is None) == (expected_joint is None)
        if expected_joint is not None:
            jerr = (got["joint"].double() - expected_joint).abs().max().item()
            assert jerr <= _tol(case), f"rank {rank}: joint max error {jerr:.2e}"


@pytest.mark.parametrize(("case", "size"), [(c, n) for n in (2, 4) for c in _cases(n)
                                           if c.joint is not None or c.name in ("ulysses_dense", "ring_packed", "hybrid_packed")],
                         ids=lambda x: getattr(x, "name", x))
def test_ranks_agree_and_padding_is_zero(runs, case: Case, size: int):
    """Joint outputs are the same bits on every rank; padded local rows are zero; the backend is agreed."""
    results = [r["cases"][case.name] for r in runs[(size, 0)]]
    for rank, got in enumerate(results):
        if case.mode == "hybrid":
            split = hybrid_split(LENGTHS if case.packed else case.seq_len, (rank % 2, 2), (rank // 2, 2)).ulysses
        else:
            split = split_packed(LENGTHS, size, rank) if case.packed else split_dense(case.seq_len, size, rank)
        local = got["local"]
        assert torch.equal(split.zero_padding(local.clone()), local), f"rank {rank}: padded rows are not zero"
        assert got["choices"] == results[0]["choices"]
        if _has_joint_queries(case):
            assert torch.equal(got["joint"], results[0]["joint"]), f"rank {rank}: joint output differs from rank 0's"
    if case.mode in ("ring", "hybrid") and case.inner == "auto":  # auto takes a backend that returns the log-sum-exp:
        assert results[0]["choices"] == (["varlen"] if case.packed else ["reference"])  # the first able on a CPU


@pytest.mark.parametrize("size", [2, 4])
def test_bit_identical_across_runs(runs, size: int):
    """Two separate process groups of the same size give the same bits for every case."""
    for first, second in zip(runs[(size, 0)], runs[(size, 1)]):
        for name, got in first["cases"].items():
            again = second["cases"][name]
            assert torch.equal(got["out"], again["out"]), name
            if got["joint"] is not None:
                assert torch.equal(got["joint"], again["joint"]), name


@pytest.mark.parametrize("size", [2, 4])
def test_error_cases_fail_cleanly_on_every_rank(runs, size: int):
    for result in runs[(size, 0)]:
        kind, message = result["errors"]["ulysses_heads"]
        assert kind == "ValueError"
        assert f"query heads ({2 * size - 1}) must be divisible by the Ulysses degree ({size})" in message
        assert "degrees that work" in message and "Ring attention" in message
        kind, message = result["errors"]["ring_sdpa"]
        assert "'sdpa' cannot return it" in message and "reference" in message


@pytest.mark.parametrize("size", [2, 4])
def test_rank_zero_decides_the_backend(runs, size: int):
    expected, _ = _expected(CASES[0])
    for result in runs[(size, 0)]:
        agreed = result["agreement"]
        assert agreed["choice"] == "rank0"
        assert agreed["choices"] == ["sdpa"]  # rank 0 pinned sdpa, the others reference: all ran sdpa
        assert (agreed["out"] - expected).abs().max().item() <= 1e-10


# ---- single-process pieces ---------------------------------------------------------------------------
def test_reference_returns_log_sum_exp_dense_and_packed():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :3, :2], v[:, :3, :2]  # cross lengths and GQA
    out, lse = ReferenceBackend().forward(q, k, v, AttentionMetadata.dense_for(q, k), 0.3, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * 0.3
    assert torch.allclose(lse, torch.logsumexp(scores, -1).transpose(1, 2))
    assert torch.equal(out, ReferenceBackend().forward(q, k, v, AttentionMetadata.dense_for(q, k), 0.3))
    md = AttentionMetadata.from_lengths([2, 3], [1, 2])
    pq, pk = q[0], k[0]
    pout, plse = ReferenceBackend().forward(pq, pk, pk, md.filled(pq, pk), 0.3, return_lse=True)
    assert plse.shape == (5, 4) and plse.dtype == torch.float64
    for rows, keys in ((slice(0, 2), slice(0, 1)), (slice(2, 5), slice(1, 3))):
        _, want = dense_attention_math(pq[None, rows], pk[None, keys], pk[None, keys], 0.3, return_lse=True)
        assert torch.allclose(plse[rows], want[0])
    assert ReferenceBackend.capabilities.returns_lse
    assert lse_backend_names() == ["fa4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "varlen", "sdpa_cudnn_per_sample",
                                   "reference"]


def test_merging_partials_over_key_blocks_gives_the_whole():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    whole = dense_attention_math(q, k, v, 0.5)
    a = dense_attention_math(q, k[:, :1], v[:, :1], 0.5, return_lse=True)
    b = dense_attention_math(q, k[:, 1:], v[:, 1:], 0.5, return_lse=True)
    out, lse = merge_partials(*a, *b)
    assert torch.allclose(out, whole, atol=1e-12)
    empty = (torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    out2, lse2 = merge_partials(*empty, out, lse)  # a block with no key changes nothing, exactly
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    out3, lse3 = merge_partials(*empty, *empty)
    assert not out3.isnan().any() and (lse3 == float("-inf")).all()


def test_splits_pad_the_last_chunks_and_round_trip():
    dense = [split_dense(13, 4, r) for r in range(4)]
    assert dense[0].chunks == (4,) and [s.valid(s.rank) for s in dense] == [(4,), (4,), (4,), (1,)]
    x = torch.arange(2 * 13, dtype=torch.float32).reshape(2, 13, 1)
    stacked = torch.stack([s.shard(x) for s in dense])
    assert stacked.shape == (4, 2, 4, 1) and (stacked[3, :, 1:] == 0).all()
    assert torch.equal(dense[0].from_chunks(stacked), x)

    packed = [split_packed(LENGTHS, 4, r) for r in range(4)]
    assert packed[0].chunks == (2, 4, 2) and packed[3].valid(3) == (1, 1, 0)
    assert packed[2].local_metadata.seq_lens_q == (2, 4, 2) and packed[2].global_metadata.seq_lens_q == LENGTHS
    y = torch.arange(sum(LENGTHS), dtype=torch.float32)[:, None] + 1
    shards = torch.stack([s.shard(y) for s in packed])
    assert torch.equal(packed[1].from_chunks(shards), y)
    assert shards[3, :, 0].tolist() == [7, 0, 20, 0, 0, 0, 0, 0]  # sample 0's last token, sample 1's, padding
    assert torch.equal(packed[3].zero_padding(shards[3].clone()), shards[3])
    local = shards[0].expand(-1, 2)[:, :, None]  # [local_tokens, heads=2, head_dim=1]
    packed[0].check_inputs(local, local, local)
    with pytest.raises(ValueError, match="joint_lengths"):
        packed[0].check_inputs(local, local, local, (y[:, None], y[:, None], y[:, None]))
    with pytest.raises(ValueError, match=r"query must be \[local_tokens, heads, head_dim\] \(packed\)"):
        packed[0].check_inputs(local[None], local, local)
    with pytest.raises(ValueError, match="expected the local sequence with 8 tokens"):
        packed[0].check_inputs(local, local[1:], local)
    with pytest.raises(ValueError, match="at least one token"):
        split_packed([0, 0], 2, 0)


def test_hybrid_split_shards_round_trip_through_both_levels():
    """A 2 (Ulysses) x 2 (ring) split: each rank's shard, put back per ring chunk by the Ulysses split and
    then by the ring split, is the whole sequence; ring padding stays inside the Ulysses pieces."""
    dense = torch.arange(2 * 13 * 3, dtype=torch.float64).reshape(2, 13, 3)
    packed = torch.arange(sum(LENGTHS) * 3, dtype=torch.float64).reshape(-1, 3)
    for lengths, x in ((13, dense), (LENGTHS, packed)):
        splits = {(u, r): hybrid_split(lengths, (u, 2), (r, 2)) for u in range(2) for r in range(2)}
        assert all(isinstance(s, HybridSplit) and s.packed == (x is packed) for s in splits.values())
        ring_chunks = [splits[0, r].ulysses.from_chunks(torch.stack([splits[u, r].shard(x) for u in range(2)]))
                       for r in range(2)]
        assert torch.equal(splits[0, 0].ring.from_chunks(torch.stack(ring_chunks)), x)
        assert splits[1, 1].chunks == splits[1, 1].ulysses.chunks  # what a rank holds: its Ulysses piece


def test_kv_head_replication_and_head_errors():
    assert kv_head_replication(8, 8, 4) == 1
    assert kv_head_replication(8, 2, 4) == 2  # 2 K/V heads over 4 ranks: each sent twice
    assert kv_head_replication(8, 1, 2) == 2
    assert kv_head_replication(12, 3, 4) == 4  # lcm(3, 4) = 12 heads
    with pytest.raises(ValueError, match=r"query heads \(6\) must be divisible by the Ulysses degree \(4\); degrees that work: \[1, 2, 3, 6\]"):
        kv_head_replication(6, 6, 4)


def test_ring_refuses_backends_without_log_sum_exp_at_construction():
    for inner in ("sdpa", SdpaBackend(), Attention("sdpa_math")):
        with pytest.raises(AttentionBackendError, match=r"cannot return it .*Backends that can: \[.fa4., .sdpa_cudnn., .sdpa_flash., .sdpa_efficient., .varlen., .sdpa_cudnn_per_sample., .reference.\]"):
            RingAttention(inner)
    RingAttention()  # auto: chooses among those that can
    RingAttention(Attention("reference"))
