"""fp8_norm's Triton kernels (moetron/kernels/fp8_norm_triton.py) under TRITON_INTERPRET=1 against the torch
references: rstd to a few fp32 ulps, the quantized h by test_fp8.assert_quantized's rule (the interpreter's e4m3
cast) after its scales agree to a few ulps, and the backward (dx, dweight) to fp32 or bf16 rounding."""

import pytest
import torch
import torch.nn.functional as F
from test_fp8 import assert_quantized

from moetron.kernels.fp8_norm import rmsnorm_backward_reference, rmsnorm_quantize_reference, rmsnorm_reference
from moetron.kernels.fp8_norm_triton import rmsnorm_backward_triton, rmsnorm_quantize_triton


def inputs(m, d, dtype):
    """Rows over several binades, a zero row (rstd = 1/sqrt(eps)), a weight around 1."""
    x = torch.randn(m, d) * torch.logspace(-2, 2, m)[:, None]
    x[0] = 0
    weight = torch.rand(d) + 0.5
    return x.to(dtype), weight


def close(got, want, rel):
    assert got.shape == want.shape
    assert ((got - want).abs() <= rel * want.abs()).all(), ((got - want).abs() / want.abs()).max()


@pytest.mark.parametrize("m", [1, 130, 256])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_quantize(m, pow2, transposed, dtype):
    x, weight = inputs(m, 384, dtype)
    q, s, qt, st, rstd = rmsnorm_quantize_triton(x, weight, 1e-6, pow2, transposed)
    q_ref, s_ref, qt_ref, st_ref, rstd_ref = rmsnorm_quantize_reference(
        x, weight, 1e-6, transposed=transposed, pow2_scales=pow2
    )
    close(rstd, rstd_ref, 4e-7)
    h, _ = rmsnorm_reference(x, weight, 1e-6)
    close(s, s_ref, 1e-6)
    assert_quantized(q, s, q_ref, s, h.view(m, 3, 128))
    if transposed:
        m_pad = -(-m // 128) * 128
        assert qt.shape == (384, m_pad) and st.stride(0) == 1  # token-block-major scales, as the wgrad reads them
        close(st, st_ref, 1e-6)
        assert_quantized(qt, st, qt_ref, st, F.pad(h.t(), (0, m_pad - m)).view(384, m_pad // 128, 128))
    else:
        assert qt is None and st is None


@pytest.mark.parametrize("m", [1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward(m, dtype):
    x, weight = inputs(m, 256, dtype)
    rstd = rmsnorm_reference(x, weight, 1e-6)[1]
    dh = torch.randn(m, 256).to(dtype)
    dx, dw = rmsnorm_backward_triton(x, weight, rstd, dh)
    dx_ref, dw_ref = rmsnorm_backward_reference(x, weight, rstd, dh)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    # dx's terms are bounded by rstd * (|g| + |xhat| * mean|g xhat|): fp32 differences are relative to that size
    xhat = x.float().abs() * rstd[:, None]
    g = dh.float().abs() * weight
    size = rstd[:, None] * (g + xhat * (g * xhat).mean(-1, keepdim=True))
    ulp = 2**-7 if dtype == torch.bfloat16 else 0.0
    assert ((dx.float() - dx_ref.float()).abs() <= ulp * dx_ref.float().abs() + 1e-5 * size).all()
    assert ((dw - dw_ref).abs() <= 1e-5 * (dh.float().abs() * xhat).sum(0)).all()
