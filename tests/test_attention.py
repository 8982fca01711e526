"""The attention layer: parity with float64 math, fill-in semantics, errors, thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from ditserve.attention import (
    BACKEND_FACTORIES,
    Attention,
    AttentionBackend,
    AttentionBackendError,
    AttentionMetadata,
    AttentionSelector,
    Capabilities,
    resolve_backend_name,
)
from ditserve.attention.backends import create_backends, describe_call
from ditserve.attention.backends.reference import ReferenceBackend, dense_attention_math

CPU = torch.device("cpu")


def _rand(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def _math_packed(q, k, v, q_lens, k_lens, scale, causal=False):
    """Independent packed reference: per sample dense math in float64."""
    outs, q0, k0 = [], 0, 0
    for nq, nk in zip(q_lens, k_lens):
        outs.append(dense_attention_math(q[None, q0 : q0 + nq], k[None, k0 : k0 + nk], v[None, k0 : k0 + nk], scale, causal)[0])
        q0, k0 = q0 + nq, k0 + nk
    return torch.cat(outs)


def _naive(q, k, v, scale, causal=False):
    """Loop-free textbook formula in float64, written independently of the backends."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if causal:
        sk = k.shape[1]
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    probs = torch.softmax(s, -1).nan_to_num(0.0)  # a query with no visible key (causal, sq > sk) gives 0
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.double())


def _rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _cpu_backends_for(call_kind: str) -> list[str]:
    """Registered backends that can serve this kind of call on this machine's CPU."""
    q = torch.zeros(1, 4, 2, 8, dtype=torch.float64)
    if call_kind == "packed":
        md = AttentionMetadata.from_lengths([4]).filled(q[0], q[0])
        call = describe_call(q[0], q[0], q[0], md)
    else:
        call = describe_call(q, q, q, AttentionMetadata.dense_for(q, q))
    return [name for name, b in create_backends().items() if b.why_not(call, CPU) is None]


DENSE = _cpu_backends_for("dense")
PACKED = _cpu_backends_for("packed")


def test_cpu_has_the_expected_backends():
    assert {"reference", "sdpa", "sdpa_math"} <= set(DENSE)
    assert {"reference", "varlen"} <= set(PACKED)


@pytest.mark.parametrize("backend", DENSE + ["auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 33, 4, 4, 33, 16), id="self"),
        pytest.param((2, 17, 4, 4, 40, 16), id="cross"),
        pytest.param((1, 24, 8, 2, 24, 32), id="gqa"),
        pytest.param((3, 5, 6, 3, 9, 8), id="gqa-cross"),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_float64_math(backend, dtype, tol, shape, causal):
    b, sq, hq, hkv, sk, d = shape
    q, k, v = _rand(b, sq, hq, d), _rand(b, sk, hkv, d), _rand(b, sk, hkv, d)
    ref = _naive(q, k, v, d**-0.5, causal)
    md = AttentionMetadata(causal=True) if causal else None
    out = Attention(backend)(q.to(dtype), k.to(dtype), v.to(dtype), md)
    assert out.shape == (b, sq, hq, d) and out.dtype == dtype
    assert _rel(out, ref) <= tol


@pytest.mark.parametrize("backend", PACKED + ["auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "q_lens,k_lens,hq,hkv",
    [
        pytest.param([1, 7, 64, 33], None, 4, 4, id="self-ragged"),
        pytest.param([1, 7, 64, 33], [5, 12, 3, 40], 4, 4, id="cross-ragged"),
        pytest.param([9, 0, 20], [9, 4, 20], 6, 2, id="gqa-with-empty-sample"),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_packed_matches_float64_math(backend, dtype, tol, q_lens, k_lens, hq, hkv, causal):
    k_lens_ = k_lens or q_lens
    d = 16
    q, k, v = _rand(sum(q_lens), hq, d), _rand(sum(k_lens_), hkv, d), _rand(sum(k_lens_), hkv, d)
    ref = torch.cat(
        [
            _naive(q[None, a : a + nq], k[None, c : c + nk], v[None, c : c + nk], d**-0.5, causal)[0]
            for a, c, nq, nk in zip(_starts(q_lens), _starts(k_lens_), q_lens, k_lens_)
        ]
    )
    md = AttentionMetadata.from_lengths(q_lens, k_lens, causal=causal)
    out = Attention(backend)(q.to(dtype), k.to(dtype), v.to(dtype), md)
    assert out.shape == (sum(q_lens), hq, d)
    assert _rel(out, ref) <= tol


def _starts(lens):
    out, acc = [], 0
    for n in lens:
        out.append(acc)
        acc += n
    return out


def test_packed_samples_never_see_each_other():
    q_lens = [5, 11]
    q, k, v = _rand(16, 2, 8), _rand(16, 2, 8), _rand(16, 2, 8)
    md = AttentionMetadata.from_lengths(q_lens)
    out = Attention("varlen")(q, k, v, md)
    k2, v2 = k.clone(), v.clone()
    k2[5:] += 10.0
    v2[5:] -= 3.0  # change only the second sample's keys and values
    out2 = Attention("varlen")(q, k2, v2, md)
    torch.testing.assert_close(out[:5], out2[:5], rtol=0, atol=0)
    assert not torch.allclose(out[5:], out2[5:])


def test_boolean_and_additive_masks_on_dense_backends():
    b, s, h, d = 2, 6, 2, 8
    q, k, v = _rand(b, s, h, d), _rand(b, s, h, d), _rand(b, s, h, d)
    keep = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every row keeps a key
    additive = torch.zeros(b, 1, s, s, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    ref = _naive_masked(q, k, v, keep)
    for name in ("reference", "sdpa", "sdpa_math"):
        for mask in (keep, additive):
            out = Attention(name)(q, k, v, AttentionMetadata(attn_mask=mask))
            assert _rel(out, ref) <= 1e-6, name
    call = describe_call(q, k, v, AttentionMetadata(attn_mask=keep).filled(q, k))
    assert _Recording().why_not(call, CPU) == "does not take an attn_mask"


def _naive_masked(q, k, v, keep):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


# ---- fill-in semantics -----------------------------------------------------------------------


class _Recording(AttentionBackend):
    """A backend that records the metadata it is handed and computes with the reference."""

    name = "recording"
    capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float64}), packed=True)

    def __init__(self):
        self.seen: list[AttentionMetadata] = []

    def forward(self, query, key, value, metadata, scale):
        self.seen.append(metadata)
        return create_backends()["reference"].forward(query, key, value, metadata, scale)


def _recording_layer() -> tuple[Attention, _Recording]:
    selector = AttentionSelector("reference")
    recorder = _Recording()
    selector._backends["reference"] = recorder  # the test's own backend in place of the registry's
    return Attention(selector=selector), recorder


def test_no_metadata_uses_dense_shapes():
    layer, rec = _recording_layer()
    q, k = _rand(2, 12, 2, 8), _rand(2, 30, 2, 8)
    layer(q, k, k.clone())
    md = rec.seen[-1]
    assert (md.max_seq_len_q, md.max_seq_len_k) == (12, 30)
    assert md.cu_seqlens_q is None and not md.causal


def test_missing_fields_are_filled_from_shapes_and_callers_metadata_is_untouched():
    layer, rec = _recording_layer()
    q, k = _rand(2, 12, 2, 8), _rand(2, 30, 2, 8)
    given = AttentionMetadata(max_seq_len_q=None, max_seq_len_k=None)
    layer(q, k, k.clone(), given)
    assert (rec.seen[-1].max_seq_len_q, rec.seen[-1].max_seq_len_k) == (12, 30)
    assert given.max_seq_len_q is None and given.max_seq_len_k is None  # the caller's object is not mutated


def test_metadata_cannot_be_changed_once_built():
    """No backend (or layer) can change what the caller built: assigning a field raises, on the caller's
    object and on the filled copies a backend receives; `dataclasses.replace` makes a changed copy."""
    import dataclasses

    packed = AttentionMetadata.from_lengths([3, 5])
    filled = packed.filled(_rand(8, 2, 8), _rand(8, 2, 8))
    for metadata in (AttentionMetadata(), packed, filled, AttentionMetadata.dense_for(_rand(1, 4, 2, 8), _rand(1, 6, 2, 8))):
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'max_seq_len_q'"):
            metadata.max_seq_len_q = 99
    assert packed.max_seq_len_q is None and filled.max_seq_len_q == 5
    changed = dataclasses.replace(packed, max_seq_len_q=16)
    assert changed.max_seq_len_q == 16 and changed.seq_lens_k == (3, 5) and packed.max_seq_len_q is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.causal = True


def test_only_the_missing_field_is_filled():
    layer, rec = _recording_layer()
    q, k = _rand(1, 12, 2, 8), _rand(1, 30, 2, 8)
    layer(q, k, k.clone(), AttentionMetadata(max_seq_len_k=64))
    assert (rec.seen[-1].max_seq_len_q, rec.seen[-1].max_seq_len_k) == (12, 64)
    layer(q, k, k.clone(), AttentionMetadata(max_seq_len_q=16))
    assert (rec.seen[-1].max_seq_len_q, rec.seen[-1].max_seq_len_k) == (16, 30)


def test_callers_max_seq_len_q_differing_from_query_shape_is_kept():
    layer, rec = _recording_layer()
    q, k = _rand(1, 12, 2, 8), _rand(1, 12, 2, 8)
    out = layer(q, k, k.clone(), AttentionMetadata(max_seq_len_q=128, max_seq_len_k=256))
    assert q.shape[1] == 12 and rec.seen[-1].max_seq_len_q == 128 and rec.seen[-1].max_seq_len_k == 256
    assert _rel(out, _naive(q, k, k, 8**-0.5)) <= 1e-12
    # packed: an upper bound larger than the longest sample is kept and passed on as well
    md = AttentionMetadata.from_lengths([3, 9], max_seq_len_q=32)
    qp = _rand(12, 2, 8)
    layer(qp, qp, qp.clone(), md)
    assert (rec.seen[-1].max_seq_len_q, rec.seen[-1].max_seq_len_k) == (32, 9)


def test_packed_fill_uses_longest_sample_not_tensor_shape():
    layer, rec = _recording_layer()
    md = AttentionMetadata.from_lengths([3, 9], [4, 20])
    q, k = _rand(12, 2, 8), _rand(24, 2, 8)
    layer(q, k, k.clone(), md)
    assert (rec.seen[-1].max_seq_len_q, rec.seen[-1].max_seq_len_k) == (9, 20)


def test_bound_below_actual_length_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len_q=4 is smaller than the longest sample"):
        AttentionMetadata.from_lengths([3, 9], max_seq_len_q=4)
    q = _rand(1, 12, 2, 8)
    with pytest.raises(ValueError, match="must be at least the sequence lengths"):
        Attention("reference")(q, q, q, AttentionMetadata(max_seq_len_q=8))


def test_no_backend_reads_global_state():
    """Two layers in one process with different metadata and backends do not interfere."""
    import ditserve.attention.backends as registry_module

    names_before = dict(BACKEND_FACTORIES)
    a, b = Attention("reference"), Attention("sdpa")
    q = _rand(1, 10, 2, 8)
    a(q, q, q, AttentionMetadata(causal=True))
    out_b = b(q, q, q)
    assert _rel(out_b, _naive(q, q, q, 8**-0.5)) <= 1e-12  # causal of the other call did not leak
    assert registry_module.BACKEND_FACTORIES == names_before


def test_pinned_sdpa_kernel_leaves_other_threads_sdpa_flags_alone():
    """`sdpa_kernel(...)` flips process-wide flags; a pinned backend must not use it, or SDPA
    on another thread (the VAE on the decode thread) finds its kernels switched off."""
    layer = Attention("sdpa_math")
    q = _rand(1, 64, 2, 8)
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    seen: set[tuple[bool, ...]] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.add(tuple(flag() for flag in flags))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(300):
            layer(q, q, q)
    finally:
        done.set()
        poller.join()
    assert seen == {(True, True, True, True)}


# ---- errors ---------------------------------------------------------------------------------


def test_mismatched_head_dims():
    with pytest.raises(ValueError, match="query and key head dims differ: 16 vs 8"):
        Attention("reference")(_rand(1, 4, 2, 16), _rand(1, 4, 2, 8), _rand(1, 4, 2, 8))


def test_heads_not_a_multiple():
    with pytest.raises(ValueError, match=r"query heads \(5\) must be a multiple of key/value heads \(2\)"):
        Attention("reference")(_rand(1, 4, 5, 8), _rand(1, 4, 2, 8), _rand(1, 4, 2, 8))


def test_mixed_dtypes():
    with pytest.raises(ValueError, match="share one dtype"):
        Attention("reference")(_rand(1, 4, 2, 8), _rand(1, 4, 2, 8, dtype=torch.float32), _rand(1, 4, 2, 8))


def test_packed_input_without_cu_seqlens():
    with pytest.raises(ValueError, match="packed 3-D inputs need metadata with cu_seqlens"):
        Attention("reference")(_rand(10, 2, 8), _rand(10, 2, 8), _rand(10, 2, 8))


def test_cu_seqlens_not_monotonic():
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        AttentionMetadata(cu_seqlens_q=torch.tensor([0, 5, 3, 9], dtype=torch.int32))


def test_cu_seqlens_not_starting_at_zero():
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        AttentionMetadata(cu_seqlens_q=torch.tensor([1, 5], dtype=torch.int32))


def test_cu_seqlens_not_ending_at_total_tokens():
    md = AttentionMetadata(cu_seqlens_q=torch.tensor([0, 5, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 9 but query holds 12 tokens"):
        Attention("varlen")(_rand(12, 2, 8), _rand(12, 2, 8), _rand(12, 2, 8), md)


def test_cu_seqlens_wrong_dtype():
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32, got torch.int64"):
        AttentionMetadata(cu_seqlens_q=torch.tensor([0, 5, 9]))


def test_cu_seqlens_given_directly_match_from_lengths():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    md = AttentionMetadata(cu_seqlens_q=cu)
    assert md.seq_lens_q == (3, 7) and md.seq_lens_k == (3, 7) and md.cu_seqlens_k is cu


def test_unknown_backend_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flashy'.*choose 'auto' or one of \[.*'reference'.*'sdpa'"):
        Attention("flashy")


def test_env_var_pins_backend(monkeypatch):
    monkeypatch.setenv("DITSERVE_ATTENTION_BACKEND", "sdpa_math")
    assert resolve_backend_name(None) == "sdpa_math"
    assert Attention().selector.name == "sdpa_math"
    assert resolve_backend_name("reference") == "reference"  # an explicit name wins
    monkeypatch.setenv("DITSERVE_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"'nope' \(from \$DITSERVE_ATTENTION_BACKEND\)"):
        Attention()


def test_pinned_backend_that_cannot_serve_names_reason_and_alternatives():
    q = _rand(1, 8, 2, 8)
    with pytest.raises(AttentionBackendError) as err:
        Attention("sdpa_cudnn")(q, q, q)
    msg = str(err.value)
    assert "'sdpa_cudnn' cannot serve this call" in msg and "runs on ['cuda'], not cpu" in msg
    assert "Backends that can: ['sdpa', 'sdpa_math', 'reference']" in msg


def test_missing_optional_packages_are_simply_unavailable():
    backends = create_backends()
    for name in ("fa4", "flash_attn"):
        reason = backends[name].unavailable_reason()
        if reason is not None:
            assert "not installed" in reason


def test_auto_never_raises_when_a_backend_can_serve():
    # float64 packed GQA causal cross: only varlen/reference serve it on CPU; auto finds one.
    md = AttentionMetadata.from_lengths([3, 4], [5, 6], causal=True)
    q, k = _rand(7, 4, 8), _rand(11, 2, 8)
    out = Attention("auto")(q, k, k.clone(), md)
    assert _rel(out, _math_packed(q, k, k, [3, 4], [5, 6], 8**-0.5, True)) <= 1e-12


def test_auto_selection_is_remembered_per_shape_bucket():
    selector = AttentionSelector("auto")
    layer = Attention(selector=selector)
    q = _rand(1, 8, 2, 8)
    layer(q, q, q)
    layer(_rand(1, 7, 2, 8), _rand(1, 7, 2, 8), _rand(1, 7, 2, 8))  # same power-of-two bucket
    md = AttentionMetadata.from_lengths([3, 5])
    layer(_rand(8, 2, 8), _rand(8, 2, 8), _rand(8, 2, 8), md)
    assert sorted(selector.choices.values()) == ["sdpa", "varlen"]


# ---- concurrency ----------------------------------------------------------------------------


def test_two_threads_with_different_metadata_get_their_own_results():
    layer = Attention("auto")  # one shared module and selector, as in a model
    gen = torch.Generator().manual_seed(0)
    qa = torch.randn(40, 2, 8, dtype=torch.float64, generator=gen)
    qb = torch.randn(30, 2, 8, dtype=torch.float64, generator=gen)
    md_a = AttentionMetadata.from_lengths([10, 30])
    md_b = AttentionMetadata.from_lengths([25, 5], causal=True)
    ref_a = _math_packed(qa, qa, qa, [10, 30], [10, 30], 8**-0.5)
    ref_b = _math_packed(qb, qb, qb, [25, 5], [25, 5], 8**-0.5, causal=True)
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def worker(q, md, ref, tag):
        barrier.wait()
        for _ in range(200):
            if _rel(layer(q, q, q, md), ref) > 1e-12:
                errors.append(tag)
                return

    threads = [threading.Thread(target=worker, args=a) for a in ((qa, md_a, ref_a, "a"), (qb, md_b, ref_b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_varlen_refuses_cuda_head_dims_its_kernel_cannot_take():
    """torch's varlen_attn needs head_dim % 8 == 0 on CUDA (found on an H100 with the tiny
    Wan model, head_dim 12); the backend must say so, so the selector picks another one."""
    backend = create_backends()["varlen"]
    if backend._varlen_attn is None:
        pytest.skip("this torch has no varlen_attn")
    base = dict(device_type="cuda", dtype=torch.bfloat16, num_heads_q=2, num_heads_kv=2, packed=True,
                causal=False, has_mask=False, max_seq_len_q=8, max_seq_len_k=8, batch_size=2)
    from ditserve.attention.backends.base import AttentionCall

    meta = torch.device("meta")
    odd = AttentionCall(head_dim=12, head_dim_v=12, **base)
    assert backend.why_not(odd, meta) == "torch's varlen_attn on CUDA needs head_dim a multiple of 8, not 12"
    assert backend.why_not(AttentionCall(head_dim=16, head_dim_v=16, **base), meta) is None
    # on CPU the per-segment path takes any head size
    assert backend.why_not(odd._replace(device_type="cpu"), torch.device("cpu")) is None


@pytest.mark.parametrize("dense", ["sdpa", "reference"])
@pytest.mark.parametrize(
    "q_lens,k_lens,hq,hkv",
    [
        pytest.param([1, 7, 64, 33], [5, 12, 3, 40], 4, 4, id="cross-ragged"),
        pytest.param([9, 0, 20], [9, 4, 20], 6, 2, id="gqa-with-empty-sample"),
        pytest.param([6, 6, 3, 6, 6, 6], [6, 6, 3, 9, 6, 6], 4, 2, id="runs-of-equal-lengths"),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_per_sample_backend_runs_a_dense_kernel_per_sample(dense, q_lens, k_lens, hq, hkv, causal):
    """The packed wrapper over a dense backend (on a GPU: cuDNN) against float64 math, with the
    log-sum-exp where the dense backend returns it."""
    from ditserve.attention.backends.per_sample import PerSampleBackend

    backend = PerSampleBackend(create_backends()[dense])
    assert backend.name == f"{dense}_per_sample" and backend.capabilities.packed and not backend.capabilities.dense
    d, scale = 16, 16**-0.5
    q, k, v = _rand(sum(q_lens), hq, d), _rand(sum(k_lens), hkv, d), _rand(sum(k_lens), hkv, d)
    md = AttentionMetadata.from_lengths(q_lens, k_lens, causal=causal).filled(q, k)
    assert backend.why_not(describe_call(q, k, v, md), CPU) is None
    ref = _math_packed(q, k, v, q_lens, k_lens, scale, causal)
    assert _rel(backend.forward(q, k, v, md, scale), ref) <= 1e-12
    if backend.capabilities.returns_lse:
        out, lse = backend.forward(q, k, v, md, scale, return_lse=True)
        _, ref_lse = ReferenceBackend().forward(q, k, v, md, scale, return_lse=True)
        seen = ref_lse.isfinite()
        assert _rel(out, ref) <= 1e-12 and torch.allclose(lse[seen].double(), ref_lse[seen].double(), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_per_sample_runs_adjacent_samples_of_one_length_as_one_batched_call(causal):
    """Adjacent samples with equal query and key lengths reach the dense kernel as one `[B, n, H, D]`
    call (a pack of many small images fills the GPU); samples of other lengths, and equal ones that
    are not adjacent, each their own; the result is each sample's attention, output and log-sum-exp."""
    from ditserve.attention.backends.per_sample import per_sample

    q_lens, k_lens = [6, 6, 3, 6, 6, 6, 0], [6, 6, 3, 9, 6, 6, 2]
    d, scale = 16, 16**-0.5
    q, k, v = _rand(sum(q_lens), 4, d), _rand(sum(k_lens), 2, d), _rand(sum(k_lens), 2, d)
    md = AttentionMetadata.from_lengths(q_lens, k_lens, causal=causal).filled(q, k)
    calls = []

    def attend(qs, ks, vs):
        calls.append((qs.shape[0], qs.shape[1], ks.shape[1]))
        return dense_attention_math(qs, ks, vs, scale, causal, return_lse=True)

    out, lse = per_sample(attend, q, k, v, md, return_lse=True)
    assert calls == [(2, 6, 6), (1, 3, 3), (1, 6, 9), (2, 6, 6)]  # the empty sample runs nothing
    assert _rel(out, _math_packed(q, k, v, q_lens, k_lens, scale, causal)) <= 1e-12
    _, ref_lse = ReferenceBackend().forward(q, k, v, md, scale, return_lse=True)
    seen = ref_lse.isfinite()
    assert torch.equal(seen, lse.isfinite()) and torch.allclose(lse[seen].double(), ref_lse[seen].double(), atol=1e-12)


def test_per_sample_backend_refuses_what_its_dense_kernel_refuses():
    """Packed calls reach the dense kernel as one call per sample, so its limits are the wrapper's
    (here: cuDNN takes no causal cross-attention, and a causal packed call may hold such a sample)."""
    from ditserve.attention.backends.base import AttentionCall
    from ditserve.attention.backends.per_sample import PerSampleBackend

    backend = PerSampleBackend(create_backends()["sdpa_cudnn"])
    call = AttentionCall(device_type="cuda", dtype=torch.bfloat16, head_dim=128, head_dim_v=128, num_heads_q=8,
                         num_heads_kv=2, packed=True, causal=True, has_mask=False, max_seq_len_q=64, max_seq_len_k=64,
                         batch_size=2)
    # (asked about a CPU device, so that no GPU's compute capability enters the answer)
    assert backend.why_not(call, CPU) == (
        "causal attention with different query and key lengths needs a mask, which torch's cudnn kernel does not take")
    assert backend.why_not(call._replace(causal=False), CPU) is None
    assert backend.why_not(call._replace(packed=False), CPU) == "only takes packed (varlen) batches"


def test_lossy_fp8_attention_is_pinned_only():
    """auto picks among exact kernels by speed; the FP8 kernel is a quality trade the user opts into by name."""
    from ditserve.attention.backends.base import AttentionCall
    from ditserve.attention.selector import FALLBACK_ORDER

    fp8 = create_backends()["triton_fp8"]
    assert fp8.capabilities.lossy and "triton_fp8" not in FALLBACK_ORDER
    assert all(not create_backends()[name].capabilities.lossy for name in FALLBACK_ORDER)
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(AttentionBackendError, match=r"'triton_fp8' cannot serve this call .*runs on \['cuda'\], not cpu"):
        Attention("triton_fp8")(q, q, q)

    fp8.unavailable_reason = lambda: None  # Triton and an FP8 GPU, as far as the shape checks go
    fp8.device_reason = lambda device: None
    call = AttentionCall(device_type="cuda", dtype=torch.bfloat16, head_dim=32, head_dim_v=32, num_heads_q=4,
                         num_heads_kv=4, packed=False, causal=False, has_mask=False, max_seq_len_q=64, max_seq_len_k=64,
                         batch_size=1)
    cuda = torch.device("cuda")
    assert fp8.why_not(call, cuda) is None  # the embedded model's head_dim
    assert fp8.why_not(call._replace(head_dim=96, head_dim_v=96), cuda) == "takes head_dim 32, 64, 128, not 96"
    assert fp8.why_not(call._replace(head_dim_v=64), cuda) == "takes the same head_dim for q, k and v, not 32 and 64"
