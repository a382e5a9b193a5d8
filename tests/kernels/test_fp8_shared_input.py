"""FP8 sibling layers as one GEMM (`fp8_shared_input`, `shares_input`): layers that read the same x against the
same layers called one by one (outputs, weight gradients, dX, the quantizer and GEMM calls), the checks and
fallbacks, and the stacked weights' cache. On CPU the FP8 kernels dispatch to their torch references."""

import pytest
import torch
import torch.nn as nn

from moetron.kernels.fp8_linear import FP8Linear, FP8WeightCache, fp8_shared_input, shares_input

BF16_U = 2.0**-8
TIGHT = 1e-5  # the same FP8 operands, only the fp32 accumulation order differs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def siblings(outs, in_features=256, dtype=torch.float32, pow2_scales=False):
    return [FP8Linear(in_features, n, bias=False, dtype=dtype, pow2_scales=pow2_scales) for n in outs]


def count_calls(monkeypatch, names):
    """Counts calls by name of the kernels the FP8 layers call (fp8_linear, fp8_grouped_linear; the weights'
    quantizers: fp8_weights)."""
    import moetron.kernels.fp8_linear as fl
    import moetron.kernels.fp8_weights as fw

    calls = []
    import moetron.kernels.fp8_grouped_linear as fg

    for name in names:
        modules = [fw] if name.startswith("quantize_128x128") else [m for m in (fl, fg) if hasattr(m, name)]
        for module in modules:
            fn = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    return calls


# gate/up (SwiGLU), MLA's q_a + kv_a (the last not a multiple of 128: the padded dgrad), GQA's q, k, v
@pytest.mark.parametrize("pow2_scales", [False, True])
@pytest.mark.parametrize("outs", [(256, 256), (256, 192), (256, 128, 128)])
def test_shared_input_equals_the_layers_one_by_one(monkeypatch, outs, pow2_scales):
    """Siblings run as one FP8 GEMM over their stacked weights: the same outputs and weight gradients as each
    layer alone (the same FP8 bytes and scales: no block spans two weights), dX the same sum up to fp32
    rounding; x quantized once and dY once, one GEMM each for y, dX and dW."""
    torch.manual_seed(0)
    layers = siblings(outs, pow2_scales=pow2_scales)
    assert shares_input(*layers)
    x = torch.randn(3, 70, 256)  # 210 tokens: not a multiple of 128
    dys = [torch.randn(3, 70, n) for n in outs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa = x.clone().requires_grad_()
        alone = [layer(xa) for layer in layers]
    sum(((y.float() * dy).sum() for y, dy in zip(alone, dys)), torch.zeros(())).backward()
    grads_alone = [layer.weight.grad.clone() for layer in layers]
    for layer in layers:
        layer.weight.grad = None
    calls = count_calls(monkeypatch, ["quantize_1x128_dual", "quantize_128x128_dual", "fp8_gemm"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xt = x.clone().requires_grad_()
        together = fp8_shared_input(xt, layers)
    # each W quantized into its slice of the joint forms, x once, one GEMM
    assert calls == ["quantize_128x128_dual"] * len(outs) + ["quantize_1x128_dual", "fp8_gemm"]
    sum(((y.float() * dy).sum() for y, dy in zip(together, dys)), torch.zeros(())).backward()
    assert calls[len(outs) + 2 :] == ["quantize_1x128_dual", "fp8_gemm", "fp8_gemm"]  # dY once, dX and dW one each
    for y, want in zip(together, alone):
        assert y.dtype == torch.bfloat16 and y.shape == want.shape
        assert rel_err(y, want) < 2 * BF16_U  # (bf16 outputs of fp32 sums that may differ in the last bits)
    for layer, want in zip(layers, grads_alone):
        assert layer.weight.grad.dtype == torch.float32 and rel_err(layer.weight.grad, want) < TIGHT
    assert rel_err(xt.grad, xa.grad) < TIGHT


def test_shared_input_checks_and_falls_back():
    """shares_input says no where one GEMM would differ or cannot run; FP8LinearFunction refuses such siblings
    with an error that says what to do."""
    assert not shares_input(nn.Linear(256, 256, bias=False), *siblings([256]))  # not FP8
    assert not shares_input(FP8Linear(256, 256, bias=True), *siblings([256]))  # a bias
    assert not shares_input(*siblings([192, 256]))  # 192 rows first: a block would span two weights
    assert not shares_input(*siblings([256], pow2_scales=True), *siblings([256]))
    assert not shares_input(*siblings([256]), *siblings([256], in_features=128))
    hooked = siblings([256, 256])
    hooked[1].register_forward_pre_hook(lambda module, args: None)  # (it would not run inside one GEMM)
    assert not shares_input(*hooked)
    assert shares_input(*siblings([256, 192]))
    x = torch.randn(8, 256)
    first, second = siblings([192, 256])
    with pytest.raises(ValueError, match="put it last"):
        fp8_shared_input(x, (first, second))
    with pytest.raises(ValueError, match="no bias"):
        fp8_shared_input(x, (FP8Linear(256, 256, bias=True), second))


def test_shared_input_cache_keeps_the_stack_while_every_weight_is_unchanged(monkeypatch):
    """A cache given to fp8_shared_input keeps the stacked weights' forms across calls, and makes them again
    when any one of the weights changes in place; results equal the uncached ones."""
    torch.manual_seed(0)
    layers = siblings((256, 128))
    cache = FP8WeightCache()
    x = torch.randn(130, 256, requires_grad=True)  # (dX wanted: the weights' W^T forms too, the dual quantizer)
    calls = count_calls(monkeypatch, ["quantize_128x128_dual"])
    first = fp8_shared_input(x, layers, cache)
    again = fp8_shared_input(x, layers, cache)
    assert calls == ["quantize_128x128_dual"] * 2  # (each weight into its slice of the joint forms, once)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with torch.no_grad():
        layers[1].weight.mul_(2.0)  # the version counter moves
    changed = fp8_shared_input(x, layers, cache)
    assert calls == ["quantize_128x128_dual"] * 4
    assert torch.equal(changed[0], first[0]) and not torch.equal(changed[1], first[1])
    assert all(torch.equal(a, b) for a, b in zip(changed, fp8_shared_input(x, layers)))


def test_shared_input_without_input_gradient_makes_no_transposed_weights(monkeypatch):
    """Under no_grad (evaluation) x needs no gradient, so no dgrad: the stacked weights are quantized into W's forms
    only (quantize_128x128, never the dual quantizer's W^T), and the outputs are those of a step with gradients."""
    torch.manual_seed(0)
    layers = siblings((256, 192))
    x = torch.randn(130, 256)
    with_grad = fp8_shared_input(x.clone().requires_grad_(), layers)
    calls = count_calls(monkeypatch, ["quantize_128x128", "quantize_128x128_dual"])
    with torch.no_grad():
        got = fp8_shared_input(x, layers)
    assert calls == ["quantize_128x128"] * 2
    assert all(torch.equal(a, b) for a, b in zip(got, with_grad))


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("outs", [(1536, 512), (768, 320)])  # SwiGLU gate + up; MLA q_a + kv_a (padded dgrad)
def test_shared_input_equals_the_layers_one_by_one_gpu(outs):
    """On the GPU kernels: the siblings as one GEMM give each layer's output and weight gradient, and dX, up to the
    GEMMs' bf16 output rounding (the one-by-one dX adds two rounded bf16 results)."""
    torch.manual_seed(0)
    layers = [layer.cuda() for layer in siblings(outs, in_features=1536)]
    x = torch.randn(4, 1000, 1536, device="cuda", dtype=torch.bfloat16)
    dys = [torch.randn(4, 1000, n, device="cuda", dtype=torch.bfloat16) for n in outs]
    results = []
    for together in (True, False):
        for layer in layers:
            layer.weight.grad = None
        xb = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ys = fp8_shared_input(xb, layers) if together else [layer(xb) for layer in layers]
        torch.autograd.backward(ys, dys)
        results.append((ys, xb.grad, [layer.weight.grad.clone() for layer in layers]))
    (ys, dx, dws), (ys_alone, dx_alone, dws_alone) = results
    for y, want in zip(ys, ys_alone):
        assert rel_err(y, want) < 2 * BF16_U
    for dw, want in zip(dws, dws_alone):
        assert rel_err(dw, want) < 1e-4
    assert rel_err(dx, dx_alone) < 2 * BF16_U


# ------------------------------------------------------------------------- experts' gate and up (grouped)
def grouped_siblings_run(x, gate, up, group_ends, dy, together, pow2_scales=False, autocast=False):
    """(y, dX, dgate, dup) of gate and up applied to x as sibling weights of one fp8_grouped_linear call
    (`together`) or one call per weight (outputs concatenated), backward from dy; under bf16 autocast on x's device
    if `autocast`. (Also used by tests/kernels/interpreted/test_fp8_layers.py.)"""
    from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear

    xs, g, u = x.clone().requires_grad_(), gate.clone().requires_grad_(), up.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        if together:
            y = fp8_grouped_linear(xs, g, group_ends, pow2_scales, None, None, u)
        else:
            y = torch.cat([fp8_grouped_linear(xs, w, group_ends, pow2_scales) for w in (g, u)], dim=-1)
    y.backward(dy)
    return y.detach(), xs.grad, g.grad, u.grad


@pytest.mark.parametrize("pow2_scales", [False, True])
def test_grouped_siblings_equal_the_weights_one_by_one(monkeypatch, pow2_scales):
    """The experts' gate and up as one grouped FP8 GEMM over their joint forms (fp8_grouped_linear's siblings): the
    outputs and both weight gradients of the two calls alone (the same FP8 bytes: F % 128 == 0), dX the same sum
    up to rounding; x and dY quantized once, one grouped GEMM for y and one for dX, one wgrad GEMM per weight,
    each weight quantized once into its slice of the joint forms."""
    torch.manual_seed(0)
    e, f, k = 3, 128, 256
    gate, up = (torch.randn(e, f, k) * k**-0.5 for _ in range(2))
    group_ends = torch.tensor([128, 128, 384])  # an empty group; rows past 384 give zeros
    x = torch.randn(400, k)
    x[384:] = 0
    dy = torch.randn(400, 2 * f)
    dy[384:] = 0

    def run(together):
        return grouped_siblings_run(x, gate, up, group_ends, dy, together, pow2_scales, autocast=True)

    calls = count_calls(
        monkeypatch, ["quantize_1x128_dual", "quantize_128x128_dual", "fp8_grouped_gemm", "fp8_grouped_gemm_wgrad"]
    )
    y, dx, d_gate, d_up = run(True)
    assert calls == [
        "quantize_128x128_dual", "quantize_128x128_dual", "quantize_1x128_dual", "fp8_grouped_gemm",
        "quantize_1x128_dual", "fp8_grouped_gemm", "fp8_grouped_gemm_wgrad", "fp8_grouped_gemm_wgrad",
    ]  # fmt: skip
    y_ref, dx_ref, d_gate_ref, d_up_ref = run(False)
    assert torch.equal(y, y_ref)
    assert rel_err(d_gate, d_gate_ref) < TIGHT and rel_err(d_up, d_up_ref) < TIGHT
    assert d_gate.is_contiguous() and d_up.is_contiguous()
    assert rel_err(dx, dx_ref) < 2 * BF16_U
    assert d_gate[1].abs().max() == 0  # the empty group's expert


def test_grouped_siblings_check_their_shapes():
    from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear

    x, ends = torch.randn(128, 256), torch.tensor([128, 128])
    with pytest.raises(ValueError, match="sibling weight 1"):
        fp8_grouped_linear(x, torch.randn(2, 128, 256), ends, False, None, None, torch.randn(3, 128, 256))
    with pytest.raises(ValueError, match="out_features=100"):
        fp8_grouped_linear(x, torch.randn(2, 128, 256), ends, False, None, None, torch.randn(2, 100, 256))


@pytest.mark.gpu
def test_grouped_siblings_equal_the_weights_one_by_one_gpu():
    """On the GPU kernels (Gluon grouped GEMM and wgrad, each wgrad reading its row block of dY^T with its own
    token-block-major scales), at the mini preset's expert sizes: 8 experts, 512 wide gate and up, 1536 in."""
    torch.manual_seed(0)
    e, f, k = 8, 512, 1536
    gate, up = (torch.randn(e, f, k, device="cuda") * k**-0.5 for _ in range(2))
    group_ends = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * 1024
    group_ends[2] = group_ends[1]  # an empty group
    x = torch.randn(8192, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8192, 2 * f, device="cuda", dtype=torch.bfloat16)
    y, dx, d_gate, d_up = grouped_siblings_run(x, gate, up, group_ends, dy, True, autocast=True)
    y_ref, dx_ref, d_gate_ref, d_up_ref = grouped_siblings_run(x, gate, up, group_ends, dy, False, autocast=True)
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(d_gate, d_gate_ref) < 1e-5 and rel_err(d_up, d_up_ref) < 1e-5
    assert rel_err(dx, dx_ref) < 2 * BF16_U
