"""The FP8 quantizers on the GPU (device tool; needs FP8 tensor cores, compute capability >= 8.9): bytes equal to
the torch references (q.view(uint8) and the scales), at realistic sizes, with values over many binades, all-zero
blocks and e4m3 subnormals; every autotuner config; NaNs propagated as the references do. (The GEMMs:
test_fp8_gpu.py, which shares this file's helpers.)
"""

import pytest
import torch
import triton

from moetron.kernels import fp8
from moetron.kernels import fp8_quant_triton as fq

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_fp8_tensor_cores():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability >= 8.9")


def poison(*shape, dtype=torch.float32):
    if dtype == fp8.FP8_DTYPE:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device="cuda").view(fp8.FP8_DTYPE)  # e4m3fn NaN
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def realistic(rows, cols, dtype=torch.bfloat16):
    """Normal values scaled over 16 binades by row, tiny values (subnormal codes) in every 97th row, and an
    all-zero 256-wide block."""
    x = torch.randn(rows, cols, device="cuda") * torch.logspace(-8, 8, rows, base=2.0, device="cuda")[:, None]
    x[::97] *= torch.rand(cols, device="cuda") ** 8
    if rows > 5:
        x[5, :256] = 0
    return x.to(dtype)


def assert_same_bytes(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == fp8.FP8_DTYPE and q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(s, s_ref), f"scales differ at {(s != s_ref).nonzero()[:4].tolist()}"
    diff = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert not diff.any(), f"{int(diff.sum())} codes differ, e.g. {q[diff][:4].float()} vs {q_ref[diff][:4].float()}"


# ---------------------------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_1x128_bytes(pow2, dtype):
    x = realistic(4096 + 17, 7168, dtype)
    assert_same_bytes(fp8.quantize_1x128(x, pow2_scales=pow2), fp8.quantize_1x128_reference(x, pow2_scales=pow2))


def test_quantize_1x128_strided_input():
    x = realistic(1000, 2048)[:, 512:1536]  # rows 2048 apart
    assert_same_bytes(fp8.quantize_1x128(x), fp8.quantize_1x128_reference(x))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m,k", [(8000, 2048), (4096, 1000), (1, 7168)])
def test_quantize_1x128_t_bytes(pow2, m, k):
    x = realistic(m, k)
    m_pad = triton.cdiv(m, 128) * 128
    out = (poison(k, m_pad, dtype=fp8.FP8_DTYPE), poison(k, m_pad // 128))
    got = fq.quantize_1x128_t_triton(x, pow2, out=out)
    assert_same_bytes(got, fp8.quantize_1x128_t_reference(x, pow2_scales=pow2))


@pytest.mark.parametrize(
    "config", fq._quant_1x128_t_kernel.configs, ids=lambda c: f"b{c.kwargs['BLOCK']}w{c.num_warps}"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_1x128_t_every_config(monkeypatch, config, dtype):
    """Each autotuner config of the transposing quantizer (one at a time), bf16 and fp32 input: it transposes
    fp8 tiles in registers (tl.trans), a path with known layout-dependent miscompiles in Triton (an fp8
    transposed store, triton-lang/triton#11111), so every config the autotuner may pick is checked."""
    monkeypatch.setattr(fq._quant_1x128_t_kernel, "configs", [config])
    x = realistic(1000, 2048, dtype)
    assert_same_bytes(fp8.quantize_1x128_t(x), fp8.quantize_1x128_t_reference(x))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m,k", [(4096, 7168), (1000, 2048), (1, 128), (4096 + 17, 256)])
def test_quantize_1x128_dual_bytes(pow2, m, k):
    """The fused quantizer writes the bytes of the two separate kernels (and so of the references) into poisoned
    buffers: M a multiple of 128 or not, zero columns of qt past M."""
    x = realistic(m, k)
    m_pad = triton.cdiv(m, 128) * 128
    out = (
        poison(m, k, dtype=fp8.FP8_DTYPE),
        poison(m, k // 128),
        poison(k, m_pad, dtype=fp8.FP8_DTYPE),
        poison(k, m_pad // 128),
    )
    q, s, qt, st = fq.quantize_1x128_dual_triton(x, pow2, out=out)
    assert_same_bytes((q, s), fq.quantize_1x128_triton(x, pow2))
    assert_same_bytes((qt, st), fq.quantize_1x128_t_triton(x, pow2))
    assert_same_bytes((q, s), fp8.quantize_1x128_reference(x, pow2_scales=pow2))
    assert_same_bytes((qt, st), fp8.quantize_1x128_t_reference(x, pow2_scales=pow2))


@pytest.mark.parametrize("config", fq._quant_1x128_dual_kernel.configs, ids=lambda c: f"w{c.num_warps}")
def test_quantize_1x128_dual_every_config(monkeypatch, config):
    """Each autotuner config (one at a time) on strided fp32 rows."""
    monkeypatch.setattr(fq._quant_1x128_dual_kernel, "configs", [config])
    x = realistic(1000, 2048, torch.float32)[:, :1024]  # strided rows, fp32 input
    got = fp8.quantize_1x128_dual(x)
    assert_same_bytes(got[:2], fq.quantize_1x128_triton(x, False))
    assert_same_bytes(got[2:], fq.quantize_1x128_t_triton(x, False))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("n,k", [(2000, 7168), (7168, 2048), (1, 128)])
def test_quantize_128x128_bytes(pow2, n, k):
    w = realistic(n, k)
    out = (poison(n, k, dtype=fp8.FP8_DTYPE), poison(triton.cdiv(n, 128), k // 128))
    assert_same_bytes(fq.quantize_128x128_triton(w, pow2, out=out), fp8.quantize_128x128_reference(w, pow2_scales=pow2))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(2000, 7168), (4, 1408, 2048), (384, 256), (96, 256), (2, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_128x128_dual_bytes(pow2, shape, dtype):
    """Weight and transpose from one read: byte-equal to the torch reference (per expert for 3-D), for bf16
    weights and fp32 master weights, large and small."""
    w = realistic(shape[0] * shape[1] if len(shape) == 3 else shape[0], shape[-1], dtype).view(shape)
    got, want = fp8.quantize_128x128_dual(w, pow2_scales=pow2), fp8.quantize_128x128_dual_reference(w, pow2_scales=pow2)
    assert_same_bytes(got[:2], want[:2])
    assert_same_bytes(got[2:], want[2:])


def assert_same_bytes_nan(got, want):
    """assert_same_bytes for outputs that hold NaNs: NaN at the same places (codes and scales), the other bytes
    equal (a NaN code's sign bit is not compared)."""
    for a, b in zip(got, want):
        fa, fb = a.float(), b.float()
        assert torch.equal(fa.isnan(), fb.isnan()), f"NaN at {int(fa.isnan().sum())} against {int(fb.isnan().sum())}"
        ok = ~fa.isnan()
        if a.dtype == fp8.FP8_DTYPE:
            assert torch.equal(a.view(torch.uint8)[ok], b.view(torch.uint8)[ok])
        else:
            assert torch.equal(a[ok], b[ok])


@pytest.mark.parametrize("pow2", [False, True])
def test_quantizers_propagate_nan(pow2):
    """A NaN in the input reaches the output as torch's reference has it: every code of its tiles (the row tile,
    the token tile, the weight block) NaN, their scales NaN (0 with power-of-two scales, where the codes are then
    NaN or +-448), and every other tile's bytes unchanged. Triton's default max/min would drop the NaN (finite
    codes and scale: a NaN activation or gradient turned into a finite one the trainer's NaN guard cannot see)."""
    x = realistic(300, 512)
    x[7, 200] = float("nan")
    assert_same_bytes_nan(
        fq.quantize_1x128_dual_triton(x, pow2), fp8.quantize_1x128_dual_reference(x, pow2_scales=pow2)
    )
    assert_same_bytes_nan(fq.quantize_1x128_triton(x, pow2), fp8.quantize_1x128_reference(x, pow2_scales=pow2))
    assert_same_bytes_nan(fq.quantize_1x128_t_triton(x, pow2), fp8.quantize_1x128_t_reference(x, pow2_scales=pow2))
    w = realistic(300, 512, torch.float32)
    w[130, 7] = float("nan")
    got = fq.quantize_128x128_dual_triton(w, pow2)
    assert_same_bytes_nan(got, fp8.quantize_128x128_dual_reference(w, pow2_scales=pow2))
    assert got[0].float().isnan().any()
