"""Triton kernels of RMSNorm fused with FP8 quantization, and their launchers.

The semantics, argument checks and torch references are in moetron/kernels/fp8_norm.py; the launchers here
assume checked arguments.

* `_rstd_kernel`: rstd = 1 / sqrt(mean(x^2) + eps) per row, BLOCK_M rows a program, the row in 128-wide chunks.
* `_norm_quant_kernel`: one program per (128 tokens, 128 features) tile: x * rstd * w in fp32, handed to the dual
  quantizer's store (fp8_quant_triton._store_dual): the 1x128 tiles the projection's forward GEMM reads and, when
  its weight gradient is wanted, the transposed tiles along the tokens. A 1x128 tile needs only its row's rstd,
  but a transposed tile needs 128 rows' worth, each over the whole row: hence the rstd pass first (two reads of
  x in all, against the unfused norm's several passes plus the quantizer's read of its output).
* `_norm_backward_kernel`: dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w and xhat = x * rstd, BLOCK_M rows
  a program, two passes over each row (the mean, then dx); each program also sums dy * xhat over its rows into
  one row of a (programs, D) fp32 buffer, which the launcher reduces to dw.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetron.kernels.fp8 import SCALE_BLOCK
from moetron.kernels.fp8_quant_triton import INTERPRET, _store_dual, dual_outputs, dual_store_args
from moetron.kernels.launch import FastLaunch, cdiv

_SB = tl.constexpr(SCALE_BLOCK)


def _row_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (8, 16, 32) for w in (4, 8)]


@triton.autotune(configs=_row_configs(), key=["D"])
@triton.jit
def _rstd_kernel(X, RSTD, M, D, eps, stride_xm, BLOCK_M: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ok = (rows < M)[:, None]
    squares = tl.zeros([BLOCK_M, _SB], tl.float32)
    for d0 in range(0, D, _SB):  # D % 128 == 0
        cols = d0 + tl.arange(0, _SB)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        squares += x * x
    # an IEEE square root, then Triton's `/` (the approximate division, within 2 ulp): rstd is within a few ulp of
    # torch's rsqrt, not byte-equal (the GPU tests allow 1e-6 relative)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(squares, 1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in ((4,) if INTERPRET else (4, 8))], key=["D", "POW2", "TRANSPOSED"]
)
@triton.jit
def _norm_quant_kernel(
    X, W, RSTD, Q, S, QT, ST, M, D, stride_xm, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb,
    POW2: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    mb, db = tl.program_id(0), tl.program_id(1)
    rows = mb * _SB + tl.arange(0, _SB)
    cols = db * _SB + tl.arange(0, _SB)
    ok = rows < M
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=ok[:, None], other=0.0)
    rstd = tl.load(RSTD + rows, mask=ok, other=0.0)  # (tokens past M: 0, as _store_dual needs)
    w = tl.load(W + cols).to(tl.float32)
    h = x.to(tl.float32) * rstd[:, None] * w[None, :]
    _store_dual(h, mb, db, M, Q, S, QT, ST, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb, POW2, TRANSPOSED)


_BACKWARD_ROWS = 16 if INTERPRET else 32  # rows per backward program (fixed: it sizes the partial-dw buffer)


@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in ((4,) if INTERPRET else (4, 8))], key=["D"])
@triton.jit
def _norm_backward_kernel(
    X, W, RSTD, DY, DX, DW_PART, M, D, stride_xm, stride_dym, stride_dxm, BLOCK_M: tl.constexpr
):  # fmt: skip
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ok = (rows < M)[:, None]
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    dot = tl.zeros([BLOCK_M, _SB], tl.float32)  # sum over the row of g * xhat, in 128 lanes
    for d0 in range(0, D, _SB):
        cols = d0 + tl.arange(0, _SB)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols).to(tl.float32)
        dot += dy * w[None, :] * (x * rstd[:, None])
    mean = tl.sum(dot, 1) / D  # (BLOCK_M,)
    for d0 in range(0, D, _SB):
        cols = d0 + tl.arange(0, _SB)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols).to(tl.float32)
        xhat = x * rstd[:, None]
        dx = rstd[:, None] * (dy * w[None, :] - xhat * mean[:, None])
        tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        tl.store(DW_PART + pid * D + cols, tl.sum(dy * xhat, 0))


_launch_rstd, _launch_quant = FastLaunch(_rstd_kernel), FastLaunch(_norm_quant_kernel)
_launch_backward = FastLaunch(_norm_backward_kernel)


def rmsnorm_quantize_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, pow2_scales: bool, transposed: bool):
    """x (M, D), weight (D,) -> (q, s, qt, st, rstd) as fp8_norm.rmsnorm_quantize; qt, st None without
    `transposed`."""
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight.contiguous()
    m, d = x.shape
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    q, s, qt, st = dual_outputs(m, d, x, transposed)
    if m and d:
        _launch_rstd(lambda meta: (cdiv(m, meta["BLOCK_M"]),), x, rstd, m, d, float(eps), x.stride(0))
        pointers, strides = dual_store_args(q, s, qt, st)
        _launch_quant(
            (cdiv(m, SCALE_BLOCK), d // SCALE_BLOCK), x, weight, rstd, *pointers, m, d, x.stride(0), *strides,
            POW2=pow2_scales, TRANSPOSED=transposed,
        )  # fmt: skip
    return q, s, qt, st, rstd


def rmsnorm_backward_triton(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    """(dx in x's dtype, dweight in weight's dtype) as fp8_norm.rmsnorm_backward."""
    x = x if x.stride(1) == 1 else x.contiguous()
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    weight, rstd = weight.contiguous(), rstd.float().contiguous()  # (the kernel reads rstd without a stride)
    m, d = x.shape
    dx = torch.empty(m, d, dtype=x.dtype, device=x.device)
    if not (m and d):
        return dx, torch.zeros_like(weight)
    programs = cdiv(m, _BACKWARD_ROWS)
    parts = torch.empty(programs, d, dtype=torch.float32, device=x.device)  # each program's sum of dy * xhat
    _launch_backward(
        (programs,), x, weight, rstd, dy, dx, parts, m, d, x.stride(0), dy.stride(0), dx.stride(0),
        BLOCK_M=_BACKWARD_ROWS,
    )  # fmt: skip
    return dx, parts.sum(0).to(weight.dtype)


__all__ = ["rmsnorm_backward_triton", "rmsnorm_quantize_triton"]
