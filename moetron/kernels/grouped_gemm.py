"""Grouped GEMM for mixture-of-experts: one matmul per expert over its contiguous slice of rows.

`grouped_gemm(x, weight, group_ends)` computes, for every expert e, the rows of x routed to e times
`weight[e]` transposed, i.e. an `F.linear` per group:

    x (tokens, in_features), rows sorted by expert
    weight (n_experts, out_features, in_features)
    group_ends (n_experts,) int32: cumulative token counts, the end row of each group
    -> (tokens, out_features)

Two implementations, exactly equal in value:

* `torch._grouped_mm` (one launch for all experts) where the device supports it: CUDA with compute
  capability >= 9.0, bf16 operands and 16-byte aligned rows;
* `grouped_gemm_reference`: a Python loop of `F.linear` over the groups; the fallback elsewhere and the
  test oracle. It reads the group sizes on the host (one device sync).

A later issue adds the FP8 grouped GEMM behind the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("auto", "torch_grouped_mm", "reference")


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"grouped_gemm: expected x (tokens, K) and weight (experts, N, K), got x{tuple(x.shape)} "
            f"weight{tuple(weight.shape)}"
        )
    if group_ends.shape != (weight.shape[0],):
        raise ValueError(
            f"grouped_gemm: group_ends must have shape ({weight.shape[0]},), got {tuple(group_ends.shape)}"
        )
    if impl not in IMPLS:
        raise ValueError(f"grouped_gemm: impl={impl!r}; valid: {IMPLS}")
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know _grouped_mm: cast as for F.linear
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if impl == "torch_grouped_mm" or (impl == "auto" and torch_grouped_mm_supported(x, weight)):
        out = torch._grouped_mm(x, weight.transpose(-2, -1), offs=group_ends.to(torch.int32))
        return _ContiguousGrad.apply(out)
    return grouped_gemm_reference(x, weight, group_ends)


def grouped_gemm_reference(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    ends = group_ends.tolist()
    starts = [0] + ends[:-1]
    pieces = [F.linear(x[s:e], weight[g]) for g, (s, e) in enumerate(zip(starts, ends))]
    tail = x.shape[0] - (ends[-1] if ends else 0)
    if tail:  # rows past the last group (dropped tokens' slots) produce zeros, as in _grouped_mm
        pieces.append(x.new_zeros(tail, weight.shape[1]))
    return torch.cat(pieces, dim=0)


def torch_grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    aligned = x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0
    return x.dtype == weight.dtype == torch.bfloat16 and aligned


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward
    rejects broadcast (stride-0) gradients such as the one `out.sum()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()
