"""fp8_swiglu's Triton kernels (moetron/kernels/fp8_swiglu_triton.py) under TRITON_INTERPRET=1 against the torch
references: the fused SwiGLU quantizer's scales to a few fp32 ulps (the kernel's sigmoid and torch's round
differently) and its codes by the rule of test_fp8.assert_quantized (the interpreter's e4m3 cast),
with gate and up as strided views of one (M, 2F) tensor as the dense FFN hands them over; the fused backward
to bf16's rounding."""

import pytest
import torch
import torch.nn.functional as F
from test_fp8 import assert_quantized

from moetron.kernels.fp8_swiglu import swiglu_backward_reference, swiglu_quantize_reference, swiglu_reference
from moetron.kernels.fp8_swiglu_triton import swiglu_backward_triton, swiglu_quantize_triton


def gate_and_up(m, f, dtype=torch.bfloat16):
    """Views of one (M, 2F) tensor (row stride 2F); a token of zeros, and one of large values."""
    gate_up = torch.randn(m, 2 * f) * 3
    gate_up[0] = 0
    gate_up[-1] *= 40
    gate_up = gate_up.to(dtype)
    return gate_up[:, :f], gate_up[:, f:]


def assert_scales_close(s, s_ref):
    assert s.shape == s_ref.shape
    assert ((s - s_ref).abs() <= 4e-7 * s_ref).all(), ((s - s_ref).abs() / s_ref).max()


@pytest.mark.parametrize("m", [1, 130, 256])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("transposed", [True, False])
def test_swiglu_quantize(m, pow2, transposed):
    gate, up = gate_and_up(m, 256)
    q, s, qt, st = swiglu_quantize_triton(gate, up, pow2, transposed)
    q_ref, s_ref, qt_ref, st_ref = swiglu_quantize_reference(gate, up, transposed=transposed, pow2_scales=pow2)
    h = swiglu_reference(gate, up)  # (M, F) fp32
    assert_scales_close(s, s_ref)
    assert_quantized(q, s, q_ref, s, h.view(m, 2, 128))
    if transposed:
        m_pad = -(-m // 128) * 128
        assert qt.shape == (256, m_pad) and st.stride(0) == 1  # token-block-major scales, as the wgrad reads them
        ht = F.pad(h.t(), (0, m_pad - m)).view(256, m_pad // 128, 128)
        assert_scales_close(st, st_ref)
        assert_quantized(qt, st, qt_ref, st, ht)
    else:
        assert qt is None and st is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_backward(dtype):
    gate, up = gate_and_up(70, 384, dtype)
    dh = torch.randn(70, 384).to(dtype)
    g, u, d = gate.float().abs(), up.float().abs(), dh.float().abs()
    size = d * (u * (1 + g) + g)  # bounds the terms of either gradient: fp32 differences are relative to it
    for got, want in zip(swiglu_backward_triton(gate, up, dh), swiglu_backward_reference(gate, up, dh)):
        assert got.dtype == dtype and got.is_contiguous()
        ulp = 2**-7 if dtype == torch.bfloat16 else 0.0  # the outputs one bf16 rounding apart at most
        assert ((got.float() - want.float()).abs() <= want.float().abs() * ulp + 1e-6 * size).all()
