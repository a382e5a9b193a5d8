"""The FP8 GEMMs on the GPU (device tool; needs FP8 tensor cores, compute capability >= 8.9); the quantizers'
tests are in test_fp8_quant_gpu.py, whose helpers (poison, the capability fixture) this file shares.

* GEMMs against the references on the SAME quantized operands. The FP8 MMA sums a 128-wide block in the
  tensor core's limited-precision accumulator (DeepSeek-V3 §3.3.2 measures ~14 bits kept), the reference
  in fp32, so the tolerance is per block: 2^-8 of sum_k |a_k b_k| per element, and 5e-3 of the norm.
* Every tile config of the autotuners, one at a time, on the TMA path (the Hopper default); the pointer path
  with one config; the autotuned public functions.
* Against cuBLAS: with K = 128 the 1x128 scales are row-wise scales, so fp8_gemm must match
  torch._scaled_mm (row-wise); for longer K against the fp64 product of the dequantized operands.
"""

import pytest
import torch
import triton
from test_fp8_quant_gpu import _needs_fp8_tensor_cores, poison  # noqa: F401  (the fixture: autouse)

from moetron.kernels import fp8
from moetron.kernels import fp8_gemm_triton as fg

pytestmark = pytest.mark.gpu


# -------------------------------------------------------------------------------------------------- GEMMs
def abs_product(qa, sa, qb, sb_rows):
    """sum_k |a_k b_k| of the dequantized operands (fp32): the scale of accumulation errors."""
    a = qa.float().abs() * sa.repeat_interleave(128, 1)[:, : qa.shape[1]]
    b = qb.float().abs() * sb_rows.repeat_interleave(128, 1)[:, : qb.shape[1]]
    return a @ b.t()


def assert_accumulation_close(out, ref, bound):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs()
    assert (err <= 2**-8 * bound + 1e-30).all(), f"max error {err.max():.3g} vs 2^-8 x {bound.max():.3g}"
    assert (out.float() - ref.float()).norm() <= 5e-3 * ref.float().norm()


def assert_output_close(out, ref, bound):
    """assert_accumulation_close for fp32 outputs; 16-bit outputs add their rounding (2^-9 relative for bf16)."""
    if out.dtype == torch.float32:
        assert_accumulation_close(out, ref, bound)
    else:
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2**-8 * bound).all()


def quantized(m, n, k, b_form="block"):
    qa, sa = fp8.quantize_1x128(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qb, sb = fp8.quantize_128x128(b) if b_form == "block" else fp8.quantize_1x128(b)
    return qa, sa, qb, sb, fp8._b_scale_rows(sb, n)


def config_ids(kind):
    return [f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-w{c.num_warps}-s{c.num_stages}-p{int(c.kwargs['PIPELINE'])}"
            for c in fg._gemm_configs(kind)]  # fmt: skip


def pin(monkeypatch, config):
    for kernel in (fg._gemm_kernel, fg._grouped_gemm_kernel, fg._wgrad_kernel):
        monkeypatch.setattr(kernel, "configs", [config])


@pytest.mark.parametrize("config", fg._gemm_configs("gemm"), ids=config_ids("gemm"))
@pytest.mark.parametrize("b_form", ["block", "row"])
def test_gemm_every_config(monkeypatch, config, b_form):
    pin(monkeypatch, config)
    m, n, k = 1000, 1000, 1024  # neither M nor N a multiple of any tile
    qa, sa, qb, sb, sb_rows = quantized(m, n, k, b_form)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.float32, gluon=False, out=poison(m, n))
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    assert_accumulation_close(out, ref, abs_product(qa, sa, qb, sb_rows))


hopper_only = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only"
)


def force_tiles(monkeypatch, tiles, out_dtype):
    """Make the Gluon kernel use tile shape `tiles` (fp32 outputs always take the narrow ones)."""
    import moetron.kernels.fp8_gemm_gluon as gluon_module

    if tiles == "wide" and out_dtype == torch.float32:
        pytest.skip("fp32 outputs always take the narrow tiles")
    monkeypatch.setattr(gluon_module, "choose_tiles", lambda *args: gluon_module.TILES[tiles])


def force_descriptors(monkeypatch, device_desc):
    """Make the Gluon kernel build its A/B descriptors on the device (else on the host) at every size."""
    import moetron.kernels.fp8_gemm_gluon as gluon_module

    monkeypatch.setattr(gluon_module, "DEVICE_DESC_FLOPS", float("inf") if device_desc else 0.0)


@hopper_only
@pytest.mark.parametrize("tiles", ["narrow", "wide"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "m,n,k",
    [(1, 128, 128), (70, 96, 384), (193, 200, 2048), (1000, 1536, 1024), (4096, 4096, 4096), (3000, 2112, 7168)],
)
@pytest.mark.parametrize("device_desc", [True, False])
def test_gemm_gluon(m, n, k, out_dtype, tiles, device_desc, monkeypatch):
    """The warp-specialized Gluon kernel, both tile shapes: partial tiles in M (192- or 128-row tiles) and N
    (for the wide tiles, second halves partly or wholly past N), a single K block, 16-bit outputs through the
    TMA store and fp32 through masked stores, into poisoned buffers; A/B descriptors built on the device or
    on the host."""
    force_tiles(monkeypatch, tiles, out_dtype)
    force_descriptors(monkeypatch, device_desc)
    qa, sa, qb, sb, sb_rows = quantized(m, n, k)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, out_dtype, gluon=True, out=poison(m, n, dtype=out_dtype))
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    bound = abs_product(qa, sa, qb, sb_rows)
    assert_output_close(out, ref, bound)


def weight_gradient_operands(tokens, n, k):
    """dY^T and X^T as FP8Linear's backward quantizes them: 1x128 tiles along the tokens, scales token-block-major."""
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    (qa, sa), (qb, sb) = fp8.quantize_1x128_t(dy), fp8.quantize_1x128_t(x)
    return qa, sa, qb, sb


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,n,k", [(1000, 300, 640), (16384, 2048, 1024)])
def test_gemm_weight_gradient(tokens, n, k, out_dtype):
    """dW = dY^T X as FP8Linear computes it: both operands from quantize_1x128_t (scales token-block-major),
    tokens padded to a multiple of 128, partial tiles in both output dims, into poisoned buffers; the public
    fp8_gemm on the same operands gives the same bytes."""
    qa, sa, qb, sb = weight_gradient_operands(tokens, n, k)
    assert sa.t().is_contiguous() and sb.t().is_contiguous()
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, out_dtype, out=poison(n, k, dtype=out_dtype))
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    bound = abs_product(qa, sa, qb, sb)
    assert_output_close(out, ref, bound)
    assert torch.equal(fp8.fp8_gemm(qa, sa, qb, sb, out_dtype=out_dtype), out)


@hopper_only
@pytest.mark.parametrize("tiles", ["wide", "square"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,n,k", [(100, 4, 128), (1000, 304, 640), (1500, 1156, 2176), (16384, 2048, 1024)])
def test_gemm_gluon_weight_gradient(tokens, n, k, out_dtype, tiles, monkeypatch):
    """The Gluon weight-gradient kernel (fp8_wgrad_gluon), both tile shapes, every output dtype (fp32 through the
    TMA store too): output rows and columns past partial tiles (a 256-wide tile's second half partly or wholly
    past N), one token block, into poisoned buffers; against the reference, and the dispatch reaches it."""
    import moetron.kernels.fp8_wgrad_gluon as wgrad_module

    monkeypatch.setattr(wgrad_module, "choose_tiles", lambda *args: wgrad_module.WGRAD_TILES[tiles])
    calls = []
    real = wgrad_module.fp8_wgrad_gluon
    monkeypatch.setattr(wgrad_module, "fp8_wgrad_gluon", lambda *a: calls.append(1) or real(*a))
    qa, sa, qb, sb = weight_gradient_operands(tokens, n, k)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, out_dtype, out=poison(n, k, dtype=out_dtype))
    assert calls == [1]
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    bound = abs_product(qa, sa, qb, sb)
    assert_output_close(out, ref, bound)
    triton_out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.float32, gluon=False)
    assert_accumulation_close(out.float(), triton_out, bound)  # the two kernels round the promotion differently


@hopper_only
def test_gemm_gluon_strided_output_and_dispatch(monkeypatch):
    """A column slice of a wider buffer as `out` (the TMA store clips to the view), and the public fp8_gemm
    takes the Gluon kernel on the H100 for weight-block scales, the Triton kernel for 1x128 b-scales or with
    MOETRON_FP8_GLUON=0; scales with other strides (a transposed view) reach the Gluon kernel contiguous."""
    import moetron.kernels.fp8_gemm_gluon as gluon_module

    m, n, k = 700, 200, 512
    qa, sa, qb, sb, sb_rows = quantized(m, n, k)
    wide = poison(m, n + 56, dtype=torch.bfloat16)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.bfloat16, gluon=True, out=wide[:, :n])
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2**-8 * abs_product(qa, sa, qb, sb_rows)).all()
    assert wide[:, n:].isnan().all()  # untouched past the view

    calls = []
    real = gluon_module.fp8_gemm_gluon
    monkeypatch.setattr(gluon_module, "fp8_gemm_gluon", lambda *a: calls.append(1) or real(*a))
    fp8.fp8_gemm(qa, sa, qb, sb)
    assert calls == [1]
    qr, sr = fp8.quantize_1x128(torch.randn(n, k, device="cuda"))  # 1x128 b-scales: the Triton kernel
    fp8.fp8_gemm(qa, sa, qr, sr)
    assert calls == [1]
    sa_t = sa.t().contiguous().t()  # the same scales, K-block-major
    assert torch.equal(fp8.fp8_gemm(qa, sa_t, qb, sb), fp8.fp8_gemm(qa, sa, qb, sb)) and calls == [1, 1, 1]
    monkeypatch.setenv("MOETRON_FP8_GLUON", "0")
    fp8.fp8_gemm(qa, sa, qb, sb)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (1, 7168, 2048), (3000, 2112, 7168)])
def test_gemm_autotuned(m, n, k, tma):
    qa, sa, qb, sb, sb_rows = quantized(m, n, k)
    out = fg.fp8_gemm_triton(qa, sa, qb, sb, torch.float32, tma=tma, out=poison(m, n))
    ref = fp8.fp8_gemm_reference(qa, sa, qb, sb, torch.float32)
    assert_accumulation_close(out, ref, abs_product(qa, sa, qb, sb_rows))
    # the public function: bf16 by default, the fp32 result rounded up to the accumulation differences
    out_bf16 = fp8.fp8_gemm(qa, sa, qb, sb)
    assert out_bf16.dtype == torch.bfloat16
    assert ((out_bf16.float() - out).abs() <= 2**-8 * out.abs() + 2**-8 * abs_product(qa, sa, qb, sb_rows)).all()


def test_gemm_against_fp64_dequantized():
    m, n, k = 2048, 3072, 4096
    qa, sa, qb, sb, sb_rows = quantized(m, n, k)
    out = fp8.fp8_gemm(qa, sa, qb, sb, out_dtype=torch.float32)
    a = qa.double() * sa.double().repeat_interleave(128, 1)
    b = qb.double() * sb_rows.double().repeat_interleave(128, 1)
    assert_accumulation_close(out, (a @ b.t()).float(), abs_product(qa, sa, qb, sb_rows))


def test_single_k_block_matches_cublas_rowwise():
    """With K = 128 a 1x128 scale is a row-wise scale: fp8_gemm computes what torch._scaled_mm (cuBLAS) does."""
    m, n, k = 2048, 4096, 128
    qa, sa = fp8.quantize_1x128(torch.randn(m, k, device="cuda"))
    qb, sb = fp8.quantize_1x128(torch.randn(n, k, device="cuda"))  # (N, 1): the per-row b_scale form
    out = fp8.fp8_gemm(qa, sa, qb, sb, out_dtype=torch.bfloat16)
    ref = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
    bound = abs_product(qa, sa, qb, sb)
    # both round an fp32 result to bf16 after their own accumulation: near a rounding boundary the two may
    # land one bf16 step apart (<= 2^-7 relative)
    assert ((out.float() - ref.float()).abs() <= 2**-7 * ref.float().abs() + 2**-10 * bound).all()


def expert_weights(n_experts, n, k):
    w = torch.randn(n_experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    pairs = [fp8.quantize_128x128(w[e]) for e in range(n_experts)]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def random_group_ends(n_rows, n_experts, n_empty, multiple=1):
    """(E,) int32 cumulative row counts, multiples of `multiple`, about n_rows in all; n_empty empty groups
    among the first E - 1 (the last one keeps at least `multiple` rows)."""
    picks = torch.multinomial(torch.ones(n_experts), n_rows // multiple, replacement=True)
    counts = torch.bincount(picks, minlength=n_experts)
    counts[torch.randperm(n_experts - 1)[:n_empty]] = 0
    counts[-1] = max(int(counts[-1]), 1)
    return (torch.cumsum(counts, 0) * multiple).to(torch.int32)


def grouped_bound(qa, sa, qb, sb, ends):
    bound = torch.zeros(qa.shape[0], qb.shape[1], device="cuda")
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        bound[s:t] = abs_product(qa[s:t], sa[s:t], qb[e], fp8._b_scale_rows(sb[e], qb.shape[1]))
    return bound


def check_grouped(m, n, k, n_experts, tma=None):
    group_ends = random_group_ends(m - 37, n_experts, n_empty=2)  # at least 37 rows past the last group
    ends = group_ends.tolist()
    group_ends = group_ends.cuda()
    qa, sa = fp8.quantize_1x128(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    qb, sb = expert_weights(n_experts, n, k)
    out = fg.fp8_grouped_gemm_triton(qa, sa, qb, sb, group_ends, torch.float32, tma=tma, out=poison(m, n))
    ref = fp8.fp8_grouped_gemm_reference(qa, sa, qb, sb, group_ends, torch.float32)
    assert (out[ends[-1] :] == 0).all()
    assert_accumulation_close(out, ref, grouped_bound(qa, sa, qb, sb, ends))


@pytest.mark.parametrize("config", fg._gemm_configs("grouped"), ids=config_ids("grouped"))
def test_grouped_gemm_every_config(monkeypatch, config):
    pin(monkeypatch, config)
    check_grouped(3000, 1000, 1024, n_experts=8)


@pytest.mark.parametrize("tma", [True, False])
def test_grouped_gemm_autotuned(tma):
    check_grouped(8192 + 37, 2048, 2048, n_experts=16, tma=tma)


def test_grouped_gemm_public_bf16():
    m, n, k, n_experts = 4096, 1536, 1024, 8
    qa, sa = fp8.quantize_1x128(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    qb, sb = expert_weights(n_experts, n, k)
    group_ends = random_group_ends(4000, n_experts, n_empty=1).cuda()
    out = fp8.fp8_grouped_gemm(qa, sa, qb, sb, group_ends)
    ref = fp8.fp8_grouped_gemm_reference(qa, sa, qb, sb, group_ends, torch.float32)
    bound = grouped_bound(qa, sa, qb, sb, group_ends.tolist())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 2**-8 * bound).all()


@hopper_only
@pytest.mark.parametrize("tiles", ["narrow", "wide"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "m,n,k,n_experts,past",
    [(3000, 1000, 1024, 8, 37), (8192 + 37, 2048, 2048, 16, 37), (2000, 384, 512, 64, 5), (150, 256, 128, 1, 0),
     (4000, 256, 384, 4, 0)],
)  # fmt: skip
@pytest.mark.parametrize("device_desc", [True, False])
def test_grouped_gemm_gluon(m, n, k, n_experts, past, out_dtype, tiles, device_desc, monkeypatch):
    """The warp-specialized Gluon grouped kernel, both tile shapes: groups of any size (empty, under 64 rows,
    unaligned: the masked store; whole 64-row slices: the TMA store), rows past the last group (zeros) or
    none, N not a multiple of 128 (and of 256: the wide tiles' second half reads the next expert's rows),
    a single K block, one expert, into poisoned buffers; the public fp8_grouped_gemm takes it on the H100."""
    import moetron.kernels.fp8_gemm_gluon as gluon_module

    force_tiles(monkeypatch, tiles, out_dtype)
    force_descriptors(monkeypatch, device_desc)

    group_ends = random_group_ends(m - past, n_experts, n_empty=min(2, n_experts - 1))
    ends = group_ends.tolist()
    group_ends = group_ends.cuda()
    qa, sa = fp8.quantize_1x128(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    qb, sb = expert_weights(n_experts, n, k)
    out = fg.fp8_grouped_gemm_triton(
        qa, sa, qb, sb, group_ends, out_dtype, gluon=True, out=poison(m, n, dtype=out_dtype)
    )
    ref = fp8.fp8_grouped_gemm_reference(qa, sa, qb, sb, group_ends, torch.float32)
    assert (out[ends[-1] :] == 0).all()
    bound = grouped_bound(qa, sa, qb, sb, ends)
    assert_output_close(out, ref, bound)
    calls = []
    real = gluon_module.fp8_gemm_gluon
    monkeypatch.setattr(gluon_module, "fp8_gemm_gluon", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(fp8.fp8_grouped_gemm(qa, sa, qb, sb, group_ends, out_dtype=out_dtype), out)
    assert calls == [1]


def check_wgrad(n, k, n_experts, tma=None, gluon=False, out_dtype=torch.float32):
    """The grouped weight gradient against the reference: two empty groups, the last group ending inside a
    128-token block, NaN codes in the tokens past it (never part of a product), into a poisoned buffer."""
    group_ends = random_group_ends(5000, n_experts, n_empty=2, multiple=128)  # every group a multiple of 128
    group_ends[-1] -= 50  # the last group ends inside a block
    ends = group_ends.tolist()
    m_pad = triton.cdiv(ends[-1], 128) * 128 + 256  # unused blocks at the end too
    qa, sa = fp8.quantize_1x128_t(torch.randn(m_pad, n, device="cuda", dtype=torch.bfloat16))  # dY^T
    qb, sb = fp8.quantize_1x128_t(torch.randn(m_pad, k, device="cuda", dtype=torch.bfloat16))  # X^T
    for q in (qa, qb):  # tokens past the last group: NaN codes, never part of a product
        q.view(torch.uint8)[:, ends[-1] :] = 0x7F
    group_ends = group_ends.cuda()
    out = fg.fp8_grouped_gemm_wgrad_triton(
        qa, sa, qb, sb, group_ends, out_dtype, tma=tma, gluon=gluon, out=poison(n_experts, n, k, dtype=out_dtype)
    )
    ref = fp8.fp8_grouped_gemm_wgrad_reference(qa, sa, qb, sb, group_ends)
    bound = torch.zeros_like(ref)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        if t == s:
            assert (out[e] == 0).all()
        blocks = slice(s // 128, triton.cdiv(t, 128))
        bound[e] = abs_product(qa[:, s:t], sa[:, blocks], qb[:, s:t], sb[:, blocks])
    assert_output_close(out, ref, bound)


@pytest.mark.parametrize("config", fg._gemm_configs("wgrad"), ids=config_ids("wgrad"))
def test_wgrad_every_config(monkeypatch, config):
    pin(monkeypatch, config)
    check_wgrad(1000, 768, n_experts=6, gluon=False)


@pytest.mark.parametrize("tma", [True, False])
def test_wgrad_autotuned(tma):
    check_wgrad(2048, 1024, n_experts=8, tma=tma)


@hopper_only
@pytest.mark.parametrize("tiles", ["wide", "square"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k,n_experts", [(1000, 768, 6), (256, 384, 8), (2048, 1024, 3)])
def test_wgrad_gluon(n, k, n_experts, out_dtype, tiles, monkeypatch):
    """The grouped weight gradient on the Gluon kernel (picked on the H100 when nothing is forced), both tile
    shapes: the tokens past the last group's end hold NaN codes, which the device-built descriptors cut off;
    tiles whose rows run past an expert's N (n = 1000) store through masked stores."""
    import moetron.kernels.fp8_wgrad_gluon as wgrad_module

    monkeypatch.setattr(wgrad_module, "choose_tiles", lambda *args: wgrad_module.WGRAD_TILES[tiles])
    calls = []
    real = wgrad_module.fp8_wgrad_gluon
    monkeypatch.setattr(wgrad_module, "fp8_wgrad_gluon", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check_wgrad(n, k, n_experts, gluon=None, out_dtype=out_dtype)
    assert calls == [1]
