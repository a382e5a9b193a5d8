"""The FP8 forms of linear layers' weights: quantization in 128x128 blocks, W and W^T at once, for one weight,
sibling weights stacked along their rows, or per-expert weights; and the cache that keeps them while a weight is
unchanged.

Every FP8 layer (fp8_linear.py, fp8_swiglu.py, fp8_norm.py) gets its weight's forms from `weight_forms`:
(qw, sw) for the forward GEMM and, when the input needs a gradient, (qwt, swt) = W^T's blocks for the dgrad (the
transpose of a 128x128-quantized matrix is the 128x128 quantization of the transpose, so one quantization gives
both). The work runs as the custom op `moetron::fp8_weight_forms` under dispatch modes, so that selective
activation checkpointing keeps the forms instead of quantizing the weights again in the recomputation.

Weight cache (`FP8WeightCache`, on in the model by `fp8.cache_weights`). The micro-batches of one optimizer
step and activation checkpointing's recomputation read the same weight again and again; without the cache
every forward quantizes it anew (two launches and a pass over the weight each). With it, a module keeps its
weight's FP8 forms while the weight is unchanged: same storage and same version counter (every in-place
update, the optimizer's included, bumps it). The trainer empties the caches once a step's micro-batches are done, so
they hold memory (1 byte per weight element for W, 1 for W^T, which the backward keeps anyway) only while
a step runs. Writing through `weight.data` bypasses the version counter: call `clear_weight_caches` after.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moetron.kernels.fp8 import (
    FP8_DTYPE,
    SCALE_BLOCK,
    _pick,
    quantize_128x128,
    quantize_128x128_dual,
)
from moetron.kernels.ops import dispatch_visible

_BLOCK = SCALE_BLOCK


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _weight_forms(
    weights: list[torch.Tensor], transposed: bool, pow2_scales: bool, backend: str | None
) -> list[torch.Tensor]:
    """[qw, sw] and, if `transposed`, [qwt, swt] of the weights stacked along their rows (one weight: itself):
    _quantize_weight as a custom op under dispatch modes, so selective checkpointing keeps the forms instead of
    quantizing the weights again in the backward. Several weights are quantized into their slices of the joint
    forms (_stacked_weight_forms), never stacked themselves."""
    if len(weights) > 1:
        q, s, qt, st = _stacked_weight_forms(weights, transposed, pow2_scales, backend)
    else:
        q, s, qt, st = _quantize_weight(weights[0], transposed, pow2_scales, backend)
    return [q, s, *((qt, st) if transposed else ())]


def _stacked_weight_forms(weights: list[torch.Tensor], transposed: bool, pow2_scales: bool, backend: str | None):
    """(q, s, qt, st) of weights (N_i, K) or per expert (E, N_i, K) stacked along N, every N_i but the last a
    multiple of 128: the forms quantize_128x128_dual gives the stack, byte for byte (no 128x128 block spans two
    weights); qt, st None unless `transposed`. The Triton path quantizes each weight straight into its slice of the
    joint forms, so the weights are not copied (a stack of the experts' fp32 weights would be hundreds of MB per MoE
    layer); the reference path concatenates the forms."""
    if _pick(backend, weights[0]) != "triton":
        parts = [_quantize_weight(w, transposed, pow2_scales, backend) for w in weights]
        q, s, qt, st = zip(*parts)
        with torch.autocast(weights[0].device.type, enabled=False):  # (CPU autocast cannot cat e4m3)
            if not transposed:
                return torch.cat(q, -2), torch.cat(s, -2), None, None
            return torch.cat(q, -2), torch.cat(s, -2), torch.cat(qt, -1), torch.cat(st, -1)
    from moetron.kernels.fp8_quant_triton import quantize_128x128_dual_triton

    lead, k = weights[0].shape[:-2], weights[0].shape[-1]
    rows = [w.shape[-2] for w in weights]
    n, n_pad = sum(rows), _round_up(sum(rows), _BLOCK)
    device = weights[0].device
    q = torch.empty(*lead, n, k, dtype=FP8_DTYPE, device=device)
    s = torch.empty(*lead, n_pad // _BLOCK, k // _BLOCK, dtype=torch.float32, device=device)
    qt = st = None
    if transposed:
        qt = torch.empty(*lead, k, n_pad, dtype=FP8_DTYPE, device=device)
        st = torch.empty(*lead, k // _BLOCK, n_pad // _BLOCK, dtype=torch.float32, device=device)
    n0 = 0
    for w, n_i in zip(weights, rows):
        n1, blocks = n0 + n_i, slice(n0 // _BLOCK, _round_up(n0 + n_i, _BLOCK) // _BLOCK)
        cols = slice(n0, _round_up(n1, _BLOCK))  # (the last weight's zero padding columns of W^T)
        out = (q[..., n0:n1, :], s[..., blocks, :], *((qt[..., cols], st[..., blocks]) if transposed else (None, None)))
        quantize_128x128_dual_triton(w, pow2_scales, out=out)
        n0 = n1
    return q, s, qt, st


_weight_forms = dispatch_visible("fp8_weight_forms", _weight_forms)


class FP8WeightCache:
    """One weight's FP8 forms (qw, sw, qwt, swt; the last two None if not made), kept while the weight is
    unchanged: the same storage and version counter (module docstring). `forms` returns the cached ones or
    makes them; a request for W^T that the cached entry lacks makes them again. `weight` may be a tuple of
    weights stacked along their rows (sibling layers, `fp8_shared_input`): the entry then holds the stack's
    forms, kept while every one of them is unchanged."""

    def __init__(self):
        self._key, self._forms = None, None

    def forms(self, weight, transposed: bool, pow2_scales: bool, backend: str | None) -> tuple:
        weights = weight if isinstance(weight, tuple) else (weight,)
        key = (*((w.data_ptr(), w._version, w.shape, w.dtype) for w in weights), pow2_scales, backend)
        if self._key != key or (transposed and self._forms[2] is None):
            self._key, self._forms = None, None  # the stale forms go before the new ones are made
            self._forms = weight_forms(weight, transposed, pow2_scales, backend, None)
            self._key = key
        return self._forms

    def clear(self) -> None:
        self._key, self._forms = None, None


def weight_forms(weight, transposed: bool, pow2_scales: bool, backend, cache: FP8WeightCache | None) -> tuple:
    """(qw, sw, qwt, swt) of `weight`, from `cache` when given (qwt, swt None if not `transposed`). A tuple of
    weights (N_i, K) is quantized as their stack (sum N_i, K)."""
    if cache is not None:
        return cache.forms(weight, transposed, pow2_scales, backend)
    forms = _weight_forms(list(weight) if isinstance(weight, tuple) else [weight], transposed, pow2_scales, backend)
    return (*forms, *((None, None) if not transposed else ()))


def clear_weight_caches(model: nn.Module) -> None:
    """Empty the FP8 weight cache of every module of `model` that has one (once a step's micro-batches are done)."""
    for module in model.modules():
        for cache in getattr(module, "fp8_weight_caches", {}).values():
            cache.clear()


def _quantize_weight(weight: torch.Tensor, transposed: bool, pow2_scales: bool, backend):
    """(q, s, qt, st) of a weight (N, K) or per-expert weights (E, N, K) in 128x128 blocks; qt, st (W^T) only if
    `transposed`, else None. The per-expert form quantizes the stacked (E*N, K) matrix in one launch: with
    N % 128 == 0 no block straddles two experts."""
    if transposed:
        return quantize_128x128_dual(weight, pow2_scales=pow2_scales, backend=backend)
    q, s = quantize_128x128(weight.reshape(-1, weight.shape[-1]), pow2_scales=pow2_scales, backend=backend)
    if weight.dim() == 3:
        n_experts, out_features, _ = weight.shape
        q, s = q.view(weight.shape), s.view(n_experts, out_features // _BLOCK, -1)
    return q, s, None, None


__all__ = ["FP8WeightCache", "clear_weight_caches", "weight_forms"]
