"""Small building blocks: RMSNorm, rotary embeddings (plain, YaRN, Llama-3 scaling), SwiGLU MLP, and
`make_linear`, the one place that decides whether a linear layer runs in bf16/fp32 or FP8."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetron.kernels.fp8_linear import FP8Linear, FP8WeightCache, fp8_shared_input, shares_input
from moetron.kernels.fp8_norm import fp8_norm_linear
from moetron.kernels.fp8_swiglu import fp8_swiglu_linear
from moetron.model.config import FP8Config, RopeScaling, yarn_mscale


def make_linear(in_features: int, out_features: int, bias: bool = False, fp8: FP8Config | None = None) -> nn.Linear:
    """nn.Linear, or FP8Linear (same parameters, GEMMs in FP8) when `fp8` is given and enabled. Layers that
    must stay in higher precision (embedding, output head, router, MTP projection) do not pass `fp8`."""
    if fp8 is not None and fp8.enabled:
        return FP8Linear(
            in_features, out_features, bias=bias, pow2_scales=fp8.pow2_scales, cache_weights=fp8.cache_weights
        )
    return nn.Linear(in_features, out_features, bias=bias)


def sibling_caches(fp8: FP8Config | None, *names: str) -> dict[str, FP8WeightCache]:
    """A module's FP8 weight caches for its groups of sibling layers run as one GEMM (`project_together`), one per
    name, when `fp8.cache_weights` is on; empty otherwise. (clear_weight_caches finds them by this attribute.)"""
    return {name: FP8WeightCache() for name in names} if fp8 is not None and fp8.cache_weights else {}


def project_together(
    x: torch.Tensor,
    layers: tuple[nn.Module, ...],
    cache: FP8WeightCache | None = None,
    norm: nn.Module | None = None,
    fuse_norm: bool = False,
) -> tuple:
    """(layer(x) for layer in layers), or (layer(norm(x)) ...) with a `norm`: linear layers that read the same x,
    e.g. SwiGLU's gate and up projections. FP8Linear siblings that allow it run as one FP8 GEMM over their stacked
    weights (fp8_shared_input: x quantized once, one GEMM each for y, dX and dW); with `fuse_norm`, an RMSNorm before
    them writes their FP8 input itself (fp8_norm_linear: the normed x is never stored). Anything else, one call
    per layer. `cache`: the module's FP8 weight cache of the group (one layer: its own)."""
    if shares_input(*layers):
        if cache is None and len(layers) == 1:
            cache = layers[0].fp8_weight_caches.get("weight")
        if norm is not None and fuse_norm and fuses_norm(norm):
            first = layers[0]
            weights = tuple(layer.weight for layer in layers)
            y = fp8_norm_linear(x, norm.weight, norm.eps, weights, first.pow2_scales, None, cache)
            return y.split([layer.out_features for layer in layers], dim=-1)
        return fp8_shared_input(x if norm is None else norm(x), layers, cache)
    x = x if norm is None else norm(x)
    return tuple(layer(x) for layer in layers)


def fuses_norm(norm: nn.Module) -> bool:
    """Whether `norm` can be fused into the FP8 quantization of the layers it feeds: a plain RMSNorm without
    forward hooks (the fused call bypasses its __call__)."""
    return type(norm) is RMSNorm and not (norm._forward_hooks or norm._forward_pre_hooks)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back to the input dtype (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) of the rotary pairs and the scale applied to cos/sin.

    Plain RoPE (Su et al. 2021): theta^(-2i/dim). YaRN (Peng et al. 2023, eq. 23): dims whose wavelength
    fits many times in the original context keep their frequency (extrapolate), dims with wavelengths
    longer than it are divided by `factor` (interpolate), with a linear ramp between the correction
    dims of beta_fast and beta_slow rotations; cos/sin are scaled by the attention factor.
    Llama 3.1: a piecewise version of the same idea over wavelengths.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.type == "llama3":
        low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
        high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, out), 1.0

    # YaRN
    def correction_dim(n_rotations: float) -> float:
        return dim * math.log(scaling.original_max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    if scaling.attention_factor is not None:
        attn_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attn_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq, attn_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; `apply_rope` rotates the pairs (i, i + dim/2)."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        inv_freq, self.attention_factor = rope_inv_freq(self.dim, self.theta, self.scaling)
        if not self.inv_freq.is_meta:
            with torch.no_grad():
                self.inv_freq.copy_(inv_freq)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin of shape (batch, seq, 1, dim), fp32."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (batch, seq, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (batch, seq, 1, dim)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, heads, dim) rotated by position: pair (x_i, x_{i+dim/2}) turns by angle_i."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward down(silu(gate(x)) * up(x)) (Shazeer 2020); its linears in FP8 with `fp8` enabled:
    gate and up then as one FP8 GEMM (project_together), with `fp8.fuse_swiglu` the SwiGLU quantizes its
    output for the down projection itself (fused_swiglu_down), and with `fp8.fuse_norm` a pre-norm passed to
    forward quantizes its output for gate and up."""

    def __init__(self, d_model: int, hidden: int, fp8: FP8Config | None = None):
        super().__init__()
        self.gate_proj = make_linear(d_model, hidden, fp8=fp8)
        self.up_proj = make_linear(d_model, hidden, fp8=fp8)
        self.down_proj = make_linear(hidden, d_model, fp8=fp8)
        self.fp8_weight_caches = sibling_caches(fp8, "gate_up")
        self.fuse_swiglu = fp8 is not None and fp8.enabled and fp8.fuse_swiglu
        self.fuse_norm = fp8 is not None and fp8.enabled and fp8.fuse_norm

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """x (..., d_model); `norm`: a pre-norm to apply to x first (fused into the FP8 quantization of gate and up
        with `fp8.fuse_norm`)."""
        cache = self.fp8_weight_caches.get("gate_up")
        gate, up = project_together(x, (self.gate_proj, self.up_proj), cache, norm, self.fuse_norm)
        if self.fuse_swiglu and fuses_swiglu(self.down_proj):
            return fused_swiglu_down(gate, up, self.down_proj)
        return self.down_proj(F.silu(gate) * up)


def fuses_swiglu(down: nn.Module) -> bool:
    """Whether `down` can take its input as FP8 straight from the SwiGLU (fused_swiglu_down): an FP8Linear without
    bias and forward hooks (the fused call bypasses the layer's __call__, so hooks would not run)."""
    return type(down) is FP8Linear and down.bias is None and not (down._forward_hooks or down._forward_pre_hooks)


def fused_swiglu_down(gate: torch.Tensor, up: torch.Tensor, down: FP8Linear) -> torch.Tensor:
    """down(silu(gate) * up) with h quantized in the SwiGLU (moetron.kernels.fp8_swiglu); fuses_swiglu(down)."""
    return fp8_swiglu_linear(gate, up, down.weight, None, down.pow2_scales, None, down.fp8_weight_caches.get("weight"))
