"""GPU backends against float32 math: bf16 error <= 2e-2, dense, packed, cross, GQA, causal."""

from __future__ import annotations

import pytest
import torch

from ditserve.attention import Attention, AttentionMetadata, AttentionSelector
from ditserve.attention.backends import create_backends, describe_call
from ditserve.attention.backends.reference import dense_attention_math

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = 2e-2


def _serving(call_q, call_k, md):
    device = call_q.device
    call = describe_call(call_q, call_k, call_k, (md or AttentionMetadata.dense_for(call_q, call_k)).filled(call_q, call_k))
    return [n for n, b in create_backends().items() if b.why_not(call, device) is None]


def _rel(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


DENSE_CASES = {
    "self": (2, 1024, 8, 8, 1024, 128),
    "cross": (2, 1000, 8, 8, 77, 128),
    "gqa": (1, 512, 16, 4, 512, 64),
    "gqa-cross": (2, 300, 12, 4, 700, 128),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_every_gpu_backend_dense(case, causal):
    b, sq, hq, hkv, sk, d = DENSE_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, sq, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    md = AttentionMetadata(causal=causal)
    ref = dense_attention_math(q.float(), k.float(), v.float(), d**-0.5, causal)
    names = [n for n in _serving(q, k, md) if not create_backends()[n].capabilities.lossy] + ["auto"]
    assert "sdpa" in names
    failures = {}
    for name in names:
        out = Attention(name)(q, k, v, md)
        err = _rel(out, ref)
        if not err <= TOL:
            failures[name] = err
    assert failures == {}, f"backends over {TOL}: {failures} (tested {names})"


@pytest.mark.parametrize("kv", ["self", "cross"])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_every_gpu_backend_packed(kv, gqa, causal):
    q_lens = [1, 7, 640, 333]
    k_lens = None if kv == "self" else [77, 512, 20, 300]
    hq, hkv, d = (12, 4, 128) if gqa else (8, 8, 128)
    kl = k_lens or q_lens
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(sum(q_lens), hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(sum(kl), hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(sum(kl), hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    md = AttentionMetadata.from_lengths(q_lens, k_lens, device="cuda", causal=causal)
    refs, q0, k0 = [], 0, 0
    for nq, nk in zip(q_lens, kl):
        refs.append(dense_attention_math(q[None, q0 : q0 + nq].float(), k[None, k0 : k0 + nk].float(), v[None, k0 : k0 + nk].float(), d**-0.5, causal)[0])
        q0, k0 = q0 + nq, k0 + nk
    ref = torch.cat(refs)
    names = _serving(q, k, md) + ["auto"]
    assert "varlen" in names
    failures = {}
    for name in names:
        err = _rel(Attention(name)(q, k, v, md), ref)
        if not err <= TOL:
            failures[name] = err
    assert failures == {}, f"backends over {TOL}: {failures} (tested {names})"


def test_auto_measures_and_remembers_on_gpu():
    selector = AttentionSelector("auto")
    layer = Attention(selector=selector)
    q = torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    layer(q, q, q)
    assert len(selector.choices) == 1
    choice = next(iter(selector.choices.values()))
    assert choice not in ("reference", "sdpa_math")


@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_every_lse_backend_returns_the_log_sum_exp(case, causal):
    """What ring attention merges by: each backend that says it returns the log-sum-exp, dense and
    packed, against float32 math (the log-sum-exp to 2e-2 absolute, the output as above)."""
    b, sq, hq, hkv, sk, d = DENSE_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, sq, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    scale = d**-0.5
    ref, ref_lse = dense_attention_math(q.float(), k.float(), v.float(), scale, causal, return_lse=True)
    dense = AttentionMetadata(causal=causal).filled(q, k)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    packed = AttentionMetadata.from_lengths([sq] * b, [sk] * b, "cuda", causal=causal).filled(flat[0], flat[1])
    backends = create_backends()
    tested, failures = [], {}
    for name, backend in backends.items():
        if not backend.capabilities.returns_lse or name == "reference":
            continue
        for layout, args, md in (("dense", (q, k, v), dense), ("packed", flat, packed)):
            if backend.why_not(describe_call(*args, md), q.device) is not None:
                continue
            out, lse = backend.forward(*args, md, scale, return_lse=True)
            out, lse = out.reshape(ref.shape), lse.reshape(ref_lse.shape)
            assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
            seen = ref_lse.isfinite()  # causal rows that see no key: the output is checked, their lse is not used
            lse_err = (lse[seen] - ref_lse[seen]).abs().max().item()
            if not (_rel(out, ref) <= TOL and lse_err <= TOL):
                failures[f"{name} {layout}"] = (_rel(out, ref), lse_err)
            tested.append(f"{name} {layout}")
    if not (causal and sq != sk):  # torch's flash and cuDNN kernels take no causal cross-attention
        assert any(t.startswith(("sdpa_cudnn", "sdpa_flash")) for t in tested), tested
    assert failures == {}, f"over {TOL}: {failures} (tested {tested})"


FP8_CASES = {**DENSE_CASES, "wan-14b-heads": (1, 4100, 40, 40, 4100, 128), "head-dim-32": (1, 300, 4, 4, 333, 32)}


def _fp8_case(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 q, k, v of an FP8 attention case (k with a mean for the smoothing to take) and float32 math's output."""
    b, sq, hq, hkv, sk, d = FP8_CASES[case]
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(b, sq, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16) + 3.0
    v = torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, k, v, dense_attention_math(q.float(), k.float(), v.float(), d**-0.5, False)


@pytest.mark.parametrize("case", list(FP8_CASES))
@pytest.mark.parametrize("fp8_pv", [True, False], ids=["fp8-pv", "bf16-pv"])
def test_fp8_attention_against_float32_math(case, fp8_pv):
    """The lossy FP8 kernel (pinned only) against float32 math: dense, cross, grouped-query, key lengths
    off the 128-token block. Bounds from the kernel run in Triton's interpreter on random inputs (FP8
    products: 0.07-0.10 of the largest output at worst, 0.05 of the mean on average; e4m3's 3 mantissa
    bits on P and V); a wrong index or scale gives errors of order 1."""
    from ditserve.kernels.fp8_attention import fp8_attention
    from ditserve.models.fp8 import fp8_unsupported_reason

    if fp8_unsupported_reason(torch.device("cuda")) is not None:
        pytest.skip("this GPU has no FP8 tensor cores")
    q, k, v, ref = _fp8_case(case)
    (b, sq), sk, d = q.shape[:2], k.shape[1], q.shape[-1]
    out = fp8_attention(q, k, v, d**-0.5, fp8_pv=fp8_pv)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    err = (out.float() - ref).abs()
    worst, mean = (err.max() / ref.abs().max()).item(), (err.mean() / ref.abs().mean()).item()
    assert worst <= 0.15 and mean <= (0.08 if fp8_pv else 0.04), (worst, mean)
    assert torch.equal(out, fp8_attention(q, k, v, d**-0.5, fp8_pv=fp8_pv))  # deterministic
    for block_m, warps, tma in ((128, 4, False), (64, 4, False), (128, 8, True), (128, 8, False)):  # other launches:
        other = fp8_attention(q, k, v, d**-0.5, fp8_pv=fp8_pv, num_warps=warps, block_m=block_m, tma=tma)  # same math
        assert (other.float() - out.float()).abs().max().item() <= 0.02 * ref.abs().max().item(), (block_m, warps, tma)
    # the default register cap (three tiles an SM) and pipeline depth change where values live, not the math
    for options in ({"max_registers": None}, {"num_stages": 3, "max_registers": None}):
        assert torch.equal(fp8_attention(q, k, v, d**-0.5, fp8_pv=fp8_pv, **options), out), options
    if fp8_pv:
        assert torch.equal(Attention("triton_fp8")(q, k, v), out)  # the pinned backend is this kernel
        md = AttentionMetadata.from_lengths([sq] * b, [sk] * b, "cuda")  # packed, equal lengths: one batched call
        packed = Attention("triton_fp8")(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), md)
        assert torch.equal(packed, out.flatten(0, 1))
