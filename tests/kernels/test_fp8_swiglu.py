"""The SwiGLU fused into the FP8 down projection (`fp8_swiglu_linear`, moetron/kernels/fp8_swiglu.py): against
the unfused FP8 layer on h = silu(gate) * up and against exact arithmetic, dense and per expert; the work it does
(one fused quantization, no quantization of h, one fused backward); its checks. On CPU the kernels dispatch to
their torch references; the GPU tests run the Triton kernels (the interpreter tests are in
tests/kernels/interpreted/test_fp8_swiglu.py)."""

import pytest
import torch
import torch.nn.functional as F

from moetron.kernels import fp8_swiglu as fs
from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear
from moetron.kernels.fp8_linear import FP8_GEMM_RELATIVE_ERROR, fp8_linear
from moetron.kernels.fp8_swiglu import fp8_swiglu_linear, swiglu_backward_reference, swiglu_quantize_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(m, f, n, experts=None, device="cpu"):
    """bf16 gate and up (as a GEMM under autocast hands them over, as views of one (M, 2F) output) and fp32
    weights with the down projection's init scale."""
    gate_up = torch.randn(m, 2 * f, device=device).to(torch.bfloat16)
    shape = (n, f) if experts is None else (experts, n, f)
    weight = torch.randn(*shape, device=device) * f**-0.5
    return gate_up, weight


def run(gate_up, weight, group_ends, dy, fused: bool):
    """y, d(gate_up), dW of the down projection of silu(gate) * up, fused or through the unfused FP8 layer."""
    gate_up = gate_up.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.autocast(gate_up.device.type, dtype=torch.bfloat16):
        if fused:
            y = fp8_swiglu_linear(gate, up, weight, group_ends)
        elif group_ends is None:
            y = fp8_linear(F.silu(gate) * up, weight)
        else:
            y = fp8_grouped_linear(F.silu(gate) * up, weight, group_ends)
    y.backward(dy)
    return y.detach(), gate_up.grad, weight.grad


def exact(gate_up, weight, group_ends, dy):
    """The same three results in float64 (per expert: each group's rows against its weight)."""
    gu = gate_up.double().requires_grad_()
    w = weight.double().requires_grad_()
    gate, up = gu.chunk(2, dim=-1)
    h = F.silu(gate) * up
    if group_ends is None:
        y = h @ w.t()
    else:
        starts = [0, *group_ends[:-1].tolist()]
        y = torch.zeros(h.shape[0], w.shape[1], dtype=torch.float64, device=h.device)
        for e, (s, t) in enumerate(zip(starts, group_ends.tolist())):
            y[s:t] = h[s:t] @ w[e].t()
    y.backward(dy.double())
    return y.detach(), gu.grad, w.grad


@pytest.mark.parametrize("grouped", [False, True])
def test_fused_matches_the_unfused_layer_and_is_as_accurate(grouped):
    """The fused layer's y, dgate/dup and dW lie within FP8's normwise error of exact arithmetic, no farther
    from it than the unfused layer's (which rounds h to bf16 before quantizing it), and close to the unfused
    layer's results (the same arithmetic but for that rounding)."""
    torch.manual_seed(0)
    m, f, n = (512, 256, 384) if grouped else (300, 256, 320)
    gate_up, weight = inputs(m, f, n, experts=3 if grouped else None)
    group_ends = torch.tensor([128, 128, 384]) if grouped else None  # an empty group; rows past 384 give 0
    if grouped:
        gate_up[384:] = 0  # (the MoE layer's padding rows are zeros)
    dy = torch.randn(m, n).to(torch.bfloat16)
    fused, unfused, want = (
        run(gate_up, weight, group_ends, dy, True),
        run(gate_up, weight, group_ends, dy, False),
        exact(gate_up, weight, group_ends, dy),
    )
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.bfloat16 and fused[2].dtype == torch.float32
    for got, ref, exact_value in zip(fused, unfused, want):
        err, err_unfused = rel_err(got, exact_value), rel_err(ref, exact_value)
        assert err < FP8_GEMM_RELATIVE_ERROR and err < 1.1 * err_unfused + 1e-3, (err, err_unfused)
        assert rel_err(got, ref) < 0.5 * FP8_GEMM_RELATIVE_ERROR
    if grouped:
        assert fused[0][384:].abs().max() == 0


def count_calls(monkeypatch):
    import moetron.kernels.fp8_linear as fl
    import moetron.kernels.fp8_weights as fw

    calls = []
    for module, name in [
        (fs, "swiglu_quantize"),
        (fs, "swiglu_backward"),
        (fs, "fp8_gemm"),
        (fl, "fp8_gemm"),
        (fl, "quantize_1x128_dual"),
        (fw, "quantize_128x128_dual"),
    ]:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    return calls


def test_fused_layer_quantizes_h_in_the_swiglu_and_never_on_its_own(monkeypatch):
    """Forward: the weight's forms, one fused SwiGLU quantization, one GEMM (h is never formed and quantized
    apart). Backward: dY quantized once, the dgrad and wgrad GEMMs, one fused SwiGLU backward."""
    torch.manual_seed(0)
    gate_up, weight = inputs(200, 256, 256)
    calls = count_calls(monkeypatch)
    gate_up.requires_grad_()
    weight.requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_swiglu_linear(gate, up, weight)
    assert calls == ["quantize_128x128_dual", "swiglu_quantize", "fp8_gemm"]
    y.sum().backward()
    assert calls[3:] == ["quantize_1x128_dual", "fp8_gemm", "fp8_gemm", "swiglu_backward"]


def test_no_weight_gradient_skips_the_transposed_forms(monkeypatch):
    """A frozen weight: h^T is not quantized (the fused quantizer writes the 1x128 tiles only) and no wgrad runs."""
    torch.manual_seed(0)
    gate_up, weight = inputs(128, 256, 256)
    seen = []
    real = fs.swiglu_quantize
    monkeypatch.setattr(fs, "swiglu_quantize", lambda *a, **k: seen.append(k["transposed"]) or real(*a, **k))
    gate_up.requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    fp8_swiglu_linear(gate, up, weight).float().sum().backward()
    assert seen == [False] and gate_up.grad is not None


def test_swiglu_references():
    """The references (fp32 arithmetic) against autograd on silu(gate) * up in float64."""
    torch.manual_seed(0)
    gate, up, dh = (torch.randn(64, 256) * 3 for _ in range(3))
    q, s, qt, st = swiglu_quantize_reference(gate, up)
    h = (q.float().view(64, 2, 128) * s[..., None]).view(64, 256)
    assert rel_err(h, F.silu(gate) * up) < FP8_GEMM_RELATIVE_ERROR
    assert qt.shape == (256, 128) and st.shape == (256, 1)
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    (F.silu(g) * u).backward(dh.double())
    dgate, dup = swiglu_backward_reference(gate, up, dh)
    assert rel_err(dgate, g.grad) < 1e-6 and rel_err(dup, u.grad) < 1e-6


def test_errors_name_the_problem():
    gate = torch.randn(8, 200)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_swiglu_linear(gate, gate, torch.randn(16, 200))
    gate = torch.randn(8, 256)
    with pytest.raises(ValueError, match="one shape"):
        fp8_swiglu_linear(gate, torch.randn(8, 128), torch.randn(16, 256))
    with pytest.raises(ValueError, match=r"weight must be \(N, F\)"):
        fp8_swiglu_linear(gate, gate, torch.randn(16, 128))
    with pytest.raises(ValueError, match="a multiple of 128"):
        fp8_swiglu_linear(gate, gate, torch.randn(2, 100, 256), torch.tensor([4, 8]))


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m", [1, 300, 4096])
def test_swiglu_kernels_match_the_references_gpu(m, pow2):
    """Triton against the references. h is computed in fp32 by both, with different exp implementations (a few
    ulps apart): scales agree to 1e-6 (power-of-two scales: or, in at most 0.1% of the tiles, by exactly 2x, when the
    scale sat within those ulps of a power of two) and the codes, dequantized, are equal but for at most 0.1% that
    differ by one e4m3 step (a value that sat on a rounding boundary); the backward to bf16 rounding."""
    torch.manual_seed(0)
    gate_up, _ = inputs(m, 1536, 128, device="cuda")
    gate, up = (gate_up * 3).chunk(2, dim=-1)  # views: row stride 2F
    got = fs.swiglu_quantize(gate, up, pow2_scales=pow2)
    want = swiglu_quantize_reference(gate, up, pow2_scales=pow2)
    for (q, s), (q_ref, s_ref) in ((got[:2], want[:2]), (got[2:], want[2:])):
        assert q.shape == q_ref.shape and s.shape == s_ref.shape
        same = (s - s_ref).abs() <= 1e-6 * s_ref
        doubled = torch.zeros_like(same)
        if pow2:  # a scale a few ulps from a power of two may round up to either side: exactly 2x apart, rarely
            doubled = (s == 2 * s_ref) | (s_ref == 2 * s)
            assert doubled.float().mean() <= 1e-3
        assert (same | doubled).all()
        # codes of tiles with the same scale: equal but for one e4m3 step; in a doubled tile, the values the codes
        # stand for (code times scale) are
        flip = doubled.repeat_interleave(128, -1)
        a, b = q.float(), q_ref.float()
        a, b = (
            torch.where(flip, a * s.repeat_interleave(128, -1), a),
            torch.where(flip, b * s_ref.repeat_interleave(128, -1), b),
        )
        unit = torch.where(flip, torch.maximum(s, s_ref).repeat_interleave(128, -1), 1.0)  # (a subnormal step: 2^-9)
        differ = a != b
        assert differ.float().mean() <= 1e-3 + flip.float().mean()
        assert ((a - b).abs()[differ] <= b.abs()[differ] * 2**-3 + 2**-9 * unit[differ]).all()
    dh = torch.randn_like(gate)
    for got_g, want_g in zip(fs.swiglu_backward(gate, up, dh), swiglu_backward_reference(gate, up, dh)):
        assert got_g.dtype == torch.bfloat16
        assert ((got_g.float() - want_g.float()).abs() <= want_g.float().abs() * 2**-7 + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])
def test_fused_matches_the_unfused_layer_gpu(grouped):
    """As the CPU test, on the Triton and Gluon kernels, at the mini preset's sizes."""
    torch.manual_seed(0)
    m, f, n = (8192, 512, 1536) if grouped else (4096, 4096, 1536)
    gate_up, weight = inputs(m, f, n, experts=8 if grouped else None, device="cuda")
    group_ends = torch.arange(1, 9, device="cuda", dtype=torch.int32) * 896 if grouped else None
    if grouped:
        gate_up[int(group_ends[-1]) :] = 0
    dy = torch.randn(m, n, device="cuda").to(torch.bfloat16)
    fused, unfused = run(gate_up, weight, group_ends, dy, True), run(gate_up, weight, group_ends, dy, False)
    want = exact(gate_up, weight, group_ends, dy)
    for got, ref, exact_value in zip(fused, unfused, want):
        err, err_unfused = rel_err(got, exact_value), rel_err(ref, exact_value)
        assert err < FP8_GEMM_RELATIVE_ERROR and err < 1.1 * err_unfused + 1e-3, (err, err_unfused)
        assert rel_err(got, ref) < 0.5 * FP8_GEMM_RELATIVE_ERROR
