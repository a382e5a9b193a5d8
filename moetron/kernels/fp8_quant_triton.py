"""Triton kernels of the FP8 quantizers (1x128, transposed 1x128, both at once; 128x128 and its transpose)
and their launchers.

The semantics, argument checks and torch references are in moetron/kernels/fp8.py; the launchers here
assume checked arguments. The block-scaled GEMMs are in moetron/kernels/fp8_gemm_triton.py.

The quantizers are memory bound: each program loads a tile in fp32, takes the block amax, takes the
reciprocal of each block's scale with one IEEE division (`div_rn`: Triton's `/` is the approximate
`div.full.f32`, and the GPU tests demand bytes equal to torch's), multiplies every element by it and casts
with round-to-nearest-even, saturating (values are clamped to +-448 first, as in the reference). A division
per element instead (an IEEE division is a dozen instructions) made the dual quantizer compute-bound:
bench/results/fp8_quant_reciprocal.json. The transposing quantizer loads (128 tokens, BLOCK features) and
stores the transposed tile, so both its reads and its writes stay coalesced. The dual quantizer loads a (128 tokens,
128 features) tile once and writes both: the 1x128 row tiles (amax over the 128 features of each token) and
the transposed 128x1 tiles (amax over the 128 tokens of each feature), with the same helpers, so its bytes
equal those of the two separate kernels.

Under TRITON_INTERPRET=1 (CPU tests) one config is used; the interpreter's own fp32 -> e4m3 cast rounds
differently from the GPU's (tests/kernels/interpreted/test_fp8.py says how).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moetron.kernels.fp8 import AMAX_EPS, FP8_DTYPE, FP8_MAX, SCALE_BLOCK
from moetron.kernels.launch import FastLaunch, cdiv

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SB = tl.constexpr(SCALE_BLOCK)
_FP8_MAX = tl.constexpr(FP8_MAX)
_EPS = tl.constexpr(AMAX_EPS)
_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def _nan_max(a, b):
    """max(a, b), NaN if either is NaN (torch's max; Triton's default `maximum` returns the other operand)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along `axis` of fp32 x, NaN if any element is (a NaN must reach the GEMM, and the trainer's NaN
    guard): a reduction with _nan_max, the same instructions as tl.max's with the NaN flag. The interpreter runs a
    custom reduction element by element (a 60x slower test suite), so there the same result comes from an integer
    max over the bits: non-negative floats order as their bits do, and every NaN's bits lie above +inf's. (On
    sm_90 that form made the 4-warp configs spill registers: tests/kernels/test_fp8_fused_compile.py.)"""
    if _INTERPRET:
        return tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis).to(tl.float32, bitcast=True)
    return tl.reduce(tl.abs(x), axis, _nan_max)


@triton.jit
def _block_scale(amax, POW2: tl.constexpr):
    """fp32 scale of a block from its amax: max(amax, eps) / 448, rounded up to a power of two if POW2. A NaN
    amax stays NaN (0 after the power-of-two rounding, as in the reference)."""
    scale = tl.math.div_rn(_nan_max(amax, _EPS), tl.full(amax.shape, _FP8_MAX, tl.float32))
    if POW2:  # round up to a power of two: carry a non-zero mantissa into the exponent, then clear it
        bits = scale.to(tl.int32, bitcast=True)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _to_e4m3(x, scale):
    """x * (1 / scale) rounded to nearest-even e4m3; the reciprocal an IEEE division (as torch's), made once
    per scale (the caller's scale is per block, broadcast against x)."""
    inverse = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    q = x * inverse
    q = tl.minimum(
        tl.maximum(q, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL), _FP8_MAX, propagate_nan=tl.PropagateNan.ALL
    )
    return q.to(tl.float8e4nv)  # (a NaN stays NaN: e4m3's 0x7F)


def _quant_configs(kind: str) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK": 64}, num_warps=4)]
    blocks = (32, 64, 128) if kind == "rows" else (32, 64)
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in blocks for w in (4, 8)]


@triton.autotune(configs=_quant_configs("rows"), key=["K", "POW2"])
@triton.jit
def _quant_1x128_kernel(X, Q, S, M, K, stride_xm, stride_qm, stride_sm, POW2: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # BLOCK rows, one 128-column block
    r64 = rows.to(tl.int64)
    kb = tl.program_id(1)
    cols = kb * _SB + tl.arange(0, _SB)
    ok = (rows < M)[:, None]
    x = tl.load(X + r64[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)  # (BLOCK, 128)
    scale = _block_scale(_amax(x, 1), POW2)  # (BLOCK,)
    tl.store(Q + r64[:, None] * stride_qm + cols[None, :], _to_e4m3(x, scale[:, None]), mask=ok)
    tl.store(S + r64 * stride_sm + kb, scale, mask=rows < M)


@triton.autotune(configs=_quant_configs("t"), key=["K", "POW2"])
@triton.jit
def _quant_1x128_t_kernel(
    X, QT, ST, M, K, stride_xm, stride_qk, stride_sk, stride_sb, POW2: tl.constexpr, BLOCK: tl.constexpr
):
    mb = tl.program_id(0)
    rows = mb * _SB + tl.arange(0, _SB)  # 128 tokens: one scale block of the transposed output
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # BLOCK features
    x = tl.load(
        X + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
        mask=(rows < M)[:, None] & (cols < K)[None, :],
        other=0.0,
    ).to(tl.float32)  # (128, BLOCK); tokens past M read 0 and give the zero columns of qt
    scale = _block_scale(_amax(x, 0), POW2)  # (BLOCK,)
    qt = tl.trans(_to_e4m3(x, scale[None, :]))  # (BLOCK, 128)
    tl.store(QT + cols[:, None].to(tl.int64) * stride_qk + rows[None, :], qt, mask=(cols < K)[:, None])
    tl.store(ST + cols.to(tl.int64) * stride_sk + mb * stride_sb, scale, mask=cols < K)


@triton.autotune(configs=[triton.Config({}, num_warps=4 if INTERPRET else 8)], key=[])
@triton.jit
def _quant_128x128_kernel(
    W, Q, S, N, K, stride_we, stride_wn, stride_qe, stride_qn, stride_se, stride_sn,
    POW2: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """One 128x128 block (nb, kb) of expert e's weight W (E, N, K) -> its e4m3 codes and scale: into
    Q (E, N, K), S (E, N/128, K/128), or with TRANSPOSED into Q (E, K, N_pad), S (E, K/128, N_pad/128)
    (rows of W past N read 0 and give the zero padding columns). The transposed form is its own launch:
    one kernel storing the tile both ways wrote wrong bytes for fp32 weights on the H100 (Triton 3.6
    layout conversion of the fp8 tile), while each store alone is exact (tests/kernels/test_fp8_gpu.py)."""
    nb, kb, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = nb * _SB + tl.arange(0, _SB)
    cols = kb * _SB + tl.arange(0, _SB)
    ok = (rows < N)[:, None]
    r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
    w = tl.load(W + e * stride_we + r64[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = _block_scale(_amax(_amax(w, 1), 0), POW2)  # scalar
    if TRANSPOSED:  # as _quant_1x128_t_kernel: cast, transpose in registers, store K-major
        qt = tl.trans(_to_e4m3(w, scale))  # (128 of K, 128 of N)
        tl.store(Q + e * stride_qe + c64[:, None] * stride_qn + rows[None, :], qt)
        tl.store(S + e * stride_se + kb * stride_sn + nb, scale)
    else:
        tl.store(Q + e * stride_qe + r64[:, None] * stride_qn + cols[None, :], _to_e4m3(w, scale), mask=ok)
        tl.store(S + e * stride_se + nb * stride_sn + kb, scale)


def _dual_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16)]


@triton.jit
def _store_dual(
    x, mb, kb, M, Q, S, QT, ST, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb,
    POW2: tl.constexpr, TRANSPOSED: tl.constexpr = True,
):  # fmt: skip
    """Quantize one fp32 (128 tokens, 128 features) tile x, token block mb and feature block kb, both ways and store it: q/s, the 1x128 tiles along the features (as _quant_1x128_kernel), and qt/st, the
    transposed 128x1 tiles along the tokens (as _quant_1x128_t_kernel). Tokens past M must hold 0 in x: they
    are not stored in q and give qt's zero columns. Without TRANSPOSED only q/s. (Shared by the dual quantizer
    and the fused producers of fp8_swiglu_triton.py.)"""
    rows = mb * _SB + tl.arange(0, _SB)
    cols = kb * _SB + tl.arange(0, _SB)
    r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
    ok = rows < M
    scale = _block_scale(_amax(x, 1), POW2)  # (128,) per token
    tl.store(Q + r64[:, None] * stride_qm + cols[None, :], _to_e4m3(x, scale[:, None]), mask=ok[:, None])
    tl.store(S + r64 * stride_sm + kb, scale, mask=ok)
    if TRANSPOSED:
        scale_t = _block_scale(_amax(x, 0), POW2)  # (128,) per feature
        qt = tl.trans(_to_e4m3(x, scale_t[None, :]))  # (128 features, 128 tokens)
        tl.store(QT + c64[:, None] * stride_qk + rows[None, :], qt)
        tl.store(ST + c64 * stride_sk + mb * stride_sb, scale_t)


@triton.autotune(configs=_dual_configs(), key=["K", "POW2"])
@triton.jit
def _quant_1x128_dual_kernel(
    X, Q, S, QT, ST, M, K, stride_xm, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb, POW2: tl.constexpr
):
    mb, kb = tl.program_id(0), tl.program_id(1)
    rows = mb * _SB + tl.arange(0, _SB)  # 128 tokens: one scale block of qt
    cols = kb * _SB + tl.arange(0, _SB)  # 128 features: one scale block of q (K % 128 == 0)
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=(rows < M)[:, None], other=0.0)
    _store_dual(x.to(tl.float32), mb, kb, M, Q, S, QT, ST, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb, POW2)


# Launchers that skip Triton's per-call binding and tuning lookup once a signature has run (launch.py).
_launch_rows, _launch_t = FastLaunch(_quant_1x128_kernel), FastLaunch(_quant_1x128_t_kernel)
_launch_blocks, _launch_dual = FastLaunch(_quant_128x128_kernel), FastLaunch(_quant_1x128_dual_kernel)


def _empty(rows: int, cols: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(rows, cols, dtype=dtype, device=like.device)


def quantize_1x128_triton(x: torch.Tensor, pow2_scales: bool, out=None):
    """`out`: (q, s) to write into (the tests pass poisoned buffers)."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q, s = out or (_empty(m, k, FP8_DTYPE, x), _empty(m, k // SCALE_BLOCK, torch.float32, x))
    if m and k:
        grid = lambda meta: (cdiv(m, meta["BLOCK"]), k // SCALE_BLOCK)  # noqa: E731
        _launch_rows(grid, x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), POW2=pow2_scales)
    return q, s


def _token_block_major_scales(k: int, m_pad: int, like: torch.Tensor) -> torch.Tensor:
    """st (K, M_pad/128) of the transposed quantizers, stored as the transpose of a (M_pad/128, K) buffer: one
    token block's scales of consecutive features are adjacent, which is how the weight-gradient GEMM reads
    them (a K block's 128 column scales at a time)."""
    return _empty(m_pad // SCALE_BLOCK, k, torch.float32, like).t()


def quantize_1x128_t_triton(x: torch.Tensor, pow2_scales: bool, out=None):
    m, k = x.shape
    m_pad = cdiv(m, SCALE_BLOCK) * SCALE_BLOCK
    x = x if x.stride(1) == 1 else x.contiguous()
    qt, st = out or (_empty(k, m_pad, FP8_DTYPE, x), _token_block_major_scales(k, m_pad, x))
    if m and k:
        grid = lambda meta: (m_pad // SCALE_BLOCK, cdiv(k, meta["BLOCK"]))  # noqa: E731
        _launch_t(grid, x, qt, st, m, k, x.stride(0), qt.stride(0), *st.stride(), POW2=pow2_scales)
    return qt, st


def _launch_128x128(w3, q3, s3, pow2_scales: bool, transposed: bool):
    """w3 (E, N, K) into q3, s3 (E-leading, laid out as _quant_128x128_kernel's TRANSPOSED says)."""
    n_experts, n, k = w3.shape
    if n_experts and n and k:
        grid = (cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK, n_experts)
        _launch_blocks(
            grid, w3, q3, s3, n, k, w3.stride(0), w3.stride(1), q3.stride(0), q3.stride(1), s3.stride(0), s3.stride(1),
            POW2=pow2_scales, TRANSPOSED=transposed,
        )  # fmt: skip


def quantize_128x128_triton(w: torch.Tensor, pow2_scales: bool, out=None):
    n, k = w.shape
    w = w if w.stride(1) == 1 else w.contiguous()
    q, s = out or (_empty(n, k, FP8_DTYPE, w), _empty(cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK, torch.float32, w))
    _launch_128x128(w.unsqueeze(0), q.unsqueeze(0), s.unsqueeze(0), pow2_scales, transposed=False)
    return q, s


def quantize_128x128_dual_triton(w: torch.Tensor, pow2_scales: bool, out=None):
    """w (N, K) or (E, N, K) -> (q, s, qt, st) as fp8.quantize_128x128_dual. `out`: (q, s, qt, st) to write into;
    with qt, st None there only q, s are written (a weight whose input needs no gradient)."""
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    w3 = w3 if w3.stride(-1) == 1 else w3.contiguous()
    n_experts, n, k = w3.shape
    nb, kb = cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK

    def empty(*shape, dtype):
        return torch.empty(n_experts, *shape, dtype=dtype, device=w.device)

    q, s, qt, st = out or (
        empty(n, k, dtype=FP8_DTYPE),
        empty(nb, kb, dtype=torch.float32),
        empty(k, nb * SCALE_BLOCK, dtype=FP8_DTYPE),
        empty(kb, nb, dtype=torch.float32),
    )
    q3, s3, qt3, st3 = (t if t is None or t.dim() == 3 else t.unsqueeze(0) for t in (q, s, qt, st))
    _launch_128x128(w3, q3, s3, pow2_scales, transposed=False)
    if qt3 is not None:
        _launch_128x128(w3, qt3, st3, pow2_scales, transposed=True)
    if w.dim() == 2 and out is None:
        return q[0], s[0], qt[0], st[0]
    return q, s, qt, st


def dual_outputs(m: int, k: int, like: torch.Tensor, transposed: bool = True) -> tuple:
    """(q, s, qt, st) for the dual quantizer's store (_store_dual) of an (M, K) input: q (M, K) e4m3, s (M, K/128),
    and with `transposed` qt (K, M_pad) e4m3 and st (K, M_pad/128) token-block-major (else None, None)."""
    m_pad = cdiv(m, SCALE_BLOCK) * SCALE_BLOCK
    q, s = _empty(m, k, FP8_DTYPE, like), _empty(m, k // SCALE_BLOCK, torch.float32, like)
    if not transposed:
        return q, s, None, None
    return q, s, _empty(k, m_pad, FP8_DTYPE, like), _token_block_major_scales(k, m_pad, like)


def dual_store_args(q, s, qt, st) -> tuple[tuple, tuple]:
    """The arguments _store_dual's kernels take for these outputs: (Q, S, QT, ST) and (stride_qm, stride_sm,
    stride_qk, stride_sk, stride_sb). Without the transposed forms q and s stand in for them (the kernel, launched
    with TRANSPOSED=False, never touches them)."""
    if qt is None:
        return (q, s, q, s), (q.stride(0), s.stride(0), 0, 0, 0)
    return (q, s, qt, st), (q.stride(0), s.stride(0), qt.stride(0), *st.stride())


def quantize_1x128_dual_triton(x: torch.Tensor, pow2_scales: bool, out=None):
    """quantize_1x128_triton and quantize_1x128_t_triton of x (K % 128 == 0) from one read of x ->
    (q, s, qt, st). `out`: (q, s, qt, st) to write into."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q, s, qt, st = out or dual_outputs(m, k, x)
    if m and k:
        pointers, strides = dual_store_args(q, s, qt, st)
        grid = (cdiv(m, SCALE_BLOCK), k // SCALE_BLOCK)
        _launch_dual(grid, x, *pointers, m, k, x.stride(0), *strides, POW2=pow2_scales)
    return q, s, qt, st
