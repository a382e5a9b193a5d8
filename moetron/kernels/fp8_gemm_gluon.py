"""Warp-specialized block-scaled FP8 GEMMs for Hopper (sm_90), dense and grouped, in Gluon (Triton 3.6's
explicit-layout dialect).

C (M, N) = sum over 128-wide K blocks kb of (A_kb @ B_kb^T) * a_scale[:, kb, None] * b_scale[n // 128, kb]:
the same arithmetic as fp8_gemm's Triton kernel (moetron/kernels/fp8_gemm_triton.py) for the weight-block
form of B's scales (the forward and the input-gradient GEMMs of the FP8 layers); the grouped kernel does
it per expert, for the rows of that expert's group, against B[e] (the MoE expert GEMMs, fp8_grouped_gemm).
The torch references and the argument checks are in moetron/kernels/fp8.py.

Why a second kernel: Triton 3.6 cannot warp-specialize the Triton kernel's loop on Hopper, and without it
the promotion `acc += partial * scale` of K block kb waits for that block's MMA, so tensor cores and CUDA
cores take turns. Here each program is split into partitions that run concurrently on the SM:

* a loader (1 warp): TMA copies of the A and B tiles of every K block into a STAGES-deep ring of shared
  memory; `ready[s]` completes when stage s has landed, the loader waits on `empty[s]` before refilling it;
* three consumer warpgroups (4 warps each), each owning 64 rows of the 192 x 128 output tile: wait for
  `ready[s]`, one async wgmma of its rows of stage s into a fresh fp32 partial, wait for it, release the
  stage (`empty[s]` completes after all three released it), promote the partial into its accumulator.

The three warpgroups drift apart, so one's promotion overlaps another's MMA, and the loader runs STAGES
blocks ahead. The scales of block kb + 1 are loaded into registers during block kb (their global-memory
latency hides behind a whole iteration). Tiles are visited in GROUP_M super-rows, so neighbouring
programs share A and B tiles in L2. 16-bit outputs leave through shared memory and a TMA store (it clips
rows past M and columns past N); fp32 outputs (3 x 32 KB of staging would not fit next to the ring) with
masked stores.

Grouped: a program first finds its tile on the device (_grouped_tile: row tiles per group from group_ends,
no host sync), then runs the same partitions. A tile's 64-row slices that run past their group's end (into
the next group's rows) store through masked stores, the others through TMA.

Measured on the H100 (bench/results/fp8_gluon_variants_experiment.json): 192 x 128 tiles with three
consumer warpgroups beat 128 x 128 with two (less L2 -> shared-memory traffic per FLOP), a persistent
variant and 128 x 256 tiles (whose two partials spill registers).

GPU only: Gluon has no interpreter mode; the Triton kernel serves TRITON_INTERPRET=1 and other GPUs.
tests/kernels/test_fp8_gluon.py compiles this kernel for sm_90a on the CPU (Triton ships ptxas).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

WG_ROWS = 64  # output rows per consumer warpgroup: one m64 wgmma
N_CONSUMERS = 3  # consumer warpgroups: BLOCK_M = 192
BLOCK_M = WG_ROWS * N_CONSUMERS
BLOCK_N = 128  # one weight scale block wide: one scalar b-scale per tile and K block
BLOCK_K = 128  # one scale block: one wgmma group per promotion
STAGES = 4  # 4 x (3 x 8 + 16) KB ring + 3 x 16 KB output staging = 208 KB of shared memory
GROUP_M = 8
CONSUMER_REGS = 160  # per thread: 64 accumulator + 64 partial + addresses; 168 left for the default partition
LOADER_REGS = 24
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@gluon.jit
def _tile(pid, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles down each column first (L2 reuse)."""
    n_m, n_n = gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    rows = gl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _grouped_tile(GE, E, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                  BLOCK_E: gl.constexpr):  # fmt: skip
    """Program id -> (live, segment, first row, end row, first column) of its grouped output tile.

    Segments: the E groups of rows, then the rows past group_ends[-1] (segment E, which gets zeros); segment j
    has ceil(rows_j / BLOCK_M) row tiles. The count is made here, on the device, from group_ends (no host sync
    reads the group sizes); programs past the tile count (the grid is sized for the worst case) are not live."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    j = gl.arange(0, BLOCK_E, layout=layout)
    ends = gl.load(GE + j, mask=j < E, other=M).to(gl.int32)
    starts = gl.load(GE + j - 1, mask=(j >= 1) & (j <= E), other=0).to(gl.int32)
    starts = gl.where(j <= E, starts, M)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # (BLOCK_E,) row tiles per segment
    first_tile = gl.associative_scan(tiles, 0, _add) - tiles  # (BLOCK_E,) of each segment's first row tile
    n_m, n_n = gl.sum(tiles, 0), gl.cdiv(N, BLOCK_N)
    pid = gl.program_id(0)
    live = pid < n_m * n_n
    t, tn = _tile(gl.minimum(pid, n_m * n_n - 1), n_m * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    seg = gl.sum((first_tile + tiles <= t).to(gl.int32), 0)  # the segment holding row tile t
    here = j == seg
    m0 = gl.sum(gl.where(here, starts + (t - first_tile) * BLOCK_M, 0), 0)
    return live, seg, m0, gl.sum(gl.where(here, ends, 0), 0), tn * BLOCK_N


@gluon.jit
def _loader(a_desc, b_desc, a_ring, b_ring, ready, empty, m0, b_row0, k_blocks, STAGES: gl.constexpr):
    """Producer partition: stage s of K block kb holds A rows [m0, m0 + 192) as three 64-row boxes and B rows
    [b_row0, b_row0 + 128); TMA zero-fills what lies past the tensors."""
    WG_ROWS: gl.constexpr = a_desc.block_type.shape[0]
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    for kb in range(k_blocks):
        s = kb % STAGES
        mbarrier.wait(empty.index(s), ((kb // STAGES) & 1) ^ 1)  # the first lap finds every stage free
        mbarrier.expect(ready.index(s), PARTS * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        for j in gl.static_range(PARTS):
            tma.async_copy_global_to_shared(
                a_desc, [m0 + j * WG_ROWS, kb * BLOCK_K], ready.index(s), a_ring.index(s * PARTS + j)
            )
        tma.async_copy_global_to_shared(b_desc, [b_row0, kb * BLOCK_K], ready.index(s), b_ring.index(s))


@gluon.jit
def _consumer(
    a_ring, b_ring, ready, empty, c_desc, C, AS, bs_ptr, M, N, m0, n0, row_end, k_blocks, stride_cm, stride_as,
    WG: gl.constexpr, STAGES: gl.constexpr, TMA_STORE: gl.constexpr,
):  # fmt: skip
    """Consumer partition WG: rows [m0 + 64 WG, m0 + 64 WG + 64) of the tile, all of its 128 columns; rows from
    row_end on are computed (from whatever A holds there) but never stored. bs_ptr: the tile's weight scales."""
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    ROWS: gl.constexpr = a_ring.shape[1]
    BLOCK_N: gl.constexpr = b_ring.shape[1]
    # wgmma accumulator layout of a 64 x 128 fp32 tile over one warpgroup (fp8: k = 32 per instruction)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    row0 = m0 + WG * ROWS
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))  # (64,)
    row_ok = rows < row_end
    as_ptrs = AS + rows * stride_as  # (64,) this K block's a-scales: as_ptrs + kb
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)  # (not read: use_acc=False)
    acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
    sa_next = gl.load(as_ptrs, mask=row_ok, other=0.0)
    sb_next = gl.load(bs_ptr)
    for kb in range(k_blocks):
        sa, sb = sa_next, sb_next
        following = gl.minimum(kb + 1, k_blocks - 1)  # prefetch block kb + 1's scales (the last re-reads)
        sa_next = gl.load(as_ptrs + following, mask=row_ok, other=0.0)
        sb_next = gl.load(bs_ptr + following)
        s = kb % STAGES
        mbarrier.wait(ready.index(s), (kb // STAGES) & 1)
        a = a_ring.index(s * PARTS + WG)  # (64, 128) e4m3, this warpgroup's rows
        partial = warpgroup_mma(a, b_ring.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))  # (64, 128) fp32, one K block
        mbarrier.arrive(empty.index(s))  # this warpgroup is done reading stage s
        acc += partial * (sa * sb)[:, None]  # promotion on the CUDA cores
    if TMA_STORE:
        # A TMA store clips only at the tensor's end: it serves the rows when all 64 are ours or ours run to M.
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        whole = (row0 + ROWS <= row_end) | (row_end == M)
        if whole:  # (Triton 3.6 fails to compile an allocation inside the branch, or an else branch)
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row0, n0], c_smem)  # clipped at M, N
            tma.store_wait(pendings=0)
        _masked_store(acc, C, rows, row_ok & ~whole, n0, N, stride_cm)  # (the rows TMA did not store)
    else:
        _masked_store(acc, C, rows, row_ok, n0, N, stride_cm)


@gluon.jit
def _masked_store(acc, C, rows, row_ok, n0, N, stride_cm):
    """acc (64, 128) -> C[rows, n0:n0 + 128], the rows row_ok and the columns < N only."""
    cols = n0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    ptrs = C + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
    gl.store(ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@gluon.jit
def _warp_specialized(
    a_desc, b_desc, c_desc, C, AS, bs_ptr, M, N, m0, n0, b_row0, row_end, k_blocks, stride_cm, stride_as,
    STAGES: gl.constexpr, TMA_STORE: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """One 192 x 128 output tile: three consumer warpgroups (the default partition is the first) and a loader
    warp sharing a STAGES-deep shared-memory ring of A and B tiles."""
    PARTS: gl.constexpr = 3  # consumer warpgroups: the three partitions below (N_CONSUMERS on the host)
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES * PARTS] + a_desc.block_type.shape, a_desc.layout)
    b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the loader's expect; completes when the bytes have landed
        mbarrier.init(empty.index(s), count=PARTS)  # one arrival per consumer warpgroup
    gl.warp_specialize(
        [
            (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, bs_ptr, M, N, m0, n0, row_end, k_blocks,
                         stride_cm, stride_as, 0, STAGES, TMA_STORE)),
            (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, bs_ptr, M, N, m0, n0, row_end, k_blocks,
                         stride_cm, stride_as, 1, STAGES, TMA_STORE)),
            (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, bs_ptr, M, N, m0, n0, row_end, k_blocks,
                         stride_cm, stride_as, 2, STAGES, TMA_STORE)),
            (_loader, (a_desc, b_desc, a_ring, b_ring, ready, empty, m0, b_row0, k_blocks, STAGES)),
        ],
        [4, 4, 1],
        [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS],
    )  # fmt: skip


@gluon.jit
def _fp8_gemm_ws_kernel(
    a_desc, b_desc, c_desc, C, AS, BS, M, N, K, stride_cm, stride_as, stride_bs,
    STAGES: gl.constexpr, GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """One 192 x 128 tile of C = A @ B^T per program."""
    BLOCK_M: gl.constexpr = 3 * a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    tm, tn = _tile(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0 = tm * BLOCK_M, tn * BLOCK_N
    _warp_specialized(
        a_desc, b_desc, c_desc, C, AS, BS + tn * stride_bs, M, N, m0, n0, n0, M,
        gl.cdiv(K, a_desc.block_type.shape[1]), stride_cm, stride_as, STAGES, TMA_STORE, CONSUMER_REGS, LOADER_REGS,
    )  # fmt: skip


@gluon.jit
def _fp8_grouped_gemm_ws_kernel(
    a_desc, b_desc, c_desc, C, AS, BS, GE, M, N, K, E, stride_cm, stride_as, stride_bse, stride_bs,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """One 192 x 128 tile of the grouped GEMM per program: rows of segment seg times b[seg]^T, B viewed as
    (E * N, K) so expert seg's rows start at seg * N. A tile's rows past its group's end (the next group's, or
    zeros past M) and B rows past N (the next expert's) are multiplied but never stored. Segment E (rows past
    group_ends[-1]) and programs past the tile count run no K blocks: the first stores zeros, the second
    nothing (row_end = 0)."""
    BLOCK_M: gl.constexpr = 3 * a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    live, seg, m0, row_end, n0 = _grouped_tile(GE, E, M, N, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E)
    row_end = gl.where(live, row_end, 0)
    k_blocks = gl.where(live & (seg < E), gl.cdiv(K, a_desc.block_type.shape[1]), 0)
    bs_ptr = BS + gl.minimum(seg, E - 1) * stride_bse + (n0 // BLOCK_N) * stride_bs
    _warp_specialized(
        a_desc, b_desc, c_desc, C, AS, bs_ptr, M, N, m0, n0, seg * N + n0, row_end, k_blocks, stride_cm, stride_as,
        STAGES, TMA_STORE, CONSUMER_REGS, LOADER_REGS,
    )  # fmt: skip


@functools.cache
def _smem_layout(block: tuple[int, int], dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)  # (~20 us of host time uncached)


def _desc(t: torch.Tensor, block: list[int], dtype) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, block, _smem_layout(tuple(block), dtype))


def kernel_args(a, a_scale, b, b_scale, c):
    """(grid, args, constexprs) of _fp8_gemm_ws_kernel; checked operands: a (M, K), b (N, K) e4m3 with
    16-byte aligned bases and row strides, K % 128 == 0, a_scale (M, K/128), b_scale (ceil(N/128), K/128)
    with unit column strides, c (M, N) bf16, fp16 or fp32 with a unit column stride."""
    (m, k), n = a.shape, b.shape[0]
    a_desc = _desc(a, [WG_ROWS, BLOCK_K], gl.float8e4nv)
    b_desc = _desc(b, [BLOCK_N, BLOCK_K], gl.float8e4nv)
    tma_store = c.dtype in (torch.bfloat16, torch.float16) and c.data_ptr() % 16 == 0 and (c.stride(0) * 2) % 16 == 0
    c_desc = _desc(c, [WG_ROWS, BLOCK_N], _GL_DTYPES[c.dtype]) if tma_store else a_desc  # (unused if not)
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    args = (a_desc, b_desc, c_desc, c, a_scale, b_scale, m, n, k, c.stride(0), a_scale.stride(0), b_scale.stride(0))
    constexprs = dict(
        STAGES=STAGES,
        GROUP_M=GROUP_M,
        TMA_STORE=tma_store,
        CONSUMER_REGS=CONSUMER_REGS,
        LOADER_REGS=LOADER_REGS,
        num_warps=4,
    )
    return grid, args, constexprs


def grouped_kernel_args(a, a_scale, b, b_scale, group_ends, c):
    """(grid, args, constexprs) of _fp8_grouped_gemm_ws_kernel; operands as for kernel_args with b (E, N, K)
    contiguous, b_scale (E, ceil(N/128), K/128), group_ends (E,) int32 or int64, E >= 1. The grid is the
    worst case, ceil(M / 192) + E row tiles (every group may end in a part tile) by ceil(N / 128)."""
    (m, k), (n_groups, n) = a.shape, b.shape[:2]
    grid, args, constexprs = kernel_args(a, a_scale, b.view(n_groups * n, k), b_scale[0], c)
    a_desc, b_desc, c_desc, c, a_scale, _, m, _, k, stride_cm, stride_as, stride_bs = args
    grid = ((triton.cdiv(m, BLOCK_M) + n_groups) * triton.cdiv(n, BLOCK_N),)
    args = (a_desc, b_desc, c_desc, c, a_scale, b_scale, group_ends, m, n, k, n_groups, stride_cm, stride_as,
            b_scale.stride(0), stride_bs)  # fmt: skip
    return grid, args, dict(constexprs, BLOCK_E=triton.next_power_of_2(n_groups + 1))


def fp8_gemm_gluon(a, a_scale, b, b_scale, c):
    """c (M, N) = the block-scaled a @ b^T (see kernel_args for what the operands must be); returns c."""
    if c.shape[0] and c.shape[1]:
        grid, args, constexprs = kernel_args(a, a_scale, b, b_scale, c)
        _fp8_gemm_ws_kernel[grid](*args, **constexprs)
    return c


def fp8_grouped_gemm_gluon(a, a_scale, b, b_scale, group_ends, c):
    """c (M, N) = per group e, its rows of a @ b[e]^T, rows past group_ends[-1] zero (see grouped_kernel_args)."""
    if c.shape[0] and c.shape[1]:
        grid, args, constexprs = grouped_kernel_args(a, a_scale, b, b_scale, group_ends, c)
        _fp8_grouped_gemm_ws_kernel[grid](*args, **constexprs)
    return c


__all__ = ["fp8_gemm_gluon", "fp8_grouped_gemm_gluon", "grouped_kernel_args", "kernel_args"]
