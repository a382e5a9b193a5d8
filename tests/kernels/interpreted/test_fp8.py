"""The FP8 Triton kernels under TRITON_INTERPRET=1 (CPU) against the torch references of moetron/kernels/fp8.py.

Runs in its own process with TRITON_INTERPRET=1 set from the start (tests/kernels/test_interpreter.py
starts it). Fresh random inputs; outputs are poisoned (NaN) before the kernels write them.

* Quantizers: scales must be equal (the interpreter divides in IEEE fp32 as torch does). The codes are
  compared by dequantized value: the interpreter's fp32 -> e4m3 cast (triton/runtime/interpreter.py,
  `_convert_float`) rounds half-up without carrying into the exponent, so about 2-3% of values come out
  wrong in a known way (see `assert_quantized`); the GPU tests check the bytes.
* GEMMs: kernel and reference get the SAME quantized operands, so only the fp32 summation order differs:
  errors are compared with 1e-5 of sum_k |a_k b_k| (the scale of any fp32 rounding in the sums).
* Both operand paths: masked pointers, and the TMA descriptors of the Hopper path (the interpreter emulates
  them); and several tile configs (the GPU autotuner may pick any), set one at a time. The persistent
  grouped GEMM runs 4 programs here, so each walks several tiles.
"""

import pytest
import torch
import triton

from moetron.kernels import fp8
from moetron.kernels import fp8_gemm_triton as fg
from moetron.kernels import fp8_quant_triton as fq


def test_runs_interpreted():
    assert fg.INTERPRET and fq.INTERPRET


def nan_poison(*shape, dtype=torch.float32):
    if dtype == fp8.FP8_DTYPE:  # 0x7F is e4m3fn's NaN
        return torch.full(shape, 0x7F, dtype=torch.uint8).view(fp8.FP8_DTYPE)
    return torch.full(shape, float("nan"), dtype=dtype)


def spread(rows, cols, dtype=torch.float32):
    """Normal values times a per-row factor over 10 binades, a zeroed block, and tiny values (e4m3 subnormals
    after scaling) in row 0."""
    x = torch.randn(rows, cols) * torch.logspace(-4, 4, rows, base=4.0)[:, None]
    x[0] *= torch.rand(cols) ** 8
    if rows > 2 and cols >= 128:
        x[2, :128] = 0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- quantizers
def assert_quantized(q, s, q_ref, s_ref, x_blocks):
    """Scales exactly equal; every code q (in units of its scale) is either the correctly rounded x / s:
        |q - x/s| <= 2^-4 |x/s| + 2^-10   (e4m3 has 3 mantissa bits: round-to-nearest is within half a step,
                                          2^-4 relative; subnormals are spaced 2^-9 in units of the scale),
    widened to a whole subnormal step (2^-9) below 2^-6, where the interpreter truncates; or the reference
    code's half when that code is a power of two (the interpreter lost the carry into the next binade).
    The latter may not exceed 10% of the values (about 1/16 of the values per binade round up into it)."""
    assert torch.equal(s, s_ref), (s - s_ref).abs().max()
    v, k, r = x_blocks / s[..., None], q.float().view_as(x_blocks), q_ref.float().view_as(x_blocks)
    assert torch.isfinite(k).all()
    rounded = (k - v).abs() <= 2**-4 * v.abs() + torch.where(v.abs() < 2**-6, 2**-9, 2**-10)
    ref_pow2 = (r != 0) & (torch.frexp(r.abs()).mantissa == 0.5)
    lost_carry = ref_pow2 & (k == r / 2)
    assert (rounded | lost_carry).all(), (k[~(rounded | lost_carry)][:8], v[~(rounded | lost_carry)][:8])
    assert lost_carry.float().mean() <= 0.1


@pytest.mark.parametrize("m,k", [(1, 128), (17, 256), (130, 384)])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_1x128(m, k, pow2, dtype):
    x = spread(m, k, dtype)
    out = (nan_poison(m, k, dtype=fp8.FP8_DTYPE), nan_poison(m, k // 128))
    q, s = fq.quantize_1x128_triton(x, pow2, out=out)
    q_ref, s_ref = fp8.quantize_1x128_reference(x, pow2_scales=pow2)
    assert_quantized(q, s, q_ref, s_ref, x.float().view(m, k // 128, 128))


@pytest.mark.parametrize("m,k", [(1, 128), (130, 200), (300, 64)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_t(m, k, pow2):
    x = spread(m, k, torch.bfloat16)
    m_pad = triton.cdiv(m, 128) * 128
    out = (nan_poison(k, m_pad, dtype=fp8.FP8_DTYPE), nan_poison(k, m_pad // 128))
    qt, st = fq.quantize_1x128_t_triton(x, pow2, out=out)
    qt_ref, st_ref = fp8.quantize_1x128_t_reference(x, pow2_scales=pow2)
    assert qt.shape == (k, m_pad) and st.shape == (k, m_pad // 128)
    assert (qt[:, m:].view(torch.uint8) == 0).all()  # zero columns past M
    xt = torch.nn.functional.pad(x.float().t(), (0, m_pad - m))
    assert_quantized(qt, st, qt_ref, st_ref, xt.reshape(k, m_pad // 128, 128))
    qt2, st2 = fq.quantize_1x128_t_triton(x, pow2)  # its own buffers: the scales token-block-major
    assert st2.shape == (k, m_pad // 128) and st2.t().is_contiguous()
    assert torch.equal(qt2.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(st2, st)


@pytest.mark.parametrize("n,k", [(1, 128), (200, 256), (130, 384)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_128x128(n, k, pow2):
    w = spread(n, k, torch.bfloat16)
    nb = triton.cdiv(n, 128)
    q, s = fq.quantize_128x128_triton(w, pow2, out=(nan_poison(n, k, dtype=fp8.FP8_DTYPE), nan_poison(nb, k // 128)))
    q_ref, s_ref = fp8.quantize_128x128_reference(w, pow2_scales=pow2)
    # per element: the scale of its block, to view the codes as (N, K/128, 128) blocks of 1x128 with their scale
    s_rows = s.repeat_interleave(128, 0)[:n]
    assert torch.equal(s, s_ref)
    assert_quantized(q, s_rows, q_ref, s_ref.repeat_interleave(128, 0)[:n], w.float().view(n, k // 128, 128))


@pytest.mark.parametrize("m,k", [(1, 128), (130, 256), (256, 128)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_dual_equals_separate_kernels(m, k, pow2):
    """One read of x, both forms: the same bytes as the two separate kernels (the same interpreter casts),
    into poisoned buffers; a bf16 input with a row stride (non-contiguous rows) for the 130-token case."""
    x = spread(m, 2 * k, torch.bfloat16)[:, :k] if m == 130 else spread(m, k, torch.float32)
    m_pad = triton.cdiv(m, 128) * 128
    out = (
        nan_poison(m, k, dtype=fp8.FP8_DTYPE),
        nan_poison(m, k // 128),
        nan_poison(k, m_pad, dtype=fp8.FP8_DTYPE),
        nan_poison(k, m_pad // 128),
    )
    q, s, qt, st = fq.quantize_1x128_dual_triton(x, pow2, out=out)
    q1, s1 = fq.quantize_1x128_triton(x, pow2)
    qt1, st1 = fq.quantize_1x128_t_triton(x, pow2)
    for a, b in ((q, q1), (s, s1), (qt, qt1), (st, st1)):
        assert a.shape == b.shape  # bytes, NaN-safe, in logical order (the separate _t kernel's scales are
        assert torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))  # token-block-major)
    assert (qt[:, m:].view(torch.uint8) == 0).all()  # zero columns past M
    # and the scales are the references' (the codes differ from torch's only by the interpreter's cast)
    _, s_ref, _, st_ref = fp8.quantize_1x128_dual_reference(x, pow2_scales=pow2)
    assert torch.equal(s, s_ref) and torch.equal(st, st_ref)


@pytest.mark.parametrize("shape", [(1, 128), (200, 256), (3, 256, 128), (2, 130, 384)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_128x128_dual_is_the_weight_and_its_transpose(shape, pow2):
    """(q, s) are quantize_128x128's bytes (per expert for 3-D weights), qt is q^T with zero columns past N,
    st is s^T: written into poisoned buffers, a bf16 weight with a row stride in the 3-D case."""
    w = spread(shape[-3] * shape[-2] if len(shape) == 3 else shape[0], 2 * shape[-1], torch.bfloat16)
    w = w[:, : shape[-1]].reshape(shape)
    n, k = shape[-2:]
    lead = shape[:-2]
    nb, n_pad = triton.cdiv(n, 128), triton.cdiv(n, 128) * 128
    out = (
        nan_poison(*lead, n, k, dtype=fp8.FP8_DTYPE),
        nan_poison(*lead, nb, k // 128),
        nan_poison(*lead, k, n_pad, dtype=fp8.FP8_DTYPE),
        nan_poison(*lead, k // 128, nb),
    )
    q, s, qt, st = fq.quantize_128x128_dual_triton(w, pow2, out=out)
    for e, we in enumerate(w.reshape(-1, n, k)):
        qe, se, qte, ste = (t.reshape(-1, *t.shape[-2:])[e] for t in (q, s, qt, st))
        q1, s1 = fq.quantize_128x128_triton(we, pow2)
        assert torch.equal(qe.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(se, s1)
        padded = torch.nn.functional.pad(q1.view(torch.uint8), (0, 0, 0, n_pad - n))
        assert torch.equal(qte.view(torch.uint8), padded.t())  # transposed bytes, zeros past N
        assert torch.equal(ste, s1.t())
    _, s_ref, _, st_ref = fp8.quantize_128x128_dual_reference(w, pow2_scales=pow2)
    assert torch.equal(s, s_ref) and torch.equal(st, st_ref)
    # the public function dispatches to this kernel under the interpreter and returns the same bytes
    got = fp8.quantize_128x128_dual(w, pow2_scales=pow2)
    for a, b in zip(got, (q, s, qt, st)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_quantize_1x128_dual_public_dispatch_and_errors():
    x = spread(3, 256)
    got = fp8.quantize_1x128_dual(x)  # Triton under the interpreter
    want = (*fq.quantize_1x128_triton(x, False), *fq.quantize_1x128_t_triton(x, False))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))
    with pytest.raises(ValueError, match="K=200"):
        fp8.quantize_1x128_dual(torch.randn(4, 200))


def test_public_functions_dispatch_to_triton(monkeypatch):
    called = []
    real = fq.quantize_1x128_triton
    monkeypatch.setattr(fq, "quantize_1x128_triton", lambda *a, **kw: called.append(1) or real(*a, **kw))
    fp8.quantize_1x128(torch.randn(3, 128))
    assert called


# -------------------------------------------------------------------------------------------------- GEMMs
def dequant_abs_product(qa, sa, qb, sb_rows):
    """sum_k |a_k| |b_k| of the dequantized operands (fp64): the scale of fp32 rounding errors in the sums."""
    a = qa.double().abs() * sa.double().repeat_interleave(128, 1)[:, : qa.shape[1]]
    b = qb.double().abs() * sb_rows.double().repeat_interleave(128, 1)[:, : qb.shape[1]]
    return a @ b.t()


def assert_gemm_close(out, ref, bound, rel=1e-5):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).abs()
    assert (err <= rel * bound + 1e-30).all(), f"max error {err.max():.3g}, allowed {rel} x {bound.max():.3g}"


def quantized_operands(m, n, k, b_form):
    qa, sa = fp8.quantize_1x128_reference(torch.randn(m, k))
    b = torch.randn(n, k) * 0.05
    qb, sb = fp8.quantize_128x128_reference(b) if b_form == "block" else fp8.quantize_1x128_reference(b)
    return qa, sa, qb, sb


def use_config(monkeypatch, block_m, block_n, pipeline):
    """One tile config for every GEMM kernel (the interpreter runs a single config, no autotuning)."""
    cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "PIPELINE": pipeline}, pre_hook=fg._set_tma_blocks)
    for kernel in (fg._gemm_kernel, fg._grouped_gemm_kernel, fg._wgrad_kernel):
        monkeypatch.setattr(kernel, "configs", [cfg])


@pytest.mark.parametrize("m,n,k", [(1, 200, 128), (17, 64, 256), (130, 200, 384)])
@pytest.mark.parametrize("b_form", ["block", "row"])
@pytest.mark.parametrize("tma", [False, True])
def test_gemm(m, n, k, b_form, tma):
    qa, sa, qb, sb = quantized_operands(m, n, k, b_form)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.float32, tma=tma, out=nan_poison(m, n))
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    assert_gemm_close(out, ref, dequant_abs_product(qa, sa, qb, fp8._b_scale_rows(sb, n)))


@pytest.mark.parametrize("tma", [False, True])
def test_gemm_weight_gradient_form(tma):
    """dW = dY^T X from quantize_1x128_t's outputs: both scales 1x128 along the tokens, stored
    token-block-major (strides (1, rows)); 300 tokens padded to 384, partial tiles in both output dims."""
    dy, x = torch.randn(300, 200), torch.randn(300, 136)
    qa, sa = fq.quantize_1x128_t_triton(dy, False)  # (200, 384), (200, 3)
    qb, sb = fq.quantize_1x128_t_triton(x, False)  # (136, 384), (136, 3)
    assert sa.stride() == (1, 200) and sb.stride() == (1, 136)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.float32, tma=tma, out=nan_poison(200, 136))
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    assert_gemm_close(out, ref, dequant_abs_product(qa, sa, qb, sb))
    assert (out - dy.t() @ x).norm() <= 0.08 * (dy.t() @ x).norm()  # and it is dW, to FP8 accuracy


@pytest.mark.parametrize(
    "block_m,block_n,pipeline,tma",
    [(64, 64, True, False), (64, 64, True, True), (32, 256, False, True), (128, 256, True, False)],
)
def test_gemm_tile_configs(monkeypatch, block_m, block_n, pipeline, tma):
    """Tiles inside one 128-row weight block (a scalar b_scale) and across two (a gathered one); the
    software-pipelined promotion."""
    use_config(monkeypatch, block_m, block_n, pipeline)
    m, n, k = 70, 300, 384
    for b_form in ("block", "row"):
        qa, sa, qb, sb = quantized_operands(m, n, k, b_form)
        out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.float32, tma=tma, out=nan_poison(m, n))
        ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
        assert_gemm_close(out, ref, dequant_abs_product(qa, sa, qb, fp8._b_scale_rows(sb, n)))


def test_gemm_bf16_output():
    qa, sa, qb, sb = quantized_operands(40, 96, 256, "block")
    out = fp8.fp8_gemm(qa, sa, qb, sb)  # the public function, bf16 out by default
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    assert out.dtype == torch.bfloat16
    # the interpreter truncates fp32 -> bf16 (8 significant bits): within 2^-7 relative, plus the fp32 part
    bound = dequant_abs_product(qa, sa, qb, fp8._b_scale_rows(sb, 96))
    assert ((out.double() - ref.double()).abs() <= 2**-7 * ref.double().abs() + 1e-5 * bound).all()


def grouped_bound(qa, sa, qb, sb, ends):
    bound = torch.zeros(qa.shape[0], qb.shape[1], dtype=torch.float64)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        bound[s:t] = dequant_abs_product(qa[s:t], sa[s:t], qb[e], fp8._b_scale_rows(sb[e], qb.shape[1]))
    return bound


def wgrad_bound(qa, sa, qb, sb, ends):
    bound = torch.zeros(len(ends), qa.shape[0], qb.shape[0], dtype=torch.float64)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        cols, blocks = slice(s, t), slice(s // 128, triton.cdiv(t, 128))
        bound[e] = dequant_abs_product(qa[:, cols], sa[:, blocks], qb[:, cols], sb[:, blocks])
    return bound


def expert_weights(n_experts, n, k):
    pairs = [fp8.quantize_128x128_reference(torch.randn(n, k) * 0.05) for _ in range(n_experts)]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


GROUPINGS = {
    "uneven, empty first and middle, tail rows": (300, [0, 50, 50, 170, 260]),
    "one group, all rows": (130, [130]),
    "every row past the groups": (70, [0, 0]),
    "groups of whole tiles": (256, [64, 128, 256]),
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("tma", [False, True])
def test_grouped_gemm(grouping, tma):
    m, ends = GROUPINGS[grouping]
    n, k = 200, 256
    qa, sa = fp8.quantize_1x128_reference(torch.randn(m, k))
    qb, sb = expert_weights(len(ends), n, k)
    group_ends = torch.tensor(ends, dtype=torch.int32)
    out = fg.fp8_grouped_gemm_triton(qa, sa, qb, sb, group_ends, torch.float32, tma=tma, out=nan_poison(m, n))
    ref = fp8.fp8_grouped_gemm_reference(qa, sa, qb, sb, group_ends, torch.float32)
    assert_gemm_close(out, ref, grouped_bound(qa, sa, qb, sb, ends))
    assert (out[ends[-1] :] == 0).all()


@pytest.mark.parametrize("block_m,block_n,pipeline,tma", [(64, 64, True, False), (32, 256, False, True)])
def test_grouped_gemm_tile_configs(monkeypatch, block_m, block_n, pipeline, tma):
    use_config(monkeypatch, block_m, block_n, pipeline)
    m, n, k, ends = 100, 200, 256, [40, 40, 90]
    qa, sa = fp8.quantize_1x128_reference(torch.randn(m, k))
    qb, sb = expert_weights(len(ends), n, k)
    group_ends = torch.tensor(ends, dtype=torch.int64)  # int64 works too
    out = fg.fp8_grouped_gemm_triton(qa, sa, qb, sb, group_ends, torch.float32, tma=tma, out=nan_poison(m, n))
    ref = fp8.fp8_grouped_gemm_reference(qa, sa, qb, sb, group_ends, torch.float32)
    assert_gemm_close(out, ref, grouped_bound(qa, sa, qb, sb, ends))


def wgrad_operands(m_pad, n, k, valid):
    """quantize_1x128_t of dY (M, N) and X (M, K); bytes past `valid` tokens are NaN codes (padding that no
    group owns: the kernel must not read it into a product)."""
    qa, sa = fp8.quantize_1x128_t_reference(torch.randn(m_pad, n))
    qb, sb = fp8.quantize_1x128_t_reference(torch.randn(m_pad, k))
    for q in (qa, qb):
        q.view(torch.uint8)[:, valid:] = 0x7F
    return qa, sa, qb, sb


@pytest.mark.parametrize(
    "m_pad,ends",
    [(384, [128, 128, 256, 300]), (256, [0, 256]), (128, [0, 0, 1]), (256, [128, 128])],
)
@pytest.mark.parametrize("tma", [False, True])
def test_grouped_gemm_wgrad(m_pad, ends, tma):
    n, k = 130, 256
    qa, sa, qb, sb = wgrad_operands(m_pad, n, k, ends[-1])
    group_ends = torch.tensor(ends, dtype=torch.int32)
    e = len(ends)
    out = fg.fp8_grouped_gemm_wgrad_triton(qa, sa, qb, sb, group_ends, torch.float32, tma=tma, out=nan_poison(e, n, k))
    ref = fp8.fp8_grouped_gemm_wgrad_reference(qa, sa, qb, sb, group_ends)
    assert_gemm_close(out, ref, wgrad_bound(qa, sa, qb, sb, ends))
    for g, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        if t == s:
            assert (out[g] == 0).all(), f"empty group {g} must get a zero gradient"


def test_grouped_gemm_wgrad_tile_configs(monkeypatch):
    use_config(monkeypatch, 64, 64, True)
    n, k, ends = 100, 130, [128, 200]
    qa, sa, qb, sb = wgrad_operands(256, n, k, ends[-1])
    group_ends = torch.tensor(ends, dtype=torch.int32)
    out = fg.fp8_grouped_gemm_wgrad_triton(qa, sa, qb, sb, group_ends, torch.float32, tma=True)
    ref = fp8.fp8_grouped_gemm_wgrad_reference(qa, sa, qb, sb, group_ends)
    assert_gemm_close(out, ref, wgrad_bound(qa, sa, qb, sb, ends))


def test_k_not_multiple_of_128_raises_before_launch():
    qa = torch.zeros(4, 200, dtype=fp8.FP8_DTYPE)
    with pytest.raises(ValueError, match="K=200"):
        fp8.fp8_gemm(qa, torch.ones(4, 2), qa, torch.ones(4, 2))
    with pytest.raises(ValueError, match="K=200"):
        fp8.quantize_1x128(torch.randn(4, 200))


def _nan_tiles_and_the_rest(kernel, reference, x, nan_at, blocks=False):
    """Run `kernel` (-> q, s, qt, st) on x with a NaN at `nan_at` and with 0 there: the scales are the reference's,
    NaN included (NaN where a tile holds the NaN; 0 with power-of-two scales); every code of a tile without the
    NaN is the same byte as with the 0 (tiles are independent). The NaN tiles' codes are not compared here: the
    interpreter casts a NaN to e4m3 as 384 (the GPU test checks those bytes). `blocks`: 128x128 weight blocks."""
    clean = x.clone()
    clean[nan_at] = 0.0
    x = x.clone()
    x[nan_at] = float("nan")
    got, base, want = kernel(x), kernel(clean), reference(x)
    for q, s, q0, s_ref in ((got[0], got[1], base[0], want[1]), (got[2], got[3], base[2], want[3])):
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)
        assert s.isnan().any() or (s == 0).any()
        # a code's tile: its scale's entry, repeated over the 128 elements the scale covers along the tiles' axis
        bad = (s.isnan() | (s == 0)).repeat_interleave(128, 1)  # 1x128 tiles along the columns
        if blocks:  # 128x128 blocks: (rows / 128, cols / 128)
            bad = bad.repeat_interleave(128, 0)[: q.shape[0]]
        assert torch.equal(q.view(torch.uint8)[~bad], q0.view(torch.uint8)[~bad])


@pytest.mark.parametrize("pow2", [False, True])
def test_quantizers_propagate_nan(pow2):
    """A NaN in the input: NaN scales (0 with pow2) exactly where the reference has them, the other tiles
    untouched. (Triton's default max/min drop NaNs: the kernels reduce and clamp with NaN-propagating ones.)"""
    x = spread(130, 256)
    _nan_tiles_and_the_rest(
        lambda t: fq.quantize_1x128_dual_triton(t, pow2),
        lambda t: fp8.quantize_1x128_dual_reference(t, pow2_scales=pow2),
        x, (7, 200),
    )  # fmt: skip
    w = spread(200, 256)
    _nan_tiles_and_the_rest(
        lambda t: fq.quantize_128x128_dual_triton(t, pow2),
        lambda t: fp8.quantize_128x128_dual_reference(t, pow2_scales=pow2),
        w, (150, 3), blocks=True,
    )  # fmt: skip
