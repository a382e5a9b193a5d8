"""FP8 linear layers: `FP8Linear` (an nn.Linear whose three GEMMs run in block-scaled FP8) and
`fp8_grouped_linear` (fp8_grouped_linear.py: the same for mixture-of-experts weights over tokens sorted by
expert).

DeepSeek-V3's recipe (report section 3.3): activations and gradients are quantized in 1x128 tiles,
weights in 128x128 blocks, each GEMM accumulates in fp32 with the scales applied per 128-wide block
(`moetron.kernels.fp8`). Master weights, their gradients and the optimizer stay in fp32/bf16: the
module quantizes its weight on the fly. For y = x W^T (x (M, K), W (N, K)):

    forward  y  = x W^T    x: 1x128 tiles along K          W: 128x128 blocks
    dgrad    dX = dY W     dY: 1x128 tiles along N         W^T: the same blocks, transposed (exact)
    wgrad    dW = dY^T X   dY^T, X^T: 1x128 tiles along M (the tokens), M zero-padded to a multiple of 128

What is saved for backward: the FP8 activation the weight gradient reads, x^T already quantized in
1x128 tiles along the tokens (`quantize_1x128_t`, 1 byte per element + one fp32 scale per 128, about
half of a bf16 x). DeepSeek-V3 caches x in the forward's 1x128 layout and, for the wgrad, dequantizes,
transposes and re-quantizes it (their section 3.5.2 asks hardware for a fused transpose); here x's
1x128 tiles (for the forward GEMM) and x^T's (saved) are both quantized from x, which stores the same
bytes and rounds x only once; likewise dY's two forms in the backward. The weight is quantized once,
in the forward, into both layouts (`quantize_128x128_dual`: W for the forward GEMM and W^T for the
dgrad), and W^T is saved in FP8: N*K bytes per layer and micro-batch in flight, against
a re-quantization plus an FP8 transpose in every backward (measured: on small layers each launch is
tens of microseconds of host time; on the mini model the transposes alone took 9% of the GPU time).

Sibling layers (`fp8_shared_input`, which the model reaches through `moetron.model.layers.project_together`):
layers that read the same x (SwiGLU's gate and up, MLA's q_a and kv_a, GQA's q, k, v) run as one
FP8LinearFunction over their stacked weights, so x and dY are quantized once and each of the three GEMMs runs
once; with every stacked weight but the last a multiple of 128 rows, each layer's FP8 bytes are its own.

The weights' FP8 forms and their cache (`FP8WeightCache`, `fp8.cache_weights`) are in fp8_weights.py.

Shapes FP8 needs: in_features % 128 == 0 (the forward reduces over it in 128-wide blocks).
out_features may be anything: when it is not a multiple of 128 (MLA's kv_a_proj, 512 + 64 wide) the
dgrad pads dY and W with zero rows up to the next multiple of 128; zeros change no tile's amax, so
the result is the unpadded one. `fp8_grouped_linear` needs both dims multiples of 128, and each
expert's group of rows must start at a multiple of 128 (the MoE layer pads its dispatch for that).

Error bound (asserted by tests/kernels/test_fp8_linear.py). e4m3 has 3 mantissa bits, so rounding a
scaled element to nearest has relative error |d| <= u = 2^-4 in the normal range; each tile's amax
maps to 448, so every element above amax * 2^-14 is normal, and below that the absolute error is at
most 2^-10 of the tile scale (< 2.2e-6 amax; twice that with power-of-two scales). For one output y = sum_k a_k b_k of a GEMM whose two
operands were rounded with relative errors d_k, e_k (the product and the fp32 accumulation add ~2^-24):

* elementwise, any data:  |y_fp8 - y| <= (2u + u^2) * sum_k |a_k| |b_k|  (+ the subnormal term);
* normwise, operands with independent random signs: the error terms a_k b_k (d_k + e_k) are
  uncorrelated with zero mean, so E (y_fp8 - y)^2 = sum_k a_k^2 b_k^2 E(d + e)^2 while
  E y^2 = sum_k a_k^2 b_k^2. The relative error ||y_fp8 - y|| / ||y|| is sqrt(E d^2 + E e^2),
  independent of K. Bounding each rounding by a relative error uniform on [-u, u] (E d^2 = u^2/3)
  gives sqrt(2/3) * u = 0.051; a mantissa spread log-uniformly over its binade has E d^2 = 0.18 u^2,
  so ~0.6 u = 0.037 is typical. A bf16 output adds at most 2^-8 relative (RMS 0.0023).
  This holds for all three GEMMs (y, dX, dW); correlated operands (cancellation) can exceed it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetron.kernels.fp8 import (
    OUT_DTYPES,
    SCALE_BLOCK,
    fp8_gemm,
    fp8_grouped_gemm,
    fp8_grouped_gemm_wgrad,
    quantize_1x128,
    quantize_1x128_dual,
    quantize_1x128_t,
)
from moetron.kernels.fp8_weights import FP8WeightCache, _round_up, clear_weight_caches, weight_forms
from moetron.kernels.ops import dispatch_visible

FP8_BLOCK = SCALE_BLOCK  # 128: width of a quantization tile and of a scaled partial product
FP8_UNIT_ROUNDOFF = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest
# Normwise relative error of an FP8 GEMM with random-sign operands (see the module docstring).
FP8_GEMM_RELATIVE_ERROR = math.sqrt(2.0 / 3.0) * FP8_UNIT_ROUNDOFF


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return: the autocast dtype under autocast, else the input's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t if t.shape[1] == cols else F.pad(t, (0, cols - t.shape[1]))


def _quantize_forms(t: torch.Tensor, rows: bool, transposed: bool, pow2_scales: bool, backend):
    """(q, s, qt, st): quantize_1x128(t) if `rows`, quantize_1x128_t(t) if `transposed` (None where not
    asked). When both are asked, from the dual quantizer: the same bytes from one launch and one read of t,
    faster than the two kernels at every size measured on the H100 (23 against 27 us at 4096 x 1536, 215
    against 271 us at 16384 x 7168: bench/results/fp8_quant_reciprocal.json)."""
    if rows and transposed:
        return quantize_1x128_dual(t, pow2_scales=pow2_scales, backend=backend)
    q = s = qt = st = None
    if rows:
        q, s = quantize_1x128(t, pow2_scales=pow2_scales, backend=backend)
    if transposed:
        qt, st = quantize_1x128_t(t, pow2_scales=pow2_scales, backend=backend)
    return q, s, qt, st


def _linear_forward(
    x2: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    save_x: bool,
    pow2_scales: bool,
    backend: str | None,
) -> list[torch.Tensor]:
    """FP8LinearFunction's forward work on x: [y (M, N), and if `save_x` x^T's 1x128 tiles and scales (all the
    weight gradient needs of x)]. A custom op under dispatch modes (moetron.kernels.ops), so selective
    checkpointing keeps its outputs."""
    qx, sx, qxt, sxt = _quantize_forms(x2, True, save_x, pow2_scales, backend)
    if bias is None:
        y = fp8_gemm(qx, sx, qw, sw, out_dtype=out_dtype, backend=backend)
    else:
        y = fp8_gemm(qx, sx, qw, sw, out_dtype=torch.float32, backend=backend)
        y = (y + bias.float()).to(out_dtype)
    return [y, *((qxt, sxt) if save_x else ())]


_linear_forward = dispatch_visible("fp8_linear_forward", _linear_forward)


class FP8LinearFunction(torch.autograd.Function):
    """y = x @ weight^T (+ bias) with the forward, dgrad and wgrad GEMMs in FP8 (module docstring).

    forward(x (..., K), weight (N, K), bias (N,) or None, pow2_scales, backend, cache, *siblings) -> (..., N) in
    the autocast dtype under autocast, else x's dtype. The bias is added in fp32 to the fp32 GEMM output.
    Gradients come back in the dtypes of x, weight and bias.

    `siblings`: more weights (N_i, K) that read the same x (fp8_shared_input), no bias. The output is then
    x @ [weight; siblings...]^T, (..., N + sum N_i): one quantization of x, one GEMM each for y, dX and dW
    instead of one per weight, and dX summed over the weights inside the GEMM's fp32 accumulator. Every weight
    but the last needs N % 128 == 0, so that no 128x128 block and no 1x128 tile of dY spans two weights: each
    weight's FP8 bytes and scales are then those it has alone.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pow2_scales=False, backend=None, cache=None, *siblings):
        weights = (weight, *siblings)
        in_features = weight.shape[1]
        if siblings:
            _check_siblings(weights, bias)
        out_features = sum(w.shape[0] for w in weights)
        if x.shape[-1] != in_features:
            raise ValueError(f"FP8 linear: x{tuple(x.shape)} does not end in in_features={in_features}")
        if in_features % FP8_BLOCK:
            raise ValueError(
                f"FP8 linear: in_features={in_features} must be a multiple of {FP8_BLOCK} "
                f"(nearest valid: {_nearest_multiples(in_features)})"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features).contiguous()  # (M, K)
        w_grads = (ctx.needs_input_grad[1], *ctx.needs_input_grad[6:])
        save_x, save_w = any(w_grads), ctx.needs_input_grad[0]
        qw, sw, qwt, swt = weight_forms(weights if siblings else weight, save_w, pow2_scales, backend, cache)
        y, *x_forms = _linear_forward(x2, qw, sw, bias, _output_dtype(x), save_x, pow2_scales, backend)
        ctx.save_for_backward(*(x_forms or (None, None)), qwt, swt)
        ctx.pow2_scales, ctx.backend, ctx.w_grads = pow2_scales, backend, w_grads
        ctx.x_dtype, ctx.x_shape, ctx.w_dtype = x.dtype, x.shape, weight.dtype
        ctx.w_rows = [w.shape[0] for w in weights]  # (their sum: out_features)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*lead, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        qxt, sxt, qwt, swt = ctx.saved_tensors
        out_features = sum(ctx.w_rows)
        dy = grad_out.reshape(-1, out_features)  # (M, N)
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.w_grads)
        grad_x, grad_w = fp8_linear_backward(
            dy, qxt, sxt, qwt, swt, None, need_x, need_w, ctx.x_dtype, ctx.w_dtype, ctx.pow2_scales, ctx.backend
        )
        grad_x = None if grad_x is None else grad_x.view(ctx.x_shape)
        grad_ws = [None] * len(ctx.w_grads)
        if need_w:  # siblings: their row blocks of the joint dW
            grad_ws = [g if wanted else None for g, wanted in zip(grad_w.split(ctx.w_rows), ctx.w_grads)]
        grad_b = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = dy.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_ws[0], grad_b, None, None, None, *grad_ws[1:]


def fp8_linear_backward(
    dy: torch.Tensor,
    qxt: torch.Tensor | None,
    sxt: torch.Tensor | None,
    qwt: torch.Tensor | None,
    swt: torch.Tensor | None,
    group_ends: torch.Tensor | None,
    need_x: bool,
    need_w: bool,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    pow2_scales: bool,
    backend: str | None,
    w_rows: list[int] | None = None,
):
    """(dX (M, K) in x_dtype, dW in w_dtype) of y = x W^T from dY (M, N) and what the forward saved: x^T's 1x128
    tiles along the tokens (qxt, sxt; for dW) and W^T's blocks (qwt, swt; for dX). Dense: W (N, K), and N need not
    be a multiple of 128 (dY and W^T are padded with zero columns: zeros change no tile's amax). Grouped (group_ends
    given): W (E, N, K), N % 128 == 0, and dW (E, N, K), or with `w_rows` (sibling weights stacked along N) a list
    of the weights' gradients (E, N_i, K), one grouped GEMM each over its row block of dY^T. None where not wanted.
    dY is quantized once into the forms the wanted GEMMs read: 1x128 tiles along N (dgrad), dY^T's along the
    tokens (wgrad)."""
    n = dy.shape[1]
    if group_ends is None:
        dy = _pad_cols(dy, _round_up(n, FP8_BLOCK))  # (M, N_pad)
    qdy, sdy, qdyt, sdyt = _quantize_forms(dy.contiguous(), need_x, need_w, pow2_scales, backend)
    grad_x = grad_w = None
    w_out = _grad_dtype(w_dtype)
    if group_ends is None:
        if need_x:
            grad_x = fp8_gemm(qdy, sdy, qwt, swt, out_dtype=x_dtype, backend=backend)
        if need_w:  # b_scale (K, M_pad/128): 1x128 tiles, the wgrad form of fp8_gemm
            grad_w = fp8_gemm(qdyt, sdyt, qxt, sxt, out_dtype=w_out, backend=backend)[:n].to(w_dtype)
        return grad_x, grad_w
    if need_x:
        grad_x = fp8_grouped_gemm(qdy, sdy, qwt, swt, group_ends, out_dtype=x_dtype, backend=backend)
    if need_w:  # qdyt (N, M_pad): each weight's row block, contiguous
        grads, n0 = [], 0
        for n_i in w_rows or [n]:
            a_t, a_s = qdyt[n0 : n0 + n_i], sdyt[n0 : n0 + n_i]
            if n_i != n:  # the scales' row block, token-block-major again (a few KB; the Gluon kernel reads it so)
                a_s = a_s.t().contiguous().t()
            g = fp8_grouped_gemm_wgrad(a_t, a_s, qxt, sxt, group_ends, out_dtype=w_out, backend=backend)
            grads.append(g.to(w_dtype))
            n0 += n_i
        grad_w = grads if w_rows is not None else grads[0]
    return grad_x, grad_w


def _check_siblings(weights: tuple, bias) -> None:
    """Sibling weights (FP8LinearFunction): one in_features, dtype and device, no bias, every weight but the
    last N % 128 == 0."""
    first = weights[0]
    if bias is not None:
        raise ValueError("FP8 linear: sibling weights (one GEMM for several layers) take no bias")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device:
            raise ValueError(
                f"FP8 linear: sibling weight {i} is {tuple(w.shape)} {w.dtype} on {w.device}; every sibling must "
                f"be (N_i, {first.shape[1]}) {first.dtype} on {first.device}"
            )
        if i < len(weights) - 1 and w.shape[0] % FP8_BLOCK:
            raise ValueError(
                f"FP8 linear: sibling weight {i} has {w.shape[0]} rows; all but the last need a multiple of "
                f"{FP8_BLOCK} (a weight block must not span two layers): put it last or call it alone"
            )


def fp8_linear(x, weight, bias=None, pow2_scales: bool = False, backend: str | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in FP8 (FP8LinearFunction)."""
    return FP8LinearFunction.apply(x, weight, bias, pow2_scales, backend)


class FP8Linear(nn.Linear):
    """nn.Linear with its GEMMs in FP8. Same parameters (names, shapes, dtypes, init) as nn.Linear,
    so checkpoints, Hugging Face import/export and initialization do not see a difference.

    `pow2_scales`: round every scale up to a power of two (DeepSeek-V3's UE8M0 scales), so that
    scaling is exact. `cache_weights`: keep the weight's FP8 forms while it is unchanged (FP8WeightCache).
    in_features must be a multiple of 128.
    """

    def __init__(
        self, in_features, out_features, bias=True, device=None, dtype=None, pow2_scales=False, cache_weights=False
    ):
        if in_features % FP8_BLOCK:
            raise ValueError(
                f"FP8Linear: in_features={in_features} must be a multiple of {FP8_BLOCK} "
                f"(nearest valid: {_nearest_multiples(in_features)})"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2_scales = pow2_scales
        self.fp8_weight_caches = {"weight": FP8WeightCache()} if cache_weights else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.fp8_weight_caches.get("weight")
        return FP8LinearFunction.apply(x, self.weight, self.bias, self.pow2_scales, None, cache)

    def extra_repr(self) -> str:
        cached = ", cache_weights=True" if self.fp8_weight_caches else ""
        return f"{super().extra_repr()}, fp8=e4m3, pow2_scales={self.pow2_scales}{cached}"


def shares_input(*layers: nn.Module) -> bool:
    """Whether fp8_shared_input can run `layers` (applied to the same x) as one: all FP8Linear without bias and
    without forward hooks (one GEMM bypasses the layers' __call__, so their hooks would not run), with the same
    pow2_scales, in_features and weight dtype, all but the last with out_features % 128 == 0."""
    if not all(
        type(layer) is FP8Linear and layer.bias is None and not (layer._forward_hooks or layer._forward_pre_hooks)
        for layer in layers
    ):
        return False
    first = layers[0]
    return all(
        layer.pow2_scales == first.pow2_scales
        and layer.in_features == first.in_features
        and layer.weight.dtype == first.weight.dtype
        for layer in layers
    ) and all(layer.out_features % FP8_BLOCK == 0 for layer in layers[:-1])


def fp8_shared_input(x: torch.Tensor, layers, cache: FP8WeightCache | None = None) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers) for FP8Linear layers that read the same x (shares_input(*layers) must hold:
    SwiGLU's gate and up projections, MLA's q_a and kv_a, GQA's q, k and v), as one FP8LinearFunction over
    their stacked weights: x is quantized once, and y, dX and dW are one GEMM each instead of one per layer
    (and dX one sum in fp32 instead of a bf16 addition). Each output is a column block of the joint (..., sum N)
    output: a view, not contiguous. `cache` (the owning module's) keeps the stack's FP8 forms between calls;
    the layers' own caches are not used here."""
    first = layers[0]
    if any(layer.bias is not None for layer in layers):  # (FP8LinearFunction checks the weights)
        raise ValueError("fp8_shared_input: sibling layers run as one GEMM take no bias; call them one by one")
    y = FP8LinearFunction.apply(
        x, first.weight, None, first.pow2_scales, None, cache, *(layer.weight for layer in layers[1:])
    )
    return y.split([layer.out_features for layer in layers], dim=-1)


def _grad_dtype(w_dtype: torch.dtype) -> torch.dtype:
    """The weight gradient GEMM's output dtype: the weight's own where the kernels write it (the fp32
    accumulator rounded once, as casting an fp32 result would round it, without the extra pass), else fp32."""
    return w_dtype if w_dtype in OUT_DTYPES else torch.float32


def _nearest_multiples(n: int) -> str:
    below, above = n // FP8_BLOCK * FP8_BLOCK, _round_up(n, FP8_BLOCK)
    return " or ".join(str(v) for v in (below, above) if v > 0)


__all__ = [
    "FP8Linear",
    "FP8WeightCache",
    "FP8LinearFunction",
    "FP8_BLOCK",
    "FP8_GEMM_RELATIVE_ERROR",
    "FP8_UNIT_ROUNDOFF",
    "clear_weight_caches",
    "fp8_linear",
    "fp8_linear_backward",
    "fp8_shared_input",
    "shares_input",
]
