"""`fp8_grouped_linear`: the FP8 linear layer for mixture-of-experts weights (E, N, K) over tokens sorted by
expert, all three GEMMs in FP8 (forward and input gradient per expert group, the weight gradient reducing over
each expert's tokens). The recipe, the error bound and the backward are fp8_linear.py's; the grouped GEMMs are
fp8.py's (`fp8_grouped_gemm`, `fp8_grouped_gemm_wgrad`). Sibling weights read by the same x (the experts' gate and
up projections) run as one grouped GEMM over their joint FP8 forms (fp8_weights.py)."""

from __future__ import annotations

import torch

from moetron.kernels.fp8 import fp8_grouped_gemm
from moetron.kernels.fp8_linear import (
    FP8_BLOCK,
    _nearest_multiples,
    _output_dtype,
    _quantize_forms,
    fp8_linear_backward,
)
from moetron.kernels.fp8_weights import FP8WeightCache, weight_forms
from moetron.kernels.ops import dispatch_visible


def _grouped_forward(
    x: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    group_ends: torch.Tensor,
    out_dtype: torch.dtype,
    save_x: bool,
    pow2_scales: bool,
    backend: str | None,
) -> list[torch.Tensor]:
    """FP8GroupedLinearFunction's forward work on x, as _linear_forward: [y (M, N), x^T's forms if `save_x`];
    a custom op under dispatch modes."""
    qx, sx, qxt, sxt = _quantize_forms(x, True, save_x, pow2_scales, backend)
    y = fp8_grouped_gemm(qx, sx, qw, sw, group_ends, out_dtype=out_dtype, backend=backend)
    return [y, *((qxt, sxt) if save_x else ())]


_grouped_forward = dispatch_visible("fp8_grouped_linear_forward", _grouped_forward)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Per expert e, rows of x in group e times weight[e]^T, all three GEMMs in FP8.

    forward(x (M, K) rows sorted by expert, weight (E, N, K), group_ends (E,) int cumulative row
    counts, pow2_scales, backend, cache, *siblings) -> (M, N); rows past group_ends[-1] give zeros. Every group must
    start at a multiple of 128 (fp8_grouped_gemm_wgrad reduces over each group's rows in 128-row
    tiles); a group's rows past its real tokens must be zeros or at least receive zero gradient.

    `siblings`: more expert weights (E, N_i, K) that read the same x (the experts' gate and up projections). The
    output is then per expert x @ [weight[e]; siblings[e]...]^T, (M, N + sum N_i): x quantized once, one grouped
    GEMM for y and one for dX (summed over the weights in fp32), dY quantized once; the weight gradients stay one
    grouped GEMM per weight (each reads its row block of dY^T), so each lands in its own contiguous tensor. The
    weights' FP8 forms are quantized into one joint buffer (no copy of the weights).
    """

    @staticmethod
    def forward(ctx, x, weight, group_ends, pow2_scales=False, backend=None, cache=None, *siblings):
        weights = (weight, *siblings)
        n_experts, _, in_features = weight.shape
        if x.dim() != 2 or x.shape[1] != in_features:
            raise ValueError(f"fp8_grouped_linear: expected x (tokens, {in_features}), got x{tuple(x.shape)}")
        for i, w in enumerate(weights):
            if w.dim() != 3 or w.shape[0] != n_experts or w.shape[2] != in_features or w.dtype != weight.dtype:
                raise ValueError(
                    f"fp8_grouped_linear: sibling weight {i} is {tuple(w.shape)} {w.dtype}; every weight must be "
                    f"({n_experts}, N_i, {in_features}) {weight.dtype}"
                )
            for name, size in (("in_features", in_features), ("out_features", w.shape[1])):
                if size % FP8_BLOCK:
                    raise ValueError(
                        f"fp8_grouped_linear: {name}={size} of weight{tuple(w.shape)} must be a multiple of "
                        f"{FP8_BLOCK} (nearest valid: {_nearest_multiples(size)})"
                    )
        w_grads = (ctx.needs_input_grad[1], *ctx.needs_input_grad[6:])
        save_x, save_w = any(w_grads), ctx.needs_input_grad[0]
        qw, sw, qwt, swt = weight_forms(weights if siblings else weight, save_w, pow2_scales, backend, cache)
        y, *x_forms = _grouped_forward(
            x.contiguous(), qw, sw, group_ends, _output_dtype(x), save_x, pow2_scales, backend
        )
        ctx.save_for_backward(*(x_forms or (None, None)), qwt, swt, group_ends)
        ctx.pow2_scales, ctx.backend, ctx.x_dtype, ctx.w_dtype = pow2_scales, backend, x.dtype, weight.dtype
        ctx.w_grads, ctx.w_rows = w_grads, [w.shape[1] for w in weights]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        qxt, sxt, qwt, swt, group_ends = ctx.saved_tensors
        grad_x, grad_ws = fp8_linear_backward(
            grad_out, qxt, sxt, qwt, swt, group_ends, ctx.needs_input_grad[0], any(ctx.w_grads),
            ctx.x_dtype, ctx.w_dtype, ctx.pow2_scales, ctx.backend, w_rows=ctx.w_rows,
        )  # fmt: skip
        grad_ws = [g if wanted else None for g, wanted in zip(grad_ws or [None] * len(ctx.w_rows), ctx.w_grads)]
        return grad_x, grad_ws[0], None, None, None, None, *grad_ws[1:]


def fp8_grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    group_ends: torch.Tensor,
    pow2_scales: bool = False,
    backend: str | None = None,
    cache: FP8WeightCache | None = None,
    *siblings: torch.Tensor,
) -> torch.Tensor:
    """`grouped_gemm(x, weight, group_ends)` in FP8 (FP8GroupedLinearFunction; groups must start at
    multiples of 128); `cache` keeps the weight's FP8 forms between calls (FP8WeightCache). `siblings`: more
    (E, N_i, K) weights read by the same x; the output is then the joint (M, N + sum N_i)."""
    return FP8GroupedLinearFunction.apply(x, weight, group_ends, pow2_scales, backend, cache, *siblings)


__all__ = ["FP8GroupedLinearFunction", "fp8_grouped_linear"]
