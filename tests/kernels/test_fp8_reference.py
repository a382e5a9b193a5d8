"""The semantics of the FP8 torch references (moetron/kernels/fp8.py) on CPU, checked from first principles.

* Quantizers: q * s recovers x to e4m3's rounding: 3 mantissa bits, so round-to-nearest is within 2^-4 of
  |x| (half a step of 2^-3 relative); below 2^-6 * s (e4m3 subnormals, spaced 2^-9 * s) within 2^-10 * s.
  Scale shapes, amax / s <= 448, power-of-two scales that are the smallest such, all-zero blocks.
* GEMMs: the block-promoted fp32 product against an fp64 matmul of the dequantized operands. Products of two
  e4m3 values are exact in fp32, so the only errors are fp32 roundings of sums: within
  (128 + K/128 + 2) * 2^-24 of sum_k |a_k b_k| (worst case); 1e-5 allows that for K <= 384.
* Argument errors name the bad value.
"""

import pytest
import torch

from moetron.kernels import fp8

BLOCK = 128


def dequant(q, s, rows_per_scale=1):
    """q * s with s (rows / rows_per_scale, cols / 128) expanded over its block."""
    full = s.repeat_interleave(rows_per_scale, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.double() * full.double()


def spread(rows, cols):
    """Values over many binades, a zero block, and tiny values that become e4m3 subnormals."""
    x = torch.randn(rows, cols) * torch.logspace(-6, 6, rows, base=4.0)[:, None]
    x[0] *= torch.rand(cols) ** 8
    x[-1, :BLOCK] = 0
    return x


def assert_rounding_bound(x, deq, scale_per_element):
    err = (deq - x.double()).abs()
    allowed = 2**-4 * x.double().abs() + 2**-10 * scale_per_element.double()
    assert (err <= allowed).all(), f"worst excess {(err - allowed).max()}"


def assert_scales(x_blocks_amax, s, pow2):
    assert s.dtype == torch.float32
    amax = x_blocks_amax.clamp_min(fp8.AMAX_EPS)
    # amax / (amax / 448) may round to one ulp above 448 (the quantizer clamps); with pow2 scales it is exact
    assert ((amax / s) <= fp8.FP8_MAX * (1 if pow2 else 1 + 2**-22)).all()
    if pow2:
        assert (torch.frexp(s).mantissa == 0.5).all(), "pow2 scales must be powers of two"
        assert ((amax / (s / 2)) > fp8.FP8_MAX).all(), "and the smallest power of two that fits amax"
    else:
        torch.testing.assert_close(s, amax / fp8.FP8_MAX, rtol=2**-23, atol=0)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_1x128(pow2, dtype):
    x = spread(33, 384).to(dtype) if dtype != torch.float16 else spread(33, 384).clamp(-6e4, 6e4).to(dtype)
    q, s = fp8.quantize_1x128_reference(x, pow2_scales=pow2)
    assert q.dtype == fp8.FP8_DTYPE and q.shape == (33, 384) and s.shape == (33, 3)
    assert_rounding_bound(x, dequant(q, s), s.repeat_interleave(BLOCK, 1))
    assert_scales(x.float().abs().view(33, 3, BLOCK).amax(-1), s, pow2)
    assert (q[-1, :BLOCK].float() == 0).all()  # the zero block: codes 0, a finite scale from AMAX_EPS
    assert s[-1, 0] == fp8.ceil_pow2(torch.tensor([fp8.AMAX_EPS / fp8.FP8_MAX]))[0] if pow2 else torch.isfinite(s).all()


@pytest.mark.parametrize("m", [1, 100, 128, 300])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_t(m, pow2):
    k = 80  # any K: it becomes the row count of the output
    x = spread(m, k).t().contiguous().t()  # non-contiguous input, (m, k)
    qt, st = fp8.quantize_1x128_t_reference(x, pow2_scales=pow2)
    m_pad = -(-m // BLOCK) * BLOCK
    assert qt.shape == (k, m_pad) and st.shape == (k, m_pad // BLOCK)
    assert (qt[:, m:].float() == 0).all()
    assert_rounding_bound(x.t(), dequant(qt, st)[:, :m], st.repeat_interleave(BLOCK, 1)[:, :m])
    xt = torch.nn.functional.pad(x.t(), (0, m_pad - m))
    assert_scales(xt.abs().view(k, m_pad // BLOCK, BLOCK).amax(-1), st, pow2)
    # the transpose-fused quantizer is the row quantizer of x^T
    q2, s2 = fp8.quantize_1x128_reference(xt, pow2_scales=pow2)
    assert torch.equal(qt.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(st, s2)


@pytest.mark.parametrize("m", [1, 130])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_dual_is_both_quantizers(m, pow2):
    """The fused quantizer's contract: exactly quantize_1x128 and quantize_1x128_t of the same x, and the
    public function on CPU is that reference; K must be a multiple of 128 as for quantize_1x128."""
    x = spread(m, 256).to(torch.bfloat16)
    q, s, qt, st = fp8.quantize_1x128_dual_reference(x, pow2_scales=pow2)
    q1, s1 = fp8.quantize_1x128_reference(x, pow2_scales=pow2)
    qt1, st1 = fp8.quantize_1x128_t_reference(x, pow2_scales=pow2)
    m_pad = -(-m // BLOCK) * BLOCK
    assert q.shape == (m, 256) and s.shape == (m, 2) and qt.shape == (256, m_pad) and st.shape == (256, m_pad // BLOCK)
    for a, b in ((q, q1), (s, s1), (qt, qt1), (st, st1)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert_rounding_bound(x.float(), dequant(q, s), s.repeat_interleave(BLOCK, 1))
    assert_rounding_bound(x.float().t(), dequant(qt, st)[:, :m], st.repeat_interleave(BLOCK, 1)[:, :m])
    for a, b in zip(fp8.quantize_1x128_dual(x, pow2_scales=pow2), (q, s, qt, st)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    with pytest.raises(ValueError, match="quantize_1x128_dual: K=200"):
        fp8.quantize_1x128_dual(torch.randn(4, 200))


@pytest.mark.parametrize("n", [1, 128, 200])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_128x128(n, pow2):
    w = spread(n, 256) if n > 1 else torch.randn(1, 256)
    q, s = fp8.quantize_128x128_reference(w, pow2_scales=pow2)
    nb = -(-n // BLOCK)
    assert q.shape == (n, 256) and s.shape == (nb, 2)
    assert_rounding_bound(w, dequant(q, s, BLOCK), s.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1))
    padded = torch.nn.functional.pad(w, (0, 0, 0, nb * BLOCK - n))
    assert_scales(padded.abs().view(nb, BLOCK, 2, BLOCK).amax(dim=(1, 3)), s, pow2)


def test_128x128_transpose_is_exact():
    """The contract: a 128x128-quantized weight's transpose is the quantization of the transpose."""
    w = torch.randn(256, 384)
    q, s = fp8.quantize_128x128_reference(w)
    qt, st = fp8.quantize_128x128_reference(w.t().contiguous())
    assert torch.equal(q.t().contiguous().view(torch.uint8), qt.view(torch.uint8)) and torch.equal(s.t(), st)


@pytest.mark.parametrize("shape", [(200, 256), (2, 130, 384)])
def test_quantize_128x128_dual_reference(shape):
    """Per expert: (q, s) of quantize_128x128, qt the quantization of W^T padded to whole blocks with zero
    columns, st = s^T; errors name the function."""
    w = torch.randn(*shape)
    q, s, qt, st = fp8.quantize_128x128_dual_reference(w)
    n, n_pad = shape[-2], -(-shape[-2] // BLOCK) * BLOCK
    for e, we in enumerate(w.reshape(-1, *shape[-2:])):
        qe, se, qte, ste = (t.reshape(-1, *t.shape[-2:])[e] for t in (q, s, qt, st))
        q1, s1 = fp8.quantize_128x128_reference(we)
        qt1, st1 = fp8.quantize_128x128_reference(torch.nn.functional.pad(we, (0, 0, 0, n_pad - n)).t().contiguous())
        assert torch.equal(qe.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(se, s1)
        assert torch.equal(qte.view(torch.uint8), qt1.view(torch.uint8)) and torch.equal(ste, st1)
    with pytest.raises(ValueError, match="quantize_128x128_dual: K=200"):
        fp8.quantize_128x128_dual(torch.randn(2, 4, 200))
    with pytest.raises(ValueError, match="quantize_128x128_dual: expected a .N, K. or per-expert"):
        fp8.quantize_128x128_dual(torch.randn(128))


def test_ceil_pow2_exact():
    s = torch.tensor([1.0, 1.0000001, 0.75, 2.0**-40, 3.0 * 2.0**-30, 1.5e30, 2.0**-126 * 1.5])
    want = torch.tensor([1.0, 2.0, 1.0, 2.0**-40, 2.0**-28, 2.0**101, 2.0**-125])
    assert torch.equal(fp8.ceil_pow2(s), want)


def test_all_zero_block():
    q, s = fp8.quantize_1x128_reference(torch.zeros(2, 128))
    assert (q.float() == 0).all() and torch.isfinite(s).all() and (s > 0).all()


# -------------------------------------------------------------------------------------------------- GEMMs
def operands(m, n, k, b_form):
    qa, sa = fp8.quantize_1x128_reference(torch.randn(m, k))
    b = torch.randn(n, k) * 0.02
    if b_form == "block":
        qb, sb = fp8.quantize_128x128_reference(b)
        return qa, sa, qb, sb, dequant(qb, sb, BLOCK)
    qb, sb = fp8.quantize_1x128_reference(b)
    return qa, sa, qb, sb, dequant(qb, sb)


def fp32_sum_bound(a_deq, b_deq, k):
    return (128 + k // 128 + 2) * 2.0**-24 * (a_deq.abs() @ b_deq.abs().t())


@pytest.mark.parametrize("m,n,k", [(1, 1, 128), (17, 200, 256), (130, 64, 384)])
@pytest.mark.parametrize("b_form", ["block", "row"])
def test_gemm_against_fp64(m, n, k, b_form):
    qa, sa, qb, sb, b_deq = operands(m, n, k, b_form)
    a_deq = dequant(qa, sa)
    out = fp8.fp8_gemm_reference(qa, sa, qb, sb, out_dtype=torch.float32)
    exact = a_deq @ b_deq.t()
    assert ((out.double() - exact).abs() <= fp32_sum_bound(a_deq, b_deq, k)).all()
    # bf16 output is the fp32 result rounded
    assert torch.equal(fp8.fp8_gemm_reference(qa, sa, qb, sb), out.to(torch.bfloat16))


def test_gemm_approximates_the_unquantized_product():
    """End to end: quantize, multiply, compare with the fp64 product of the original operands. Each operand
    is off by <= 2^-4 relative per element (independent roundings), so the product is off by ~2^-4 / sqrt(3)
    relative in norm at worst-case alignment; 0.05 catches a transposed or misplaced scale (off by far more)."""
    a, b = torch.randn(64, 512) * torch.logspace(-2, 2, 512), torch.randn(192, 512) * 0.02
    out = fp8.fp8_gemm(*fp8.quantize_1x128(a), *fp8.quantize_128x128(b), out_dtype=torch.float32)
    exact = a.double() @ b.double().t()
    assert (out.double() - exact).norm() <= 0.05 * exact.norm()


def test_grouped_gemm_against_per_group_fp64():
    m, n, k = 300, 130, 256
    ends = [0, 50, 50, 170, 260]  # empty first and middle groups; rows 260..300 belong to no group
    qa, sa = fp8.quantize_1x128_reference(torch.randn(m, k))
    pairs = [fp8.quantize_128x128_reference(torch.randn(n, k) * 0.02) for _ in ends]
    qb, sb = torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    out = fp8.fp8_grouped_gemm_reference(qa, sa, qb, sb, torch.tensor(ends, dtype=torch.int32), torch.float32)
    a_deq = dequant(qa, sa)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        b_deq = dequant(qb[e], sb[e], BLOCK)
        exact = a_deq[s:t] @ b_deq.t()
        assert ((out[s:t].double() - exact).abs() <= fp32_sum_bound(a_deq[s:t], b_deq, k)).all()
    assert (out[ends[-1] :] == 0).all()


def test_wgrad_against_per_group_dy_t_x():
    m, n, k = 300, 96, 256
    ends = [128, 128, 256, 300]  # groups start at multiples of 128; an empty group; the last one partial
    dy, x = torch.randn(m, n), torch.randn(m, k)
    qdy, sdy = fp8.quantize_1x128_t_reference(dy)  # (N, 384)
    qx, sx = fp8.quantize_1x128_t_reference(x)  # (K, 384)
    out = fp8.fp8_grouped_gemm_wgrad_reference(qdy, sdy, qx, sx, torch.tensor(ends, dtype=torch.int32))
    assert out.shape == (4, n, k) and out.dtype == torch.float32
    dy_deq, x_deq = dequant(qdy, sdy), dequant(qx, sx)  # (N, M_pad), (K, M_pad)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        exact = dy_deq[:, s:t] @ x_deq[:, s:t].t()  # dW_e = dY_e^T X_e
        assert ((out[e].double() - exact).abs() <= fp32_sum_bound(dy_deq[:, s:t], x_deq[:, s:t], 384)).all()
    assert (out[1] == 0).all()
    # and it approximates the unquantized dY^T X of each group
    exact = dy[256:300].double().t() @ x[256:300].double()
    assert (out[3].double() - exact).norm() <= 0.05 * exact.norm()


# ------------------------------------------------------------------------------------------------- errors
def test_k_must_be_a_multiple_of_128():
    with pytest.raises(ValueError, match="K=200"):
        fp8.quantize_1x128(torch.randn(4, 200))
    with pytest.raises(ValueError, match="K=200"):
        fp8.quantize_128x128(torch.randn(4, 200))
    fp8.quantize_1x128_t(torch.randn(4, 200))  # K is the output row count there: any K
    a = torch.zeros(4, 200, dtype=fp8.FP8_DTYPE)
    with pytest.raises(ValueError, match="K=200"):
        fp8.fp8_gemm(a, torch.ones(4, 2), a, torch.ones(1, 2))
    with pytest.raises(ValueError, match="K=200"):
        fp8.fp8_grouped_gemm(a, torch.ones(4, 2), a[None], torch.ones(1, 1, 2), torch.tensor([4], dtype=torch.int32))


def test_bad_arguments_name_the_value():
    a, sa = fp8.quantize_1x128(torch.randn(4, 256))
    b, sb = fp8.quantize_128x128(torch.randn(200, 256))
    with pytest.raises(ValueError, match=r"b_scale .*\(2, 2\) or \(200, 2\).*\(3, 2\)"):
        fp8.fp8_gemm(a, sa, b, torch.ones(3, 2))
    with pytest.raises(ValueError, match="torch.bfloat16"):
        fp8.fp8_gemm(a.to(torch.bfloat16), sa, b, sb)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8.fp8_gemm(a, sa, b, sb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        fp8.fp8_gemm(a, sa, b, sb, backend="cuda")
    with pytest.raises(ValueError, match="group_ends"):
        fp8.fp8_grouped_gemm(a, sa, b[None], sb[None], torch.tensor([4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise"):
        fp8.fp8_grouped_gemm(a, sa, torch.stack([b, b]), torch.stack([sb, sb]), torch.tensor([3, 2]))
    qt, st = fp8.quantize_1x128_t(torch.randn(300, 256))
    with pytest.raises(ValueError, match=r"multiple of 128.*\(1, 100\)"):
        fp8.fp8_grouped_gemm_wgrad(qt, st, qt, st, torch.tensor([100, 200, 300]))


def test_cpu_tensors_use_the_reference():
    x = torch.randn(5, 256)
    q, s = fp8.quantize_1x128(x)
    q_ref, s_ref = fp8.quantize_1x128_reference(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_reference_gemms_sum_in_fp32_under_autocast():
    """A caller under bf16 autocast still gets the fp32 block sums (autocast would make the matmuls bf16)."""
    qa, sa = fp8.quantize_1x128_reference(torch.randn(64, 256))
    qb, sb = fp8.quantize_128x128_reference(torch.randn(96, 256))
    want = fp8.fp8_gemm_reference(qa, sa, qb, sb, out_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fp8.fp8_gemm_reference(qa, sa, qb, sb, out_dtype=torch.float32)
    assert torch.equal(got, want)
