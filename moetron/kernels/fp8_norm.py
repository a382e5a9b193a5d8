"""RMSNorm fused into the FP8 quantization of the projections that read its output: y = rmsnorm(x) W^T.

A pre-norm block hands norm(x) to its projections (the attention's q/k/v or MLA's q_a and kv_a, a dense FFN's
gate and up), and MLA hands its latents' norms to q_b and kv_b. With FP8 layers that output exists only to be
quantized: unfused, the norm makes several elementwise passes (in fp32 when the residual stream is fp32, as under
autocast with fp32 master weights) and writes it, and the projection's quantizer reads it back. Here (DeepSeek-V3,
report section 3.3, quantizes in the producing operator) two kernels produce the projection's FP8 input directly:

    forward   rstd = 1 / sqrt(mean(x^2) + eps) per row                     (one read of x)
              h = x * rstd * w quantized into 1x128 tiles and h^T's tiles  (a second read; h never stored)
              y = fp8_gemm(h, W)                                           (sibling weights stacked: one GEMM)
    backward  dh, dW = the FP8 linear backward (fp8_linear.fp8_linear_backward)
              dx, dw = rmsnorm_backward(x, w, rstd, dh)                    (one kernel, fp32 arithmetic)

Saved for the backward: x and rstd (which the unfused norm's autograd keeps in some form too) and h^T in FP8
(which the unfused FP8 layer keeps). Semantics: h is computed in fp32 and quantized; the unfused path rounds the
normalized x to x's dtype before multiplying by w (a no-op for fp32 x), so for bf16 x the FP8 codes can differ in
the last place.

`rmsnorm_quantize` and `rmsnorm_backward` dispatch as fp8.py's functions do (Triton for CUDA tensors with FP8
support and under TRITON_INTERPRET=1, the torch reference otherwise); the kernels are in fp8_norm_triton.py.
"""

from __future__ import annotations

import torch

from moetron.kernels.fp8 import (
    SCALE_BLOCK,
    _pick,
    _reference,
    fp8_gemm,
    quantize_1x128_dual_reference,
    quantize_1x128_reference,
)
from moetron.kernels.fp8_linear import _check_siblings, _output_dtype, fp8_linear_backward
from moetron.kernels.fp8_weights import FP8WeightCache, weight_forms
from moetron.kernels.ops import dispatch_visible

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------- the kernels
def rmsnorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    transposed: bool = True,
    pow2_scales: bool = False,
    backend: str | None = None,
):
    """x (M, D), weight (D,), D % 128 == 0 -> (q, s, qt, st, rstd): h = x * rstd * weight in fp32 with rstd (M,) =
    1 / sqrt(mean(x^2) + eps), quantized as quantize_1x128_dual(h) (qt, st None without `transposed`)."""
    _check_norm("rmsnorm_quantize", x, weight)
    if _pick(backend, x) == "triton":
        from moetron.kernels.fp8_norm_triton import rmsnorm_quantize_triton

        return rmsnorm_quantize_triton(x, weight, eps, pow2_scales, transposed)
    return rmsnorm_quantize_reference(x, weight, eps, transposed=transposed, pow2_scales=pow2_scales)


def rmsnorm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor, *, backend=None):
    """(dx (M, D) in x's dtype, dweight (D,) in weight's dtype) of h = x * rstd * weight given dh, in fp32:
    dx = rstd * (g - xhat * mean(g * xhat)) with g = dh * weight and xhat = x * rstd; dweight = sum over rows of
    dh * xhat."""
    _check_norm("rmsnorm_backward", x, weight)
    if dh.shape != x.shape or rstd.shape != x.shape[:1]:
        raise ValueError(
            f"rmsnorm_backward: dh{tuple(dh.shape)} and rstd{tuple(rstd.shape)} must fit x{tuple(x.shape)}"
        )
    if _pick(backend, x) == "triton":
        from moetron.kernels.fp8_norm_triton import rmsnorm_backward_triton

        return rmsnorm_backward_triton(x, weight, rstd, dh)
    return rmsnorm_backward_reference(x, weight, rstd, dh)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (M, D) fp32, rstd (M,) fp32): the normalized x times weight, in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return xf * rstd[:, None] * weight.float(), rstd


@_reference
def rmsnorm_quantize_reference(x, weight, eps: float, *, transposed=True, pow2_scales=False):
    _check_norm("rmsnorm_quantize", x, weight)
    h, rstd = rmsnorm_reference(x, weight, eps)
    if transposed:
        return (*quantize_1x128_dual_reference(h, pow2_scales=pow2_scales), rstd)
    return (*quantize_1x128_reference(h, pow2_scales=pow2_scales), None, None, rstd)


@_reference
def rmsnorm_backward_reference(x, weight, rstd, dh):
    xhat = x.float() * rstd[:, None]
    g = dh.float() * weight.float()
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dh.float() * xhat).sum(0).to(weight.dtype)


# ------------------------------------------------------------------------------------- the layer
def _norm_linear_forward(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    qw: torch.Tensor,
    sw: torch.Tensor,
    out_dtype: torch.dtype,
    save_h: bool,
    pow2_scales: bool,
    backend: str | None,
) -> list[torch.Tensor]:
    """FP8NormLinearFunction's forward work: [y (M, N), rstd (M,), and if `save_h` h^T's 1x128 tiles along the
    tokens and their scales]. A custom op under dispatch modes (moetron.kernels.ops), so selective checkpointing
    keeps its outputs."""
    qh, sh, qht, sht, rstd = rmsnorm_quantize(
        x, norm_weight, eps, transposed=save_h, pow2_scales=pow2_scales, backend=backend
    )
    y = fp8_gemm(qh, sh, qw, sw, out_dtype=out_dtype, backend=backend)
    return [y, rstd, *((qht, sht) if save_h else ())]


_norm_linear_forward = dispatch_visible("fp8_norm_linear_forward", _norm_linear_forward)


class FP8NormLinearFunction(torch.autograd.Function):
    """y = rmsnorm(x) @ [weight; siblings...]^T with the norm fused into the FP8 quantization (module docstring).

    forward(x (..., D), norm_weight (D,), eps, pow2_scales, backend, cache, weight (N, D), *siblings (N_i, D)) ->
    (..., N + sum N_i): the projections that read the normed x (one weight, or siblings as in
    fp8_linear.FP8LinearFunction: every weight but the last with N % 128 == 0). D % 128 == 0. The output is in
    the autocast dtype under autocast, else x's dtype; the gradients in the dtypes of x, norm_weight and the
    weights.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, eps, pow2_scales, backend, cache, weight, *siblings):
        weights = (weight, *siblings)
        d = x.shape[-1]
        _check_siblings(weights, None)
        if weight.shape[1] != d or norm_weight.shape != (d,):
            raise ValueError(
                f"fp8 norm linear: x{tuple(x.shape)}, norm weight{tuple(norm_weight.shape)} and weight"
                f"{tuple(weight.shape)} must share D (x's last dim)"
            )
        x2 = x.reshape(-1, d)
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        _check_norm("fp8 norm linear", x2, norm_weight)  # (before the weights are quantized: D % 128 too)
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w_grads = ctx.needs_input_grad[6:]
        qw, sw, qwt, swt = weight_forms(weights if siblings else weight, need_x, pow2_scales, backend, cache)
        y, rstd, *h_forms = _norm_linear_forward(
            x2, norm_weight, eps, qw, sw, _output_dtype(x), any(w_grads), pow2_scales, backend
        )
        kept = (x2, norm_weight, rstd) if need_x else (None, None, None)
        ctx.save_for_backward(*kept, *(h_forms or (None, None)), qwt, swt)
        ctx.pow2_scales, ctx.backend, ctx.w_grads, ctx.w_dtype = pow2_scales, backend, w_grads, weight.dtype
        ctx.x_shape, ctx.x_dtype, ctx.w_rows = x.shape, x.dtype, [w.shape[0] for w in weights]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, norm_weight, rstd, qht, sht, qwt, swt = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], any(ctx.w_grads)
        dy = grad_out.reshape(-1, sum(ctx.w_rows))
        dh, grad_w = fp8_linear_backward(
            dy, qht, sht, qwt, swt, None, need_x, need_w, ctx.x_dtype, ctx.w_dtype, ctx.pow2_scales, ctx.backend
        )
        grad_x = grad_norm = None
        if need_x:
            grad_x, grad_norm = rmsnorm_backward(x2, norm_weight, rstd, dh, backend=ctx.backend)
            grad_x = grad_x.view(ctx.x_shape)
        grad_ws = [None] * len(ctx.w_grads)
        if need_w:
            grad_ws = [g if wanted else None for g, wanted in zip(grad_w.split(ctx.w_rows), ctx.w_grads)]
        return grad_x, grad_norm, None, None, None, None, *grad_ws


def fp8_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weights: tuple[torch.Tensor, ...],
    pow2_scales: bool = False,
    backend: str | None = None,
    cache: FP8WeightCache | None = None,
) -> torch.Tensor:
    """rmsnorm(x) @ [weights...]^T in FP8 with the norm fused into the quantization (FP8NormLinearFunction): the
    joint output (..., sum N_i); `cache` keeps the (stacked) weights' FP8 forms between calls."""
    return FP8NormLinearFunction.apply(x, norm_weight, eps, pow2_scales, backend, cache, *weights)


# ------------------------------------------------------------------------------------------ checks
def _check_norm(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.shape != x.shape[1:]:
        raise ValueError(f"{name}: expected x (M, D) and weight (D,), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise ValueError(f"{name}: takes bf16, fp16 or fp32 x and weight, got {x.dtype} and {weight.dtype}")
    if x.shape[1] % SCALE_BLOCK:
        raise ValueError(f"{name}: D={x.shape[1]} must be a multiple of {SCALE_BLOCK} (the scale block)")


__all__ = [
    "FP8NormLinearFunction",
    "fp8_norm_linear",
    "rmsnorm_backward",
    "rmsnorm_backward_reference",
    "rmsnorm_quantize",
    "rmsnorm_quantize_reference",
    "rmsnorm_reference",
]
