"""Triton kernels of the block-scaled FP8 GEMMs (dense, grouped, grouped weight-gradient) and their launchers.

The semantics, argument checks and torch references are in moetron/kernels/fp8.py; the launchers here
assume checked arguments.

C = A @ B^T with A and B K-major (the layout FP8 tensor cores take). One program per (BLOCK_M, BLOCK_N)
output tile walks K in 128-wide scale blocks. Each block is one FP8 `tl.dot` into a fresh fp32 partial
(the tensor core accumulates at reduced precision within the block), then
`acc += partial * (a_scale[:, None] * b_scale[None, :])` on the CUDA cores: DeepSeek-V3's promotion
(arXiv:2412.19437 §3.3.2). With PIPELINE the promotion of block k runs after block k+1's MMA is issued (the
same arithmetic in the same order), so the MMA can overlap it; the autotuner picks.

* On sm_90 the dense GEMM with weight-block b-scales and the grouped GEMM go to the warp-specialized Gluon
  kernels (moetron/kernels/fp8_gemm_gluon.py, measured 16-24% and 10-28% faster on the H100), and so does the
  weight-gradient forms, dense and grouped (1x128 b-scales stored token-block-major:
  moetron/kernels/fp8_wgrad_gluon.py, 15-34% faster); this kernel serves other GPUs, the interpreter, and
  MOETRON_FP8_GLUON=0.
* Tiles are walked in GROUP_M super-rows, so neighbouring programs share A and B tiles in L2.
* On Hopper (capability >= 9) operands load through host-side TMA descriptors (zero-filled out of bounds);
  elsewhere, and by default under TRITON_INTERPRET=1, through masked pointers.
* Grouped GEMM: persistent, one or two programs per SM, each striding over the output tiles. The row tiles
  are counted on the device from group_ends (segments: the E groups, then the rows past group_ends[-1],
  which get zeros; each segment ceil(rows / BLOCK_M) tiles), so no host sync reads the group sizes and no
  program idles on a worst-case grid; a row tile finds its segment by a cumulative sum of those counts.
* Weight gradient: grid (tiles of the (N, K) output, E); program e reduces over its group's tokens. Every
  group starts at a multiple of 128, so every token block is whole except the last group's last one,
  loaded with masked pointers (tokens past the group's end may hold any bytes, NaN included).

Under TRITON_INTERPRET=1 (CPU tests) fp8 operands are upcast to fp32 right after loading (UPCAST: the
interpreter's low-precision dot is wrong, ../shared/TESTING.md) and one config is used.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moetron.kernels.fp8 import SCALE_BLOCK, _capability
from moetron.kernels.launch import FastLaunch, cdiv, next_power_of_2

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SB = tl.constexpr(SCALE_BLOCK)


def _gemm_configs(kind: str) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages, PIPELINE). 64x128 with 4 warps lets two programs share an SM (one's
    promotion overlaps the other's MMA); 128x128 with 8 warps is two consumer warpgroups of 64 rows; the
    16-warp 128x256 / 256x128 tiles keep each warpgroup at 64x128 (partial + accumulator in registers)."""
    if INTERPRET:
        config = {"BLOCK_M": 64, "BLOCK_N": 128, "PIPELINE": False}
        return [triton.Config(config, num_warps=4, num_stages=1, pre_hook=_set_tma_blocks)]
    shapes = [
        (128, 128, 8, 3, False), (128, 128, 8, 4, False), (128, 128, 8, 3, True), (128, 128, 8, 4, True),
        (64, 128, 4, 4, False), (64, 128, 4, 4, True), (128, 256, 16, 3, False), (256, 128, 16, 3, False),
    ]  # fmt: skip
    if kind == "wgrad":  # (N, K) weight-sized outputs have tiles enough for every SM at 128x128
        shapes = [s for s in shapes if s[1] <= 128]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "PIPELINE": p}, num_warps=w, num_stages=st, pre_hook=_set_tma_blocks)
        for m, n, w, st, p in shapes
    ]


def _set_tma_blocks(nargs):
    """The host-side TMA descriptors' box is the tile of the config being run."""
    if nargs["USE_TMA"]:
        nargs["A_DESC"].block_shape = [nargs["BLOCK_M"], SCALE_BLOCK]
        nargs["B_DESC"].block_shape = [nargs["BLOCK_N"], SCALE_BLOCK]


@triton.jit
def _swizzle(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), walking GROUP_M row tiles down each column before moving right."""
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _mainloop(
    acc, A, A_DESC, B, B_DESC, AS, BS, a_row0, b_row0, offs_m, m_ok, offs_n, n_ok, n0, kb_lo, kb_hi,
    stride_a, stride_b, stride_as, stride_ask, stride_bs, stride_bsk,
    B_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, PIPELINE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """acc += sum over K blocks kb in [kb_lo, kb_hi) of dot(A_kb, B_kb^T) * a_scale[:, kb] * b_scale[:, kb]^T.

    A rows offs_m (TMA: first row a_row0), B rows offs_n (the first, n0, is b_row0 for TMA), K-major; rows not
    ok read 0 on the pointer path (TMA reads them, or zeros past the tensor: they are never stored). B_ROWS rows
    of B share a scale (128 for weight blocks, 1 for 1x128 tiles): one scalar per block when the whole tile
    lies in one weight block. Scale strides: rows (stride_as, stride_bs) and K blocks (stride_ask, stride_bsk;
    quantize_1x128_t's scales are stored K-block-major, so a block's scales of consecutive rows are adjacent)."""
    offs_k = tl.arange(0, _SB)
    if not USE_TMA:
        a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_a + offs_k[None, :]  # (BLOCK_M, 128) at kb = 0
        b_ptrs = B + offs_n[:, None].to(tl.int64) * stride_b + offs_k[None, :]  # (BLOCK_N, 128)
    as_ptrs = AS + offs_m * stride_as  # (BLOCK_M,)
    SCALAR_SB: tl.constexpr = B_ROWS % BLOCK_N == 0
    if SCALAR_SB:
        bs_ptrs = BS + (n0 // B_ROWS) * stride_bs  # n0 is a multiple of BLOCK_N
        sb_prev = tl.zeros([], tl.float32)
    else:
        bs_ptrs = BS + (offs_n // B_ROWS) * stride_bs  # (BLOCK_N,)
        sb_prev = tl.zeros([1, BLOCK_N], tl.float32)
    part_prev = tl.zeros(acc.shape, tl.float32)
    sa_prev = tl.zeros([acc.shape[0], 1], tl.float32)
    for kb in range(kb_lo, kb_hi):
        if USE_TMA:
            a = A_DESC.load([a_row0, kb * _SB])
            b = B_DESC.load([b_row0, kb * _SB])
        else:
            a = tl.load(a_ptrs + kb * _SB, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs + kb * _SB, mask=n_ok[:, None], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        part = tl.dot(a, tl.trans(b))  # (BLOCK_M, BLOCK_N) fp32: one scale block on the tensor cores
        sa = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)[:, None]
        if SCALAR_SB:
            sb = tl.load(bs_ptrs + kb * stride_bsk)
        else:
            sb = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)[None, :]
        if PIPELINE:  # promote the previous block while this block's MMA runs (the first adds 0 * 0)
            acc += part_prev * (sa_prev * sb_prev)
            part_prev, sa_prev, sb_prev = part, sa, sb
        else:
            acc += part * (sa * sb)
    if PIPELINE:
        acc += part_prev * (sa_prev * sb_prev)
    return acc


@triton.autotune(configs=_gemm_configs("gemm"), key=["M_BUCKET", "N", "K", "B_ROWS", "USE_TMA"])
@triton.jit
def _gemm_kernel(
    A, A_DESC, B, B_DESC, AS, BS, C, M, N, K, M_BUCKET, stride_a, stride_b, stride_as, stride_ask, stride_bs, stride_bsk,
    stride_c,
    B_ROWS: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr, GROUP_M: tl.constexpr = 8,
):  # fmt: skip
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    offs_m, offs_n = m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = _mainloop(
        tl.zeros([BLOCK_M, BLOCK_N], tl.float32), A, A_DESC, B, B_DESC, AS, BS, m0, n0, offs_m, m_ok, offs_n, n_ok, n0,
        0, K // _SB, stride_a, stride_b, stride_as, stride_ask, stride_bs, stride_bsk, B_ROWS, BLOCK_N, USE_TMA,
        PIPELINE, UPCAST,
    )  # fmt: skip
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _segments(GE, E, M, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per segment j (0..E-1 the groups, E the rows past group_ends[-1], beyond that empty): first row, end row,
    row tiles, and the running tile count; (BLOCK_E,) vectors."""
    j = tl.arange(0, BLOCK_E)
    ends = tl.load(GE + j, mask=j < E, other=M).to(tl.int32)
    starts = tl.load(GE + j - 1, mask=(j >= 1) & (j <= E), other=0).to(tl.int32)
    starts = tl.where(j <= E, starts, M)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    return starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.autotune(configs=_gemm_configs("grouped"), key=["M_BUCKET", "N", "K", "E", "USE_TMA"])
@triton.jit
def _grouped_gemm_kernel(
    A, A_DESC, B, B_DESC, AS, BS, C, GE, M, N, K, E, M_BUCKET,
    stride_a, stride_b, stride_as, stride_bse, stride_bs, stride_c,
    BLOCK_E: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr, GROUP_M: tl.constexpr = 8,
):  # fmt: skip
    """Persistent: program p computes output tiles p, p + P, ... of the (row tile, column tile) grid, whose
    row tiles are counted on the device from group_ends (no host sync)."""
    j = tl.arange(0, BLOCK_E)
    starts, ends, tiles, cum_tiles = _segments(GE, E, M, BLOCK_M, BLOCK_E)
    n_m, n_n = tl.sum(tiles, 0), tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), n_m * n_n, tl.num_programs(0)):
        t, pid_n = _swizzle(tile, n_m, n_n, GROUP_M)
        seg = tl.sum((cum_tiles <= t).to(tl.int32), 0)  # the segment holding row tile t
        m0 = tl.sum(tl.where(j == seg, starts, 0), 0) + (t - tl.sum(tl.where(j < seg, tiles, 0), 0)) * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m, offs_n = m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)
        m_ok, n_ok = offs_m < tl.sum(tl.where(j == seg, ends, 0), 0), offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # rows past the last group (seg == E) get these zeros
        if seg < E:
            # B is (E * N, K): expert seg's rows start at seg * N; a tile's rows past N (the next expert's, or
            # zeros past the tensor on the TMA path) are never stored. The pointer path offsets B instead.
            acc = _mainloop(
                acc, A, A_DESC, B + seg.to(tl.int64) * N * stride_b, B_DESC, AS, BS + seg * stride_bse,
                m0, seg * N + n0, offs_m, m_ok, offs_n, n_ok, n0, 0, K // _SB,
                stride_a, stride_b, stride_as, 1, stride_bs, 1, 128, BLOCK_N, USE_TMA, PIPELINE, UPCAST,
            )  # fmt: skip
        c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_gemm_configs("wgrad"), key=["N", "K", "E", "USE_TMA"])
@triton.jit
def _wgrad_kernel(
    A, A_DESC, B, B_DESC, AS, BS, C, GE, N, K, E,
    stride_a, stride_b, stride_as, stride_ask, stride_bs, stride_bsk, stride_ce, stride_c,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr, GROUP_M: tl.constexpr = 8,
):  # fmt: skip
    # out[e] (N, K): rows from A = a_t (N, M_pad), columns from B = b_t (K, M_pad), reduced over e's tokens
    e = tl.program_id(1)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    start = tl.load(GE + e - 1, mask=e > 0, other=0).to(tl.int32)
    end = tl.maximum(start, tl.load(GE + e).to(tl.int32))
    m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    offs_m, offs_n = m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < N, offs_n < K
    kb_full = end // _SB  # token blocks [start / 128, kb_full) are whole: groups start on block boundaries
    acc = _mainloop(
        tl.zeros([BLOCK_M, BLOCK_N], tl.float32), A, A_DESC, B, B_DESC, AS, BS, m0, n0, offs_m, m_ok, offs_n, n_ok, n0,
        start // _SB, kb_full, stride_a, stride_b, stride_as, stride_ask, stride_bs, stride_bsk, 1, BLOCK_N, USE_TMA,
        PIPELINE, UPCAST,
    )  # fmt: skip
    if end % _SB != 0:  # the last group's partial block, masked: tokens past `end` may hold any bytes
        cols = kb_full * _SB + tl.arange(0, _SB)
        k_ok = (cols < end)[None, :]
        a = tl.load(A + offs_m[:, None].to(tl.int64) * stride_a + cols[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
        b = tl.load(B + offs_n[:, None].to(tl.int64) * stride_b + cols[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        sa = tl.load(AS + offs_m * stride_as + kb_full * stride_ask, mask=m_ok, other=0.0)
        sb = tl.load(BS + offs_n * stride_bs + kb_full * stride_bsk, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
    c_ptrs = C + e.to(tl.int64) * stride_ce + offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers
# Launchers that skip Triton's per-call binding and tuning lookup once a signature has run (launch.py).
_launch_gemm, _launch_grouped, _launch_wgrad = map(FastLaunch, (_gemm_kernel, _grouped_gemm_kernel, _wgrad_kernel))


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Hopper TMA: 16-byte aligned bases and row strides (the fp8 operands are (rows, multiple of 128))."""
    t = tensors[0]
    if INTERPRET or not t.is_cuda or _capability(t.device.index) < (9, 0):
        return False
    return all(x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0 and x.stride(-1) == 1 for x in tensors)


def _descs(a2: torch.Tensor, b2: torch.Tensor, use_tma: bool):
    """Host-side TMA descriptors of the 2-D operands (box set per config by _set_tma_blocks), or the tensors."""
    if not use_tma:
        return a2, b2
    return TensorDescriptor.from_tensor(a2, [64, SCALE_BLOCK]), TensorDescriptor.from_tensor(b2, [64, SCALE_BLOCK])


def _rows(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Unit stride along the last dim: what the kernels need of the operands (and of the grouped GEMM's and the
    Gluon kernel's scales; the dense and weight-gradient Triton kernels take any scale strides)."""
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _persistent_programs(device, m: int, n: int, n_groups: int, meta) -> int:
    """Programs of the persistent grouped GEMM: enough to fill every SM (two per SM for the small tiles that
    fit twice), never more than the worst-case tile count (every group adds a partial row tile)."""
    tiles = (cdiv(m, meta["BLOCK_M"]) + n_groups) * cdiv(n, meta["BLOCK_N"])
    if INTERPRET:
        return min(tiles, 4)  # a few programs, each walking several tiles
    per_sm = 2 if meta["BLOCK_M"] * meta["BLOCK_N"] <= 64 * 128 else 1
    return min(tiles, per_sm * _sm_count(device))


@functools.cache
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bucket(m: int) -> int:
    """Autotuning key for a token count: configs are re-tuned per power of two, not per value."""
    return next_power_of_2(max(m, 1))


def _gluon_ok(c: torch.Tensor) -> bool:
    """For TMA-able operands: the warp-specialized Gluon kernel (moetron/kernels/fp8_gemm_gluon.py) runs on
    sm_90 (wgmma) into c, unless MOETRON_FP8_GLUON=0."""
    if os.environ.get("MOETRON_FP8_GLUON", "1") == "0" or _capability(c.device.index) != (9, 0):
        return False
    return c.stride(-1) == 1 and c.dtype in (torch.bfloat16, torch.float16, torch.float32)


def fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype, *, tma: bool | None = None, gluon: bool | None = None, out=None):
    """`tma`, `gluon`: force the operand path / the Gluon kernel on or off (tests); None picks."""
    (m, k), n = a.shape, b.shape[0]
    a, b = _rows(a, b)
    c = torch.empty(m, n, dtype=out_dtype, device=a.device) if out is None else out
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    b_rows = 1 if b_scale.shape[0] == n else SCALE_BLOCK  # per-row scales when both forms agree (N = 1)
    use_tma = _tma_ok(a, b) if tma is None else tma
    if gluon is None:  # picked only when no operand path was forced
        gluon = tma is None and use_tma and _gluon_ok(c)
    if gluon and b_rows == SCALE_BLOCK:
        from moetron.kernels.fp8_gemm_gluon import fp8_gemm_gluon

        return fp8_gemm_gluon(a, *_rows(a_scale), b, *_rows(b_scale), c)  # (unit K-block strides of the scales)
    if gluon:  # 1x128 b-scales: the weight-gradient GEMM, for scales stored as quantize_1x128_t stores them
        from moetron.kernels.fp8_wgrad_gluon import fp8_wgrad_gluon, wgrad_ok

        if wgrad_ok(a_scale, b_scale):
            return fp8_wgrad_gluon(a, a_scale, b, b_scale, c)
    a_desc, b_desc = _descs(a, b, use_tma)
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch_gemm(
        grid, a, a_desc, b, b_desc, a_scale, b_scale, c, m, n, k, _bucket(m), a.stride(0), b.stride(0),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), c.stride(0),
        B_ROWS=b_rows, USE_TMA=use_tma, UPCAST=INTERPRET,
    )  # fmt: skip
    return c


def fp8_grouped_gemm_triton(
    a, a_scale, b, b_scale, group_ends, out_dtype, *, tma: bool | None = None, gluon: bool | None = None, out=None
):
    """`tma`, `gluon`: force the operand path / the Gluon kernel on or off (tests); None picks."""
    (m, k), (n_groups, n) = a.shape, b.shape[:2]
    a, a_scale, b_scale = _rows(a, a_scale, b_scale)
    b = b.contiguous()  # viewed as (E * N, K)
    c = torch.empty(m, n, dtype=out_dtype, device=a.device) if out is None else out
    if m == 0 or n == 0:
        return c
    if n_groups == 0 or k == 0:
        return c.zero_()
    b2 = b.view(n_groups * n, k)  # (E * N, K)
    use_tma = _tma_ok(a, b2) if tma is None else tma
    if gluon is None:  # picked only when no operand path was forced
        gluon = tma is None and use_tma and _gluon_ok(c)
    if gluon:
        from moetron.kernels.fp8_gemm_gluon import fp8_gemm_gluon

        return fp8_gemm_gluon(a, a_scale, b, b_scale, c, group_ends)
    a_desc, b_desc = _descs(a, b2, use_tma)
    grid = lambda meta: (_persistent_programs(a.device, m, n, n_groups, meta),)  # noqa: E731
    _launch_grouped(
        grid, a, a_desc, b2, b_desc, a_scale, b_scale, c, group_ends, m, n, k, n_groups, _bucket(m),
        a.stride(0), b2.stride(0), a_scale.stride(0), b_scale.stride(0), b_scale.stride(1), c.stride(0),
        BLOCK_E=next_power_of_2(n_groups + 1), USE_TMA=use_tma, UPCAST=INTERPRET,
    )  # fmt: skip
    return c


def fp8_grouped_gemm_wgrad_triton(
    a_t,
    a_t_scale,
    b_t,
    b_t_scale,
    group_ends,
    out_dtype,
    *,
    tma: bool | None = None,
    gluon: bool | None = None,
    out=None,
):
    """`tma`, `gluon`: force the operand path / the Gluon kernel on or off (tests); None picks."""
    (n, m_pad), k, n_groups = a_t.shape, b_t.shape[0], group_ends.shape[0]
    a_t, b_t = _rows(a_t, b_t)
    c = torch.empty(n_groups, n, k, dtype=out_dtype, device=a_t.device) if out is None else out
    if n_groups == 0 or n == 0 or k == 0:
        return c
    if m_pad == 0:
        return c.zero_()
    use_tma = _tma_ok(a_t, b_t) if tma is None else tma
    if gluon is None:  # picked only when no operand path was forced
        gluon = tma is None and use_tma and _gluon_ok(c) and c.is_contiguous()
    if gluon:
        from moetron.kernels.fp8_wgrad_gluon import fp8_wgrad_gluon, wgrad_ok

        if wgrad_ok(a_t_scale, b_t_scale):
            return fp8_wgrad_gluon(a_t, a_t_scale, b_t, b_t_scale, c, group_ends=group_ends)
    a_desc, b_desc = _descs(a_t, b_t, use_tma)
    grid = lambda meta: (cdiv(n, meta["BLOCK_M"]) * cdiv(k, meta["BLOCK_N"]), n_groups)  # noqa: E731
    _launch_wgrad(
        grid, a_t, a_desc, b_t, b_desc, a_t_scale, b_t_scale, c, group_ends, n, k, n_groups,
        a_t.stride(0), b_t.stride(0), a_t_scale.stride(0), a_t_scale.stride(1), b_t_scale.stride(0),
        b_t_scale.stride(1), c.stride(0), c.stride(1),
        USE_TMA=use_tma, UPCAST=INTERPRET,
    )  # fmt: skip
    return c
