"""RMSNorm fused into the FP8 projections that read it (`fp8_norm_linear`, moetron/kernels/fp8_norm.py): against
RMSNorm followed by the FP8 layer (siblings stacked or one weight), the work it does, its checks. On CPU the kernels
dispatch to their torch references; the GPU tests run the Triton kernels (interpreter tests:
tests/kernels/interpreted/test_fp8_norm.py)."""

import pytest
import torch

from moetron.kernels import fp8_norm as fn
from moetron.kernels.fp8_linear import FP8LinearFunction
from moetron.kernels.fp8_norm import fp8_norm_linear, rmsnorm_backward_reference, rmsnorm_quantize_reference
from moetron.model.layers import RMSNorm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def setup(m, d, outs, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    x = (torch.randn(m, d, device=device) * 3).to(dtype)
    norm = RMSNorm(d).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    weights = [torch.randn(n, d, device=device) * d**-0.5 for n in outs]
    dy = torch.randn(m, sum(outs), device=device).to(torch.bfloat16)
    return x, norm, weights, dy


def run(x, norm, weights, dy, fused: bool):
    """y, dx, dnorm, dWs of norm(x) @ [weights]^T under bf16 autocast, fused or as RMSNorm + FP8LinearFunction."""
    x = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    norm.weight.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        if fused:
            y = fp8_norm_linear(x, norm.weight, norm.eps, tuple(ws))
        else:
            y = FP8LinearFunction.apply(norm(x), ws[0], None, False, None, None, *ws[1:])
    y.backward(dy)
    return [y.detach(), x.grad, norm.weight.grad.clone(), *(w.grad for w in ws)]


@pytest.mark.parametrize("outs", [(256,), (256, 192)])  # one projection (q_b, kv_b); siblings (q_a + kv_a)
def test_fused_equals_norm_then_fp8_layer(outs):
    """With an fp32 x the fused layer does the unfused arithmetic: y, dx, the norm's and the weights' gradients
    agree to fp32 rounding (the norm's backward is one formula instead of autograd's steps)."""
    x, norm, weights, dy = setup(200, 256, outs)
    fused, unfused = run(x, norm, weights, dy, True), run(x, norm, weights, dy, False)
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.float32
    for got, want in zip(fused, unfused):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5


def test_fused_layer_quantizes_in_the_norm(monkeypatch):
    """Forward: the weights' forms (each into its slice of the joint forms), one fused norm + quantization, one GEMM. Backward: dY quantized once, dgrad
    and wgrad GEMMs, one norm backward."""
    import moetron.kernels.fp8_linear as fl
    import moetron.kernels.fp8_weights as fw

    calls = []
    for module, name in [(fn, "rmsnorm_quantize"), (fn, "rmsnorm_backward"), (fn, "fp8_gemm"), (fl, "fp8_gemm"),
                         (fl, "quantize_1x128_dual"), (fw, "quantize_128x128_dual")]:  # fmt: skip
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x, norm, weights, dy = setup(130, 256, (128, 64))
    run(x, norm, weights, dy, True)
    assert calls == [
        "quantize_128x128_dual", "quantize_128x128_dual", "rmsnorm_quantize", "fp8_gemm",
        "quantize_1x128_dual", "fp8_gemm", "fp8_gemm", "rmsnorm_backward",
    ]  # fmt: skip


def test_references_against_autograd():
    """The norm backward's formula against autograd through RMSNorm in float64."""
    x, norm, _, _ = setup(64, 256, (128,))
    dh = torch.randn(64, 256)
    _, _, _, _, rstd = rmsnorm_quantize_reference(x, norm.weight, norm.eps)
    dx, dw = rmsnorm_backward_reference(x, norm.weight, rstd, dh)
    xd, wd = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    (wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps)).backward(dh.double())
    assert rel_err(dx, xd.grad) < 1e-6 and rel_err(dw, wd.grad) < 1e-6


def test_errors_name_the_problem():
    x = torch.randn(4, 200)
    with pytest.raises(ValueError, match="multiple of 128"):
        fn.rmsnorm_quantize(x, torch.ones(200), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        fn.rmsnorm_quantize(torch.randn(4, 256), torch.ones(128), 1e-6)
    with pytest.raises(ValueError, match="share D"):
        fp8_norm_linear(torch.randn(4, 256), torch.ones(256), 1e-6, (torch.randn(128, 128),))
    with pytest.raises(ValueError, match="fp8 norm linear: D=200 must be a multiple of 128"):  # (before any weight
        fp8_norm_linear(x, torch.ones(200), 1e-6, (torch.randn(128, 200),))  # is quantized)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 300, 8192])
def test_norm_kernels_match_the_references_gpu(m, dtype):
    """Triton against the references: rstd within a few ulps (the GPU's rsqrt path), scales within 1e-6, codes equal
    but for at most 0.1% one e4m3 step apart (a value that sat on a rounding boundary); the backward to fp32's or
    bf16's rounding."""
    x, norm, _, _ = setup(m, 1536, (128,), device="cuda", dtype=dtype)
    got = fn.rmsnorm_quantize(x, norm.weight, 1e-6)
    want = rmsnorm_quantize_reference(x, norm.weight, 1e-6)
    assert ((got[4] - want[4]).abs() <= 1e-6 * want[4]).all()
    for (q, s), (q_ref, s_ref) in ((got[:2], want[:2]), (got[2:4], want[2:4])):
        assert q.shape == q_ref.shape and ((s - s_ref).abs() <= 2e-6 * s_ref).all()
        a, b = q.float(), q_ref.float()
        differ = a != b
        assert differ.float().mean() <= 1e-3 and ((a - b).abs()[differ] <= b.abs()[differ] * 2**-3 + 2**-9).all()
    dh = torch.randn(m, 1536, device="cuda").to(dtype)
    dx, dw = fn.rmsnorm_backward(x, norm.weight, want[4], dh)
    dx_ref, dw_ref = rmsnorm_backward_reference(x, norm.weight, want[4], dh)
    assert rel_err(dx, dx_ref) < (2**-8 if dtype == torch.bfloat16 else 1e-5) and rel_err(dw, dw_ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("outs", [(1536,), (768, 320)])  # q_b-like; MLA q_a + kv_a (padded dgrad)
def test_fused_equals_norm_then_fp8_layer_gpu(outs):
    """As the CPU test, on the Triton and Gluon kernels: fp32 x (the residual stream), 4 x 2048 tokens. The FP8
    bytes may differ where the kernels' rstd and torch's differ by an ulp at a rounding boundary: within a tenth
    of FP8's error."""
    x, norm, weights, dy = setup(8192, 1536, outs, device="cuda")
    fused, unfused = run(x, norm, weights, dy, True), run(x, norm, weights, dy, False)
    for got, want in zip(fused, unfused):
        assert rel_err(got, want) < 5e-3
