"""A gated FFN's down projection in FP8 that reads FP8 straight from the SwiGLU: y = (silu(gate) * up) W^T.

In an FP8 FFN the SwiGLU's output h = silu(gate) * up exists only to be quantized: the down projection's
forward GEMM reads h in 1x128 tiles, its weight gradient reads h^T in tiles along the tokens. Unfused, h
makes a round trip through memory in bf16 (silu and the product write it, the quantizer reads it back) and
costs three launches (silu, product, quantizer) before the GEMM; DeepSeek-V3 (report section 3.3) quantizes
it in the SwiGLU and, for the backward, keeps the SwiGLU's input and recomputes what it needs. So does
`fp8_swiglu_linear` here:

    forward   h's FP8 forms = swiglu_quantize(gate, up)      one kernel: loads gate and up, writes FP8
              y = fp8_gemm(h, W)                           (dense, or grouped per expert)
    backward  dh, dW = the FP8 linear backward (fp8_linear.fp8_linear_backward), dW from the saved h^T forms
              dgate, dup = swiglu_backward(gate, up, dh)  one kernel, in fp32

Saved for the backward: gate and up (which the unfused silu and product save too) and h^T in FP8 (which the
unfused FP8 layer saves); h in bf16 is never stored. Semantics: h is computed in fp32 and quantized without
the bf16 rounding the unfused path puts in between, so its FP8 bytes can differ from the unfused layer's in
the last e4m3 place where that rounding crossed a rounding boundary (tests: the two agree within FP8's error).

`swiglu_quantize` and `swiglu_backward` dispatch as fp8.py's functions do (Triton for CUDA tensors with FP8
support and under TRITON_INTERPRET=1, the torch reference otherwise); the kernels are in fp8_swiglu_triton.py.
"""

from __future__ import annotations

import torch

from moetron.kernels.fp8 import (
    SCALE_BLOCK,
    _pick,
    _reference,
    fp8_gemm,
    fp8_grouped_gemm,
    quantize_1x128_dual_reference,
    quantize_1x128_reference,
)
from moetron.kernels.fp8_linear import _output_dtype, fp8_linear_backward
from moetron.kernels.fp8_weights import FP8WeightCache, weight_forms
from moetron.kernels.ops import dispatch_visible

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------- the two kernels
def swiglu_quantize(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    transposed: bool = True,
    pow2_scales: bool = False,
    backend: str | None = None,
):
    """gate, up (M, F), F % 128 == 0 -> (q, s, qt, st) of h = silu(gate) * up computed in fp32: q, s =
    quantize_1x128(h) and, with `transposed`, qt, st = quantize_1x128_t(h) (else None, None)."""
    _check_pair("swiglu_quantize", gate, up)
    if _pick(backend, gate) == "triton":
        from moetron.kernels.fp8_swiglu_triton import swiglu_quantize_triton

        return swiglu_quantize_triton(gate, up, pow2_scales, transposed)
    return swiglu_quantize_reference(gate, up, transposed=transposed, pow2_scales=pow2_scales)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, *, backend: str | None = None):
    """(dgate, dup) of h = silu(gate) * up given dh, all (M, F), computed in fp32 and returned in gate's and
    up's dtypes: dup = dh * silu(gate), dgate = dh * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate)."""
    _check_pair("swiglu_backward", gate, up)
    if dh.shape != gate.shape:
        raise ValueError(f"swiglu_backward: dh{tuple(dh.shape)} must have gate's shape {tuple(gate.shape)}")
    if _pick(backend, gate) == "triton":
        from moetron.kernels.fp8_swiglu_triton import swiglu_backward_triton

        return swiglu_backward_triton(gate, up, dh)
    return swiglu_backward_reference(gate, up, dh)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up in fp32."""
    g = gate.float()
    return g * torch.sigmoid(g) * up.float()


@_reference
def swiglu_quantize_reference(gate: torch.Tensor, up: torch.Tensor, *, transposed=True, pow2_scales=False):
    _check_pair("swiglu_quantize", gate, up)
    h = swiglu_reference(gate, up)
    if transposed:
        return quantize_1x128_dual_reference(h, pow2_scales=pow2_scales)
    return (*quantize_1x128_reference(h, pow2_scales=pow2_scales), None, None)


@_reference
def swiglu_backward_reference(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    g, u, d = gate.float(), up.float(), dh.float()
    s = torch.sigmoid(g)
    return (d * u * s * (1.0 + g * (1.0 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


# ------------------------------------------------------------------------------------- the layer
def _swiglu_linear_forward(
    gate: torch.Tensor,
    up: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    group_ends: torch.Tensor | None,
    out_dtype: torch.dtype,
    save_h: bool,
    pow2_scales: bool,
    backend: str | None,
) -> list[torch.Tensor]:
    """FP8SwiGLULinearFunction's forward work: [y (M, N), and if `save_h` h^T's 1x128 tiles along the tokens and
    their scales]. A custom op under dispatch modes (moetron.kernels.ops), so selective checkpointing keeps its
    outputs."""
    qh, sh, qht, sht = swiglu_quantize(gate, up, transposed=save_h, pow2_scales=pow2_scales, backend=backend)
    if group_ends is None:
        y = fp8_gemm(qh, sh, qw, sw, out_dtype=out_dtype, backend=backend)
    else:
        y = fp8_grouped_gemm(qh, sh, qw, sw, group_ends, out_dtype=out_dtype, backend=backend)
    return [y, *((qht, sht) if save_h else ())]


_swiglu_linear_forward = dispatch_visible("fp8_swiglu_linear_forward", _swiglu_linear_forward)


class FP8SwiGLULinearFunction(torch.autograd.Function):
    """y = (silu(gate) * up) @ weight^T with the SwiGLU fused into the FP8 quantization (module docstring).

    forward(gate (..., F), up (..., F), weight, group_ends, pow2_scales, backend, cache) -> (..., N): dense with
    weight (N, F) and group_ends None; per expert with weight (E, N, F), gate and up (M, F) rows sorted by expert,
    group_ends (E,) cumulative row counts, every group starting at a multiple of 128 (fp8_grouped_linear's
    contract). F % 128 == 0 (grouped: N too). The output is in the autocast dtype under autocast, else gate's
    dtype; the gradients in the dtypes of gate, up and weight.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, group_ends=None, pow2_scales=False, backend=None, cache=None):
        _check_swiglu_linear(gate, up, weight, group_ends)
        f = gate.shape[-1]
        g2, u2 = gate.reshape(-1, f), up.reshape(-1, f)  # (M, F); views where the layout allows
        need_act, need_w = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        qw, sw, qwt, swt = weight_forms(weight, need_act, pow2_scales, backend, cache)
        y, *h_forms = _swiglu_linear_forward(
            g2, u2, qw, sw, group_ends, _output_dtype(gate), need_w, pow2_scales, backend
        )
        kept = (g2, u2) if need_act else (None, None)
        ctx.save_for_backward(*kept, *(h_forms or (None, None)), qwt, swt, group_ends)
        ctx.pow2_scales, ctx.backend, ctx.w_dtype, ctx.shape = pow2_scales, backend, weight.dtype, gate.shape
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        g2, u2, qht, sht, qwt, swt, group_ends = ctx.saved_tensors
        need_act, need_w = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        dh, grad_w = fp8_linear_backward(
            dy, qht, sht, qwt, swt, group_ends, need_act, need_w, g2.dtype if need_act else dy.dtype,
            ctx.w_dtype, ctx.pow2_scales, ctx.backend,
        )  # fmt: skip
        grad_gate = grad_up = None
        if need_act:
            grad_gate, grad_up = swiglu_backward(g2, u2, dh, backend=ctx.backend)
            grad_gate, grad_up = grad_gate.view(ctx.shape), grad_up.view(ctx.shape)
        return grad_gate, grad_up, grad_w, None, None, None, None


def fp8_swiglu_linear(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    group_ends: torch.Tensor | None = None,
    pow2_scales: bool = False,
    backend: str | None = None,
    cache: FP8WeightCache | None = None,
) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T in FP8 with the SwiGLU fused into the quantization (FP8SwiGLULinearFunction):
    a dense down projection (weight (N, F)), or the experts' (weight (E, N, F) with group_ends). `cache` keeps the
    weight's FP8 forms between calls (FP8WeightCache)."""
    return FP8SwiGLULinearFunction.apply(gate, up, weight, group_ends, pow2_scales, backend, cache)


# ------------------------------------------------------------------------------------------ checks
def _check_pair(name: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dim() != 2 or gate.shape != up.shape:
        raise ValueError(f"{name}: gate and up must be 2-D of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype not in _FLOATS or up.dtype not in _FLOATS:
        raise ValueError(f"{name}: takes bf16, fp16 or fp32 gate and up, got {gate.dtype} and {up.dtype}")
    if gate.shape[1] % SCALE_BLOCK:
        raise ValueError(f"{name}: the hidden size F={gate.shape[1]} must be a multiple of {SCALE_BLOCK}")


def _check_swiglu_linear(gate, up, weight, group_ends) -> None:
    name = "fp8_swiglu_linear"
    if gate.shape != up.shape or gate.dim() < 2:
        raise ValueError(f"{name}: gate{tuple(gate.shape)} and up{tuple(up.shape)} must have one shape (..., F)")
    f = gate.shape[-1]
    want = 2 if group_ends is None else 3
    if weight.dim() != want or weight.shape[-1] != f:
        form = "(N, F)" if group_ends is None else "(E, N, F) with group_ends"
        raise ValueError(f"{name}: weight must be {form} with F={f} (gate's last dim), got {tuple(weight.shape)}")
    if f % SCALE_BLOCK:
        raise ValueError(f"{name}: the hidden size F={f} must be a multiple of {SCALE_BLOCK}")
    if group_ends is not None and (gate.dim() != 2 or weight.shape[1] % SCALE_BLOCK):
        raise ValueError(
            f"{name}: per expert, gate and up must be (M, F) and the weight's N={weight.shape[1]} a multiple of "
            f"{SCALE_BLOCK}; got gate{tuple(gate.shape)}"
        )


__all__ = [
    "FP8SwiGLULinearFunction",
    "fp8_swiglu_linear",
    "swiglu_backward",
    "swiglu_backward_reference",
    "swiglu_quantize",
    "swiglu_quantize_reference",
    "swiglu_reference",
]
