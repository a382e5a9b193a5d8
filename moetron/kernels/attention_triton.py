"""Launchers, autograd.Function and entry point of the Triton attention kernels
(moetron/kernels/attention_triton_kernels.py holds the kernels and says how they work).

The launchers flatten (batch, seq, heads, dim) to (tokens, heads, dim) with row offsets per sequence
(`cu_seqlens`, or arange(batch + 1) * seq for a padded batch), lay tensors out as tensor descriptors
need, and give Triton the global scratch memory in which kernels build their descriptors.

On an H100 (sm_90) the forward and the backward of the head dims the Gluon kernels were written for
(moetron/kernels/attention_gluon.py, attention_gluon_bwd*.py: warp-specialized, FlashAttention-3 style)
run those instead; MOETRON_ATTN_GLUON=0 keeps the Triton kernels everywhere.
"""

from __future__ import annotations

import functools

import torch
import triton

try:  # Gluon (Triton >= 3.6): the warp-specialized Hopper forward and backward
    from moetron.kernels import attention_gluon, attention_gluon_bwd
except ImportError:  # pragma: no cover - older Triton
    attention_gluon = attention_gluon_bwd = None
from moetron.kernels.attention_triton_kernels import (
    INTERPRET,
    LOG2E,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_preprocess_kernel,
    _fwd_kernel,
)
from moetron.kernels.launch import FastLaunch, cdiv, device_scratch, next_power_of_2
from moetron.kernels.ops import dispatch_visible

# Launchers that skip Triton's per-call binding and tuning lookup once a signature has run (launch.py).
_launch_fwd, _launch_dkdv, _launch_dq, _launch_pre = map(
    FastLaunch, (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel)
)


@functools.lru_cache(maxsize=64)
def _padded_offsets(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Row offsets arange(batch + 1) * seq (int32) of a padded batch, made once per shape and device: two
    small kernels and their allocations cost ~25 us of host time per call on the H100 machine, against
    ~190 us for a whole attention forward at (16, 1024, 16, 128). Read-only to every kernel."""
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * seq


def _layout(q, k, cu_seqlens, max_seqlen):
    """Flattened (tokens, heads, dim) views and per-sequence row offsets."""
    batch, seq_q = q.shape[:2]
    seq_k = k.shape[1]
    if cu_seqlens is None:
        return _padded_offsets(batch, seq_q, q.device), _padded_offsets(batch, seq_k, q.device), seq_q, seq_k
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    longest = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())  # one host sync
    return cu, cu, longest, longest


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, dim) -> (tokens, heads, dim) laid out as tensor descriptors (TMA) need:
    unit stride on dim, the other strides and the start address multiples of 16 bytes."""
    x = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
    aligned = all(st * x.element_size() % 16 == 0 for st in x.stride()[:2]) and x.data_ptr() % 16 == 0
    return x if x.stride(-1) == 1 and aligned else x.clone(memory_format=torch.contiguous_format)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    causal: bool,
    scale: float,
    window: int | None,
) -> list[torch.Tensor]:
    """[out (batch, seq_q, heads, d_v), lse (heads, tokens) fp32] for q, k, v and their row offsets (_layout);
    a custom op under dispatch modes (moetron.kernels.ops), so selective checkpointing keeps both."""
    batch, seq_q, n_heads, d_qk = q.shape
    n_kv, d_v = k.shape[2], v.shape[3]
    n_seqs = cu_q.numel() - 1
    q2, k2, v2 = _rows(q), _rows(k), _rows(v)
    triton.set_allocator(device_scratch)
    out = torch.empty(q2.shape[0], n_heads, d_v, device=q.device, dtype=q.dtype)
    lse = torch.empty(n_heads, q2.shape[0], device=q.device, dtype=torch.float32)
    if attention_gluon is not None and attention_gluon.supported(q, k, v):
        attention_gluon.gluon_attention_forward(
            q2, k2, v2, out, lse, cu_q, cu_k, max_q, n_heads, n_heads // n_kv, causal, scale, window
        )
        return [out.view(batch, seq_q, n_heads, d_v), lse]
    grid = lambda meta: (cdiv(max_q, meta["BLOCK_M"]), n_seqs * n_heads)  # noqa: E731
    _launch_fwd(
        grid, q2, k2, v2, out, lse, cu_q, cu_k,
        q2.stride(0), q2.stride(1), k2.stride(0), k2.stride(1), v2.stride(0), v2.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        n_heads, n_heads // n_kv, scale * LOG2E, window or 0,
        D_QK=d_qk, D_V=d_v, BLOCK_DQK=next_power_of_2(d_qk), BLOCK_DV=next_power_of_2(d_v),
        CAUSAL=causal, HAS_WINDOW=window is not None, UPCAST=INTERPRET,
    )  # fmt: skip
    return [out.view(batch, seq_q, n_heads, d_v), lse]


_forward = dispatch_visible("attention_forward", _forward)


def triton_attention_forward(q, k, v, causal, scale, cu_seqlens, max_seqlen, window):
    """(out (batch, seq_q, heads, d_v), lse (heads, tokens) fp32, layout (cu_q, cu_k, max_q, max_k))."""
    layout = _layout(q, k, cu_seqlens, max_seqlen)
    out, lse = _forward(q, k, v, *layout[:3], causal, scale, window)
    return out, lse, layout


def preprocess_args(do2, o2, lse, delta, lse2):
    """(grid, args, constexprs) of _bwd_preprocess_kernel (also used by the CPU compile check): do2, o2
    (tokens, heads, d_v); lse, delta, lse2 (heads, tokens) fp32."""
    n_tokens, n_heads, d_v = o2.shape
    block_dv = next_power_of_2(d_v)
    block_t = max(16, 4096 // block_dv)  # 4096 elements of each operand per program
    grid = (n_heads, cdiv(n_tokens, block_t))
    args = (do2, o2, lse, delta, lse2, n_tokens, do2.stride(0), do2.stride(1), o2.stride(0), o2.stride(1),
            lse.stride(0), delta.stride(0))  # fmt: skip
    return grid, args, dict(D_V=d_v, BLOCK_DV=block_dv, BLOCK_T=block_t, num_warps=4)


def _preprocess(do2, o2, lse):
    """(delta, lse2), each (heads, tokens) fp32: rowsum(dO * O), and the logsumexp in log2 units with +inf for
    rows that saw no key (so that their P is 0); one kernel reading dO and O once (_bwd_preprocess_kernel).
    do2, o2: (tokens, heads, d_v)."""
    delta = torch.empty(o2.shape[1], o2.shape[0], device=o2.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    if o2.shape[0]:
        grid, args, constexprs = preprocess_args(do2, o2, lse, delta, lse2)
        _launch_pre(grid, *args, **constexprs)
    return delta, lse2


def triton_attention_backward(do, q, k, v, out, lse, layout, causal, scale, window):
    batch, seq_q, n_heads, d_qk = q.shape
    n_kv, d_v = k.shape[2], v.shape[3]
    cu_q, cu_k, max_q, max_k = layout
    n_seqs = cu_q.numel() - 1
    q2, k2, v2, do2, o2 = _rows(q), _rows(k), _rows(v), _rows(do), _rows(out)
    triton.set_allocator(device_scratch)
    delta, lse2 = _preprocess(do2, o2, lse)
    if attention_gluon_bwd is not None and attention_gluon_bwd.supported(q, k, v, window):
        return attention_gluon_bwd.gluon_attention_backward(do, q, k, v, lse2, delta, layout, causal, scale, window)
    dq = torch.empty_like(q2)
    dk = torch.empty_like(k2)
    dv = torch.empty_like(v2)
    common = dict(
        D_QK=d_qk, D_V=d_v, BLOCK_DQK=next_power_of_2(d_qk), BLOCK_DV=next_power_of_2(d_v),
        CAUSAL=causal, HAS_WINDOW=window is not None, UPCAST=INTERPRET,
    )  # fmt: skip
    strides = (
        q2.stride(0), q2.stride(1), k2.stride(0), k2.stride(1), v2.stride(0), v2.stride(1),
        do2.stride(0), do2.stride(1), lse.stride(0),
    )  # fmt: skip
    dkdv_grid = lambda meta: (cdiv(max_k, meta["BLOCK_N"]), n_seqs * n_kv)  # noqa: E731
    dq_grid = lambda meta: (cdiv(max_q, meta["BLOCK_M"]), n_seqs * n_heads)  # noqa: E731
    _launch_dkdv(
        dkdv_grid, q2, k2, v2, do2, lse2, delta, dk, dv, cu_q, cu_k, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        n_kv, n_heads // n_kv, scale, window or 0, **common,
    )  # fmt: skip
    _launch_dq(
        dq_grid, q2, k2, v2, do2, lse2, delta, dq, cu_q, cu_k, *strides,
        dq.stride(0), dq.stride(1),
        n_heads, n_heads // n_kv, scale, window or 0, **common,
    )  # fmt: skip
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


class TritonAttention(torch.autograd.Function):
    """Differentiable in q, k, v; the logsumexp output is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cu_seqlens, max_seqlen, window):
        out, lse, layout = triton_attention_forward(q, k, v, causal, scale, cu_seqlens, max_seqlen, window)
        ctx.save_for_backward(q, k, v, out, lse, *layout[:2])
        ctx.max_lens, ctx.causal, ctx.scale, ctx.window = layout[2:], causal, scale, window
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = triton_attention_backward(
            dout.contiguous(), q, k, v, out, lse, (cu_q, cu_k, *ctx.max_lens), ctx.causal, ctx.scale, ctx.window
        )
        return dq, dk, dv, None, None, None, None, None


def triton_attention(q, k, v, causal, scale, cu_seqlens, max_seqlen, window, return_lse):
    """Entry point used by `flash_attention(backend="triton")`; lse comes back as (batch, heads, seq_q)."""
    if q.dtype not in (torch.float16, torch.bfloat16) and not INTERPRET:
        raise ValueError(f"the Triton attention kernel takes bf16 or fp16 inputs on GPU, got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256 or q.shape[-1] % 8 or v.shape[-1] % 8:
        raise ValueError(
            f"the Triton attention kernel takes head dims that are multiples of 8 up to 256, got q/k "
            f"{q.shape[-1]} and v {v.shape[-1]}"
        )
    out, lse = TritonAttention.apply(q, k, v, causal, scale, cu_seqlens, max_seqlen, window)
    if not return_lse:
        return out
    batch, seq_q, n_heads = q.shape[:3]
    return out, lse.view(n_heads, batch, seq_q).transpose(0, 1)


__all__ = ["triton_attention", "TritonAttention"]
