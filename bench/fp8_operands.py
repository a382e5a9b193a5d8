"""The operands bench/fp8.py (and bench/fp8_clocks.py) hands each FP8 GEMM it times: the e4m3 copies and scale
layouts cuBLAS's tensorwise, rowwise and block-scaled GEMMs take, moetron's 128x128 blocks of a stack of expert
weights, and the uneven tokens-per-expert split of the grouped rows."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def rowwise(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 copy of x with one fp32 scale per row (dim=1) or per column (dim=0), as cuBLAS rowwise takes."""
    scale = x.abs().amax(dim=dim, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def blockwise_scales(a_scale: torch.Tensor, b_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moetron's scales in the layouts cuBLAS's block-scaled GEMM reads: a_scale (M, K/128) stored M-major
    (its transpose contiguous), b_scale (..., N/128, K/128) as the (..., K/128, N/128) view of B^T's blocks."""
    return a_scale.t().contiguous().t(), b_scale.transpose(-2, -1)


def quantize_weight_grouped(fp8, w: torch.Tensor):
    """(E, N, K) -> 128x128-block quantized (E, N, K) e4m3 and (E, ceil(N/128), K/128) scales, one
    quantize_128x128 per expert (N % 128 == 0 lets the experts share one call)."""
    n_experts, n, k = w.shape
    if n % 128 == 0:
        q, s = fp8.quantize_128x128(w.reshape(n_experts * n, k))
        return q.view(n_experts, n, k), s.view(n_experts, n // 128, k // 128)
    pairs = [fp8.quantize_128x128(w[e]) for e in range(n_experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def group_sizes(n_experts: int, total: int, aligned: bool, seed: int = 0) -> list[int]:
    """Tokens per expert, realistically uneven: multinomial over softmax(0.6 * N(0, 1)) expert
    probabilities from a fixed seed (the most loaded expert gets ~2x the mean); `aligned` rounds
    each up to a multiple of 128 (so the total grows by < 128 per expert)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(0.6 * torch.randn(n_experts, generator=gen), dim=0)
    picks = torch.multinomial(probs, total, replacement=True, generator=gen)
    sizes = torch.bincount(picks, minlength=n_experts).tolist()
    if aligned:
        sizes = [(s + 127) // 128 * 128 for s in sizes]
    return sizes
