"""The Triton attention kernels on the GPU in bf16 and fp16 against the fp32 reference (device tool)."""

import pytest
import torch

from moetron.kernels import flash_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,seq,n_heads,n_kv,d_qk,d_v,causal,packed",
    [
        (2, 1024, 8, 8, 128, 128, True, False),
        (2, 1000, 16, 2, 64, 64, False, False),
        (1, 777, 8, 8, 192, 128, True, False),
        (1, 2048, 8, 4, 128, 128, True, True),
    ],
)
def test_matches_reference(dtype, batch, seq, n_heads, n_kv, d_qk, d_v, causal, packed):
    torch.manual_seed(0)
    q = torch.randn(batch, seq, n_heads, d_qk, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq, n_kv, d_qk, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seq, n_kv, d_v, device="cuda", dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, 300, 301, 1500, 2048], device="cuda", dtype=torch.int32) if packed else None
    grad = torch.randn(batch, seq, n_heads, d_v, device="cuda", dtype=dtype)
    results = []
    for backend in ("torch", "triton"):
        for t in (q, k, v):
            t.grad = None
        out, lse = flash_attention(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True, backend=backend)
        (out.float() * grad.float()).sum().backward()
        results.append((out.float(), lse, q.grad.float(), k.grad.float(), v.grad.float()))
    (ro, rl, *rg), (o, lse, *g) = results
    torch.testing.assert_close(o, ro, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, rl, atol=1e-3, rtol=1e-3)
    for name, got, want in zip("qkv", g, rg):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 2e-2 * scale, f"d{name}: {(got - want).abs().max()} vs max {scale}"


def test_deterministic_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        flash_attention(q, k, v, backend="triton").sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,seq_q,seq_k,n_heads,n_kv,d_qk,d_v,causal,window,packed",
    [
        (2, 1, 1, 4, 4, 128, 128, True, None, False),
        (2, 17, 17, 4, 1, 64, 64, False, None, False),
        (1, 2048, 2048, 8, 2, 64, 64, False, None, True),  # head dim 64 unmasked: three consumer warpgroups
        (1, 500, 900, 4, 4, 64, 64, False, None, False),
        (1, 129, 129, 8, 2, 128, 128, True, None, False),
        (1, 1000, 1000, 4, 4, 192, 128, True, None, False),
        (1, 127, 300, 4, 4, 128, 128, False, None, False),
        (1, 300, 127, 4, 4, 64, 64, True, None, False),  # queries with no key at all: output 0, lse -inf
        (1, 2048, 2048, 8, 2, 64, 64, True, None, True),  # causal head dim 64: three warpgroups, each to its diagonal
        (2, 500, 900, 4, 4, 64, 64, True, None, False),  # ... with the diagonal off the block grid
        (1, 2048, 2048, 8, 4, 128, 128, True, None, True),
        (2, 700, 700, 4, 4, 128, 128, True, 200, False),
        (1, 700, 700, 4, 4, 64, 64, False, 150, False),
        (2, 1536, 1536, 4, 4, 192, 128, False, None, False),
    ],
)
def test_gluon_matches_reference(dtype, batch, seq_q, seq_k, n_heads, n_kv, d_qk, d_v, causal, window, packed):
    """Forward and backward as dispatched on an H100 (the warp-specialized Gluon kernels for these head
    dims) against the fp32 reference."""
    from moetron.kernels import attention_gluon, attention_gluon_bwd
    from moetron.kernels.attention import attention_reference

    torch.manual_seed(0)
    q = torch.randn(batch, seq_q, n_heads, d_qk, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq_k, n_kv, d_qk, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seq_k, n_kv, d_v, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, seq_q, n_heads, d_v, device="cuda", dtype=dtype)
    if torch.cuda.get_device_capability() == (9, 0):
        assert attention_gluon.supported(q, k, v) and attention_gluon_bwd.supported(q, k, v, window)
    cu = torch.tensor([0, 300, 301, 1500, 2048], device="cuda", dtype=torch.int32) if packed else None
    out, lse = flash_attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, return_lse=True, backend="triton")
    (out.float() * grad.float()).sum().backward()
    got = [t.grad.float() for t in (q, k, v)]
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*ref, causal=causal, window=window, cu_seqlens=cu, return_lse=True)
    (ref_out * grad.float()).sum().backward()
    torch.testing.assert_close(out.float(), ref_out.detach(), atol=2e-2, rtol=2e-2)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # rows that saw no key
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=1e-3, rtol=1e-3)
    for name, g, r in zip("qkv", got, ref):
        scale = r.grad.abs().max().clamp_min(1e-2)
        assert (g - r.grad).abs().max() <= 2e-2 * scale, f"d{name}: {(g - r.grad).abs().max()} vs max {scale}"


def test_gluon_switch(monkeypatch):
    """MOETRON_ATTN_GLUON=0 falls back to the Triton kernels; both agree to bf16 rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    results = []
    for gluon in ("1", "0"):
        monkeypatch.setenv("MOETRON_ATTN_GLUON", gluon)
        for t in (q, k, v):
            t.grad = None
        out = flash_attention(q, k, v, backend="triton")
        out.float().square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad])
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, atol=2e-2, rtol=2e-2)


def test_gluon_item_counter_is_zeroed_again():
    """The forward's programs share an item counter from a ring of slots (attention_gluon_sched._item_counter)
    that no call zeroes: each launch's last program does. After every launch the ring is all zeros, and once the
    ring has wrapped (reused slots) the output is still the first call's, bit for bit."""
    from moetron.kernels import attention_gluon_sched

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    first = flash_attention(q, k, v, causal=True, backend="triton")
    torch.cuda.synchronize()
    ring, _ = attention_gluon_sched._counters[first.device]
    assert not ring.any()
    for _ in range(attention_gluon_sched._COUNTER_SLOTS + 3):
        out = flash_attention(q, k, v, causal=True, backend="triton")
    assert torch.equal(out, first)
    assert not ring.any()


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_side_stream(monkeypatch, causal):
    """The Gluon backward's dQ kernel on a side stream (OVERLAP) gives the same bytes as both kernels on one
    stream, and the gradients are complete when the caller's stream reads them: a non-default caller stream and
    an op right after the backward on it."""
    from moetron.kernels import attention_gluon_bwd

    if not attention_gluon_bwd.supported(*(torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16),) * 3):
        pytest.skip("the Gluon backward needs an sm_90 GPU")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3000, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grads = []
    for overlap in (False, True):
        monkeypatch.setattr(attention_gluon_bwd, "OVERLAP", overlap)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in (q, k, v):
                t.grad = None
            flash_attention(q, k, v, causal=causal, backend="triton").float().square().sum().backward()
            grads.append([(t.grad * 1).clone() for t in (q, k, v)])  # read on the caller's stream at once
        torch.cuda.current_stream().wait_stream(stream)
    for one, two in zip(*grads):
        assert torch.equal(one, two)
