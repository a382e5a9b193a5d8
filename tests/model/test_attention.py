"""flash_attention (reference and sdpa backends) against a naive per-head, per-query loop."""

import math

import pytest
import torch

from moetron.kernels import flash_attention


def naive_attention(q, k, v, causal, scale, doc_of=None, window=None):
    """Textbook attention, one (batch, head, query) at a time; doc_of (batch, seq) document ids."""
    batch, seq_q, n_heads, _ = q.shape
    seq_k, n_kv = k.shape[1], k.shape[2]
    out = torch.zeros(batch, seq_q, n_heads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, n_heads, seq_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            for i in range(seq_q):
                pos = i + seq_k - seq_q
                keys = [
                    j
                    for j in range(seq_k)
                    if (not causal or j <= pos)
                    and (window is None or (pos - j < window and (j - pos < (1 if causal else window))))
                    and (doc_of is None or doc_of[b, i] == doc_of[b, j])
                ]
                if not keys:
                    continue
                s = torch.stack([q[b, i, h].double() @ k[b, j, kv].double() * scale for j in keys])
                lse[b, h, i] = torch.logsumexp(s, 0)
                p = torch.softmax(s, 0)
                out[b, i, h] = sum(p[t] * v[b, j, kv].double() for t, j in enumerate(keys))
    return out, lse


def rand_qkv(batch, seq_q, seq_k, n_heads, n_kv, d_qk, d_v, dtype=torch.float32):
    q = torch.randn(batch, seq_q, n_heads, d_qk, dtype=dtype)
    k = torch.randn(batch, seq_k, n_kv, d_qk, dtype=dtype)
    v = torch.randn(batch, seq_k, n_kv, d_v, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    "seq_q,seq_k,n_heads,n_kv,d_qk,d_v,causal",
    [
        (1, 1, 2, 2, 8, 8, True),
        (17, 17, 4, 1, 16, 16, True),  # MQA
        (13, 13, 8, 2, 24, 16, True),  # GQA 4, MLA-like qk != v head dim
        (9, 21, 4, 4, 8, 12, False),  # cross lengths, non-causal
        (7, 12, 4, 2, 8, 8, True),  # causal with seq_q < seq_k: bottom-right aligned
    ],
)
def test_matches_naive(seq_q, seq_k, n_heads, n_kv, d_qk, d_v, causal):
    q, k, v = rand_qkv(2, seq_q, seq_k, n_heads, n_kv, d_qk, d_v)
    scale = 0.7 / math.sqrt(d_qk)
    out, lse = flash_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, causal, scale)
    assert out.shape == (2, seq_q, n_heads, d_v)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_packed_documents_never_attend_across():
    q, k, v = rand_qkv(2, 16, 16, 4, 2, 8, 8)
    cu = torch.tensor([0, 5, 11, 16, 20, 32], dtype=torch.int32)  # row 0: docs 5, 6, 5; row 1: 4, 12
    doc_of = torch.tensor([0] * 5 + [1] * 6 + [2] * 5 + [3] * 4 + [4] * 12).view(2, 16)
    out = flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=12)
    ref, _ = naive_attention(q, k, v, True, 8**-0.5, doc_of=doc_of)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # Perturb every key/value of document 1: only document 1's outputs may change.
    k2, v2 = k.clone(), v.clone()
    k2[0, 5:11] += 3 * torch.randn_like(k2[0, 5:11])
    v2[0, 5:11] += 3 * torch.randn_like(v2[0, 5:11])
    out2 = flash_attention(q, k2, v2, causal=True, cu_seqlens=cu)
    changed = (out2 - out).abs().amax(dim=(2, 3)) > 0  # (batch, seq)
    assert changed[0, 5:11].all()
    assert not changed[0, :5].any() and not changed[0, 11:].any() and not changed[1].any()


def test_packed_equals_separate_documents():
    q, k, v = rand_qkv(1, 20, 20, 4, 4, 8, 8)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    packed = flash_attention(q, k, v, causal=True, cu_seqlens=cu)
    for s, e in [(0, 7), (7, 20)]:
        alone = flash_attention(q[:, s:e], k[:, s:e], v[:, s:e], causal=True)
        torch.testing.assert_close(packed[:, s:e], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(causal):
    q, k, v = rand_qkv(1, 12, 12, 2, 1, 8, 8)
    out, lse = flash_attention(q, k, v, causal=causal, window=3, return_lse=True)
    ref, ref_lse = naive_attention(q, k, v, causal, 8**-0.5, window=3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_query_seeing_no_key_gives_zero_and_minus_inf_lse():
    # causal with seq_q > seq_k: the first queries precede every key
    q, k, v = rand_qkv(1, 6, 3, 2, 2, 8, 8)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] < 0).all()
    assert (out[0, :3] == 0).all() and torch.isfinite(out).all()


def test_lse_merges_key_blocks():
    """Attention over keys [A; B] equals the lse-weighted merge of attention over A and over B."""
    q, k, v = rand_qkv(2, 8, 16, 4, 2, 8, 8)
    full = flash_attention(q, k, v, causal=False)
    o1, l1 = flash_attention(q, k[:, :10], v[:, :10], causal=False, return_lse=True)
    o2, l2 = flash_attention(q, k[:, 10:], v[:, 10:], causal=False, return_lse=True)
    lse = torch.logaddexp(l1, l2)  # (batch, heads, seq)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    torch.testing.assert_close(w1 * o1 + w2 * o2, full, atol=1e-5, rtol=1e-5)


def test_backward_matches_naive_autograd():
    q, k, v = rand_qkv(1, 9, 9, 4, 2, 8, 6, dtype=torch.float64)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn(1, 9, 4, 6, dtype=torch.float64)
    (flash_attention(q, k, v, causal=True, cu_seqlens=cu) * grad).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    doc_of = torch.tensor([[0] * 4 + [1] * 5])
    (naive_attention(q, k, v, True, 8**-0.5, doc_of=doc_of)[0] * grad).sum().backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_backend_matches_reference(causal):
    q, k, v = rand_qkv(2, 16, 16, 8, 2, 16, 16)
    cu = torch.tensor([0, 6, 16, 30, 32], dtype=torch.int32)
    for kwargs in ({}, {"cu_seqlens": cu}):
        ref = flash_attention(q, k, v, causal=causal, backend="torch", **kwargs)
        got = flash_attention(q, k, v, causal=causal, backend="sdpa", **kwargs)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q, k, v = rand_qkv(2, 8, 8, 6, 4, 8, 8)
    with pytest.raises(ValueError, match="n_kv_heads"):
        flash_attention(q, k, v)
    q, k, v = rand_qkv(2, 8, 8, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="row start"):
        flash_attention(q, k, v, cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, k, v, backend="cuda-magic")
