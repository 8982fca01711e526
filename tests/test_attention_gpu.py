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
    names = _serving(q, k, md) + ["auto"]
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
