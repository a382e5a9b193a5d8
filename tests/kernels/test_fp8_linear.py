"""FP8Linear and fp8_grouped_linear: forward, dX and dW against high-precision linears within the error
bound of moetron/kernels/fp8_linear.py, and exactly the hand-composed FP8 arithmetic (quantize ->
dequantize -> fp64 matmul). On CPU the FP8 kernels dispatch to their torch references."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moetron.kernels.fp8 import quantize_1x128_reference, quantize_1x128_t_reference, quantize_128x128_reference
from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear
from moetron.kernels.fp8_linear import (
    FP8_GEMM_RELATIVE_ERROR,
    FP8_UNIT_ROUNDOFF,
    FP8Linear,
    FP8WeightCache,
    clear_weight_caches,
    fp8_linear,
)

u = FP8_UNIT_ROUNDOFF
# Normwise relative error of one FP8 GEMM with random-sign operands: <= sqrt(2/3) u = 0.051 (expected
# ~0.6 u = 0.037). Below 0.2 of it, the GEMM did not run in FP8.
BOUND, FLOOR = FP8_GEMM_RELATIVE_ERROR, 0.2 * FP8_GEMM_RELATIVE_ERROR
BF16_U = 2.0**-8
# FP8 vs its hand-composed fp64 arithmetic: only the fp32 accumulation differs.
TIGHT = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequant_rows(q, s):
    """1x128 tiles: q (R, C) e4m3, s (R, C/128) -> fp64 (R, C)."""
    return q.double() * s.double().repeat_interleave(128, dim=1)[:, : q.shape[1]]


def dequant_blocks(q, s):
    """128x128 blocks: q (N, K), s (ceil(N/128), K/128) -> fp64 (N, K)."""
    return q.double() * s.double().repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)


def pair(in_features, out_features, bias, pow2_scales=False, dtype=torch.float32):
    """An nn.Linear and an FP8Linear holding the same parameters."""
    ref = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    if bias:
        nn.init.normal_(ref.bias)  # large enough that adding it wrong would show
    fp8 = FP8Linear(in_features, out_features, bias=bias, dtype=dtype, pow2_scales=pow2_scales)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def run(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


# (leading dims of x, in_features, out_features, bias): tokens 200, 200, 105, 132 (none a multiple
# of 128); out_features 144 and 96 take the padded dgrad path.
SHAPES = [
    ((200,), 256, 384, False),
    ((2, 100), 128, 256, True),
    ((3, 5, 7), 384, 144, True),
    ((4, 33), 256, 96, False),
]


@pytest.mark.parametrize("pow2_scales", [False, True])
@pytest.mark.parametrize("lead,in_features,out_features,bias", SHAPES)
def test_fp8_linear_matches_nn_linear_within_bound(lead, in_features, out_features, bias, pow2_scales):
    ref, fp8 = pair(in_features, out_features, bias, pow2_scales)
    x = torch.randn(*lead, in_features)
    dy = torch.randn(*lead, out_features)
    y_ref, dx_ref = run(ref, x, dy)
    y, dx = run(fp8, x, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float32 and dx.dtype == torch.float32

    bias_ref = ref.bias.detach() if bias else 0.0
    for name, got, want in [
        ("y", y - bias_ref, y_ref - bias_ref),  # the GEMM's part: the bias is added exactly in fp32
        ("dX", dx, dx_ref),
        ("dW", fp8.weight.grad, ref.weight.grad),
    ]:
        err = rel_err(got, want)
        assert FLOOR < err < BOUND, f"{name}: normwise relative error {err:.4f} outside ({FLOOR:.4f}, {BOUND:.4f})"
    if bias:
        torch.testing.assert_close(fp8.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-5)

    # Elementwise, for any data: |y8 - y| <= (2u + u^2) sum_k |x_k| |w_k| (+ subnormal and fp32 terms).
    x2, w = x.reshape(-1, in_features).double(), ref.weight.detach().double()
    envelope = x2.abs() @ w.abs().t()  # (M, N)
    slack = 1e-5 * x2.abs().max() * w.abs().max() * in_features
    diff = ((y - bias_ref).reshape(-1, out_features).double() - x2 @ w.t()).abs()
    assert bool((diff <= (2 * u + u * u) * envelope + slack).all())


@pytest.mark.parametrize("pow2_scales", [False, True])
@pytest.mark.parametrize("lead,in_features,out_features,bias", SHAPES)
def test_fp8_linear_equals_hand_composed_fp8(lead, in_features, out_features, bias, pow2_scales):
    """y, dX, dW are the fp64 products of exactly these quantized operands: x in 1x128 tiles, W in
    128x128 blocks, dY in 1x128 tiles (dgrad), dY^T and X^T in 1x128 tiles along the tokens (wgrad)."""
    _, fp8 = pair(in_features, out_features, bias, pow2_scales)
    x = torch.randn(*lead, in_features)
    dy = torch.randn(*lead, out_features)
    y, dx = run(fp8, x, dy)

    x2, dy2, w = x.reshape(-1, in_features), dy.reshape(-1, out_features), fp8.weight.detach()
    tokens = x2.shape[0]
    w_q = dequant_blocks(*quantize_128x128_reference(w, pow2_scales=pow2_scales))  # (N, K)
    y_want = dequant_rows(*quantize_1x128_reference(x2, pow2_scales=pow2_scales)) @ w_q.t()
    if bias:
        y_want = y_want + fp8.bias.detach().double()
    # dY quantized in 1x128 tiles along N; with N not a multiple of 128 the last tile is zero-padded.
    n_pad = -(-out_features // 128) * 128
    dy_padded = F.pad(dy2, (0, n_pad - out_features))
    dx_want = dequant_rows(*quantize_1x128_reference(dy_padded, pow2_scales=pow2_scales))[:, :out_features] @ w_q
    dyt = dequant_rows(*quantize_1x128_t_reference(dy2, pow2_scales=pow2_scales))[:, :tokens]  # (N, M)
    xt = dequant_rows(*quantize_1x128_t_reference(x2, pow2_scales=pow2_scales))[:, :tokens]  # (K, M)
    dw_want = dyt @ xt.t()

    for name, got, want in [
        ("y", y.reshape(-1, out_features), y_want),
        ("dX", dx.reshape(-1, in_features), dx_want),
        ("dW", fp8.weight.grad, dw_want),
    ]:
        assert rel_err(got, want) < TIGHT, name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_fp8_linear_under_autocast_returns_the_autocast_dtype():
    """As nn.Linear under autocast: fp32 input and weights in, bf16 out; gradients in the dtypes of x and W."""
    ref, fp8 = pair(256, 128, bias=True)
    x = torch.randn(3, 50, 256)
    dy = torch.randn(3, 50, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac_ref = ref(x)
        y, dx = run(fp8, x, dy.bfloat16())
    assert y.dtype == y_ac_ref.dtype == torch.bfloat16
    assert dx.dtype == torch.float32 and fp8.weight.grad.dtype == fp8.bias.grad.dtype == torch.float32

    y_ref, dx_ref = run(ref, x, dy.bfloat16().float())  # the fp32 truth
    bound = (BOUND**2 + BF16_U**2) ** 0.5
    assert rel_err(y.float() - ref.bias.detach(), y_ref - ref.bias.detach()) < bound
    assert FLOOR < rel_err(dx, dx_ref) < bound
    assert FLOOR < rel_err(fp8.weight.grad, ref.weight.grad) < bound


def test_fp8_linear_bf16_weights_and_inputs():
    ref, fp8 = pair(128, 256, bias=False, dtype=torch.bfloat16)
    x = torch.randn(2, 70, 128, dtype=torch.bfloat16)
    dy = torch.randn(2, 70, 256, dtype=torch.bfloat16)
    y, dx = run(fp8, x, dy)
    assert y.dtype == dx.dtype == fp8.weight.grad.dtype == torch.bfloat16
    ref32 = nn.Linear(128, 256, bias=False)
    ref32.load_state_dict(ref.state_dict())
    y_ref, dx_ref = run(ref32, x.float(), dy.float())
    bound = (BOUND**2 + BF16_U**2) ** 0.5
    for got, want in [(y, y_ref), (dx, dx_ref), (fp8.weight.grad, ref32.weight.grad)]:
        assert FLOOR < rel_err(got, want) < bound


def test_fp8_linear_non_contiguous_input_equals_contiguous():
    _, fp8 = pair(256, 128, bias=True)
    base = torch.randn(256, 2, 90)
    x_strided = base.permute(1, 2, 0)  # (2, 90, 256), not contiguous
    assert not x_strided.is_contiguous()
    dy = torch.randn(2, 90, 128).transpose(0, 1).contiguous().transpose(0, 1)  # a strided gradient too
    y1, dx1 = run(fp8, x_strided, dy)
    grads1 = (fp8.weight.grad.clone(), fp8.bias.grad.clone())
    fp8.zero_grad()
    y2, dx2 = run(fp8, x_strided.contiguous(), dy.contiguous())
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    assert torch.equal(grads1[0], fp8.weight.grad) and torch.equal(grads1[1], fp8.bias.grad)


def test_fp8_linear_module_is_an_nn_linear():
    ref, fp8 = pair(128, 64, bias=True)
    assert isinstance(fp8, nn.Linear) and fp8.pow2_scales is False
    assert {k: v.shape for k, v in fp8.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert FP8Linear(128, 64, pow2_scales=True).pow2_scales is True
    with torch.device("meta"):
        assert FP8Linear(256, 128).weight.is_meta
    with pytest.raises(ValueError, match=r"in_features=96 must be a multiple of 128 \(nearest valid: 128\)"):
        FP8Linear(96, 128)
    with pytest.raises(ValueError, match=r"in_features=200 must be a multiple of 128"):
        fp8_linear(torch.randn(4, 200), torch.randn(128, 200))


def test_fp8_linear_weight_without_grad_skips_the_wgrad():
    _, fp8 = pair(128, 128, bias=False)
    fp8.weight.requires_grad_(False)
    y, dx = run(fp8, torch.randn(40, 128), torch.randn(40, 128))
    assert fp8.weight.grad is None and dx is not None


# --------------------------------------------------------------------------------------- grouped
def padded_groups(counts, extra_rows=0):
    """Groups of `counts` real rows each starting at a multiple of 128 -> (group_ends (int32), real-row mask,
    group (start, end) bounds incl. padding), with `extra_rows` unused rows at the end."""
    ends, bounds, start = [], [], 0
    mask = []
    for c in counts:
        padded = -(-c // 128) * 128
        mask += [True] * c + [False] * (padded - c)
        bounds.append((start, start + padded))
        start += padded
        ends.append(start)
    mask += [False] * extra_rows
    return torch.tensor(ends, dtype=torch.int32), torch.tensor(mask), bounds


@pytest.mark.parametrize("pow2_scales", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(256, 128), (128, 256)])
def test_fp8_grouped_linear_equals_per_expert_fp8_linear(out_features, in_features, pow2_scales):
    counts = [100, 0, 256, 7, 0]  # empty groups, partial and full 128-row tiles
    group_ends, real, bounds = padded_groups(counts, extra_rows=40)
    rows = real.numel()
    x = torch.randn(rows, in_features) * real[:, None]  # padding rows are zeros, as the MoE dispatch makes them
    dy = torch.randn(rows, out_features) * real[:, None]
    weight = torch.randn(len(counts), out_features, in_features) * 0.05

    xg = x.clone().requires_grad_()
    wg = weight.clone().requires_grad_()
    y = fp8_grouped_linear(xg, wg, group_ends, pow2_scales)
    y.backward(dy)
    assert y.dtype == xg.grad.dtype == wg.grad.dtype == torch.float32

    # The same rows expert by expert through FP8Linear: identical quantization, so equal up to fp32 sums.
    for e, (start, end) in enumerate(bounds):
        if start == end:
            assert torch.equal(wg.grad[e], torch.zeros_like(wg.grad[e]))  # empty group: zero gradient
            continue
        xe = x[start:end].clone().requires_grad_()
        we = weight[e].clone().requires_grad_()
        ye = fp8_linear(xe, we, None, pow2_scales)
        ye.backward(dy[start:end])
        assert rel_err(y[start:end], ye) < TIGHT
        assert rel_err(xg.grad[start:end], xe.grad) < TIGHT
        assert rel_err(wg.grad[e], we.grad) < TIGHT
        # and against the high-precision linear on the real rows
        xr = x[start:end][real[start:end]].clone().requires_grad_()
        wr = weight[e].clone().requires_grad_()
        yr = F.linear(xr, wr)
        yr.backward(dy[start:end][real[start:end]])
        assert rel_err(y[start:end][real[start:end]], yr) < BOUND
        assert rel_err(xg.grad[start:end][real[start:end]], xr.grad) < BOUND
        assert rel_err(wg.grad[e], wr.grad) < BOUND
    tail = slice(group_ends[-1].item(), rows)  # rows past the last group: zero output, zero gradient
    assert torch.equal(y[tail], torch.zeros_like(y[tail])) and torch.equal(xg.grad[tail], torch.zeros_like(x[tail]))


def test_fp8_grouped_linear_autocast_and_errors():
    group_ends, real, _ = padded_groups([30, 130])
    x = torch.randn(real.numel(), 128) * real[:, None]
    weight = (torch.randn(2, 128, 128) * 0.05).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_grouped_linear(x, weight, group_ends)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match=r"out_features=96 .* must be a multiple of 128"):
        fp8_grouped_linear(x, torch.randn(2, 96, 128), group_ends)
    with pytest.raises(ValueError, match=r"in_features=64 .* must be a multiple of 128"):
        fp8_grouped_linear(torch.randn(10, 64), torch.randn(2, 128, 64), group_ends)
    bad = torch.tensor([30, 160], dtype=torch.int32)  # the second group starts at row 30
    with pytest.raises(ValueError, match=r"must start at a multiple of 128"):
        fp8_grouped_linear(torch.randn(160, 128), weight, bad).sum().backward()


def spy_quantizers(monkeypatch):
    """Counts the quantizer calls of moetron.kernels.fp8_linear (activations) and fp8_weights (weights) by name."""
    import moetron.kernels.fp8_linear as fl
    import moetron.kernels.fp8_weights as fw

    calls = []
    for module, name in (
        (fl, "quantize_1x128"),
        (fl, "quantize_1x128_t"),
        (fl, "quantize_1x128_dual"),
        (fw, "quantize_128x128"),
        (fw, "quantize_128x128_dual"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    return calls


def activation_forms(rows: bool, transposed: bool) -> list[str]:
    """The quantizer calls that make an activation's 1x128 forms: both from the dual one when both are needed."""
    if rows and transposed:
        return ["quantize_1x128_dual"]
    return ["quantize_1x128"] * rows + ["quantize_1x128_t"] * transposed


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fp8_linear_quantizes_only_the_forms_it_needs(monkeypatch, weight_grad, input_grad):
    """x's and dY's transposed forms are made only when the weight needs a gradient, dY's rows only when x
    does, both in one dual call when both are needed; the weight is quantized once per step, in the forward,
    with its transpose only when x needs a gradient (the backward reuses it)."""
    if not (weight_grad or input_grad):
        pytest.skip("nothing to differentiate")
    calls = spy_quantizers(monkeypatch)
    _, fp8 = pair(256, 144, bias=False)
    fp8.weight.requires_grad_(weight_grad)
    weight_form = "quantize_128x128_dual" if input_grad else "quantize_128x128"
    forward = [weight_form] + activation_forms(True, weight_grad)
    backward = activation_forms(input_grad, weight_grad)
    x = torch.randn(70, 256).requires_grad_(input_grad)
    fp8(x).backward(torch.randn(70, 144))
    assert calls == forward + backward
    calls.clear()
    group_ends, real, _ = padded_groups([30, 130])
    x = (torch.randn(real.numel(), 128) * real[:, None]).requires_grad_(input_grad)
    weight = (torch.randn(2, 128, 128) * 0.05).requires_grad_(weight_grad)
    fp8_grouped_linear(x, weight, group_ends).sum().backward()
    assert calls == forward + backward


def test_weight_cache_quantizes_a_weight_once_per_version(monkeypatch):
    """With cache_weights, two micro-batches and a checkpointed recomputation quantize the weight once and
    give the uncached layer's outputs and gradients bit for bit; an in-place update (as the optimizer's)
    makes the next forward quantize again, and clear_weight_caches empties the cache."""
    calls = spy_quantizers(monkeypatch)
    _, plain = pair(256, 144, bias=True)
    cached = FP8Linear(256, 144, bias=True, cache_weights=True)
    cached.load_state_dict(plain.state_dict())
    xs = [torch.randn(70, 256, requires_grad=True) for _ in range(2)]
    results = []
    for layer in (plain, cached):
        calls.clear()
        outs = []
        for x in xs:
            x.grad = None
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)  # forward runs twice
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), x.grad.clone()))
        results.append((outs, layer.weight.grad.clone(), layer.bias.grad.clone(), calls.count("quantize_128x128_dual")))
        layer.weight.grad = layer.bias.grad = None
    (outs_plain, gw_plain, gb_plain, n_plain), (outs_cached, gw_cached, gb_cached, n_cached) = results
    assert (n_plain, n_cached) == (4, 1)  # 2 micro-batches x (forward + recomputation), against once
    for (y0, gx0), (y1, gx1) in zip(outs_plain, outs_cached):
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert torch.equal(gw_plain, gw_cached) and torch.equal(gb_plain, gb_cached)

    calls.clear()
    with torch.no_grad():
        cached.weight.mul_(0.5)  # a new version of the weight
    y = cached(xs[0])
    assert calls.count("quantize_128x128_dual") == 1
    plain.load_state_dict(cached.state_dict())
    assert torch.equal(y, plain(xs[0]))  # the new weight's forms, not the stale ones
    clear_weight_caches(nn.Sequential(cached))
    calls.clear()
    cached(xs[0])
    assert calls.count("quantize_128x128_dual") == 1


def test_grouped_weight_cache_quantizes_once():
    group_ends, real, _ = padded_groups([30, 130])
    weight = (torch.randn(2, 128, 128) * 0.05).requires_grad_(True)
    cache = FP8WeightCache()
    x = torch.randn(real.numel(), 128) * real[:, None]
    first = fp8_grouped_linear(x, weight, group_ends, cache=cache)
    forms = cache.forms(weight, True, False, None)
    again = fp8_grouped_linear(x, weight, group_ends, cache=cache)
    assert cache.forms(weight, True, False, None)[0] is forms[0]  # not made again
    assert torch.equal(first, again) and torch.equal(first, fp8_grouped_linear(x, weight, group_ends))


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("lead,in_features,out_features,bias", SHAPES)
def test_fp8_linear_triton_matches_reference_gpu(lead, in_features, out_features, bias):
    """On the GPU (Triton kernels) FP8Linear equals the torch-reference composition up to accumulation
    order and bf16 output rounding."""
    _, fp8 = pair(in_features, out_features, bias)
    fp8 = fp8.cuda()
    x = torch.randn(*lead, in_features, device="cuda")
    dy = torch.randn(*lead, out_features, device="cuda", dtype=torch.bfloat16)
    results = {}
    for backend in (None, "torch"):
        xb = x.clone().requires_grad_()
        fp8.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fp8_linear(xb, fp8.weight, fp8.bias, False, backend)
        y.backward(dy)
        results[backend] = (y, xb.grad, fp8.weight.grad.clone())
    for got, want in zip(results[None], results["torch"]):
        assert rel_err(got, want) < 4 * BF16_U


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_dual_quantizer_gives_the_same_bits_gpu(monkeypatch, dtype):
    """FP8Linear takes both 1x128 forms of x and dY from the one-launch dual quantizer; the output and both
    gradients are bit for bit those of the two separate quantizers (patched in for the dual one)."""
    import moetron.kernels.fp8_linear as fl

    def separate(t, **kw):
        return (*fl.quantize_1x128(t, **kw), *fl.quantize_1x128_t(t, **kw))

    fp8 = fl.FP8Linear(512, 384, bias=False, device="cuda", dtype=dtype)
    x = torch.randn(1000, 512, device="cuda", dtype=dtype)
    dy = torch.randn(1000, 384, device="cuda", dtype=dtype)
    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(fl, "quantize_1x128_dual", separate)
        xb = x.clone().requires_grad_()
        fp8.zero_grad()
        y = fp8(xb)
        y.backward(dy)
        results.append((y, xb.grad, fp8.weight.grad.clone()))
    for got, want in zip(*results):
        assert torch.equal(got, want)
