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
latency hides behind a whole iteration). 16-bit outputs leave through shared memory and a TMA store (it
clips rows past M and columns past N; its completion is awaited only before the next tile's store);
fp32 outputs (3 x 32 KB of staging would not fit next to the ring) with masked stores.

The kernel is persistent: one program per SM walks output tiles p, p + P, ..., and the ring position runs
on across tiles, so the loader fetches the next tile's first K blocks while the consumers finish this one
and store it. Tiles are numbered GROUP_M row tiles down each column first, so the tiles in flight at once
share A and B tiles in L2.

Grouped (E >= 1 experts): the output rows are cut into segments, the E groups and then the rows past
group_ends[-1] (zeros), each into ceil(rows / 192) row tiles. Every partition counts them on the device
from group_ends (no host sync) and finds its tile's segment; a dense GEMM is the case E = 0, one segment.
A tile's 64-row slices that run past their group's end (into the next group's rows) store through masked
stores, the others through TMA.

Measured on the H100 (bench/results/fp8_gluon_variants_experiment.json and
fp8_grouped_gluon_experiment.json): 192 x 128 tiles with three consumer warpgroups beat 128 x 128 with two
(less L2 -> shared-memory traffic per FLOP) except on small or 128-aligned problems, and 128 x 256 tiles
(whose two partials spill registers); the persistent grid beats one program per tile, most at short K.

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

from moetron.kernels.fp8_gemm_triton import _sm_count
from moetron.kernels.launch import FastLaunch

WG_ROWS = 64  # output rows per consumer warpgroup: one m64 wgmma
CONSUMERS = 3  # consumer warpgroups: BLOCK_M = 192
BLOCK_M = WG_ROWS * CONSUMERS
BLOCK_N = 128  # one weight scale block wide: one scalar b-scale per tile and K block
BLOCK_K = 128  # one scale block: one wgmma group per promotion
STAGES = 4  # 4 x (3 x 8 + 16) KB ring + 3 x 16 KB output staging = 208 KB of shared memory
GROUP_M = 8
CONSUMER_REGS = 160  # per thread: 64 accumulator + 64 partial + addresses; 168 left for the default partition
LOADER_REGS = 24
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _segments(GE, E, M, BLOCK_M: gl.constexpr, BLOCK_E: gl.constexpr):
    """The row segments of the output, as (BLOCK_E,) vectors (starts, ends, row tiles, first row tile).

    Grouped (E >= 1): the E groups of rows, then the rows past group_ends[-1] (segment E, which gets zeros).
    Dense (E = 0): one segment, all M rows. Segment j has ceil(rows_j / BLOCK_M) row tiles; the count is made
    on the device from group_ends, so no host sync reads the group sizes."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    j = gl.arange(0, BLOCK_E, layout=layout)
    ends = gl.load(GE + j, mask=j < E, other=M).to(gl.int32)
    starts = gl.load(GE + j - 1, mask=(j >= 1) & (j <= E), other=0).to(gl.int32)
    starts = gl.where(j <= E, starts, M)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    return starts, ends, tiles, gl.associative_scan(tiles, 0, _add) - tiles


@gluon.jit
def _locate(tile, starts, ends, tiles, first_tile, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            GROUP_M: gl.constexpr):  # fmt: skip
    """Output tile index -> (segment, first row, end row of the segment, first column). Tiles are numbered
    GROUP_M row tiles down each column first, so the tiles in flight at once share A and B tiles in L2."""
    n_m, n_n = gl.sum(tiles, 0), gl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (tile // width) * GROUP_M
    group_rows = gl.minimum(n_m - first_m, GROUP_M)  # row tiles in this super-row
    t = first_m + (tile % width) % group_rows  # row tile
    tn = (tile % width) // group_rows  # column tile
    seg = gl.sum((first_tile + tiles <= t).to(gl.int32), 0)  # the segment holding row tile t
    here = gl.arange(0, starts.shape[0], layout=starts.type.layout) == seg
    m0 = gl.sum(gl.where(here, starts + (t - first_tile) * BLOCK_M, 0), 0)
    return seg, m0, gl.sum(gl.where(here, ends, 0), 0), tn * BLOCK_N


@gluon.jit
def _loader(a_desc, b_desc, a_ring, b_ring, ready, empty, GE, E, M, N, k_blocks, STAGES: gl.constexpr,
            GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr):  # fmt: skip
    """Producer partition, over this program's tiles: stage s of K block kb holds the tile's A rows
    [m0, m0 + BLOCK_M) as 64-row boxes and B rows [b_row0, b_row0 + 128); TMA zero-fills what lies past the
    tensors. The ring position `it` runs on across tiles, so the next tile's blocks load during this one's
    last MMAs and its epilogue."""
    WG_ROWS: gl.constexpr = a_desc.block_type.shape[0]
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    starts, ends, tiles, first_tile = _segments(GE, E, M, PARTS * WG_ROWS, BLOCK_E)
    it = 0
    for tile in range(gl.program_id(0), gl.sum(tiles, 0) * gl.cdiv(N, BLOCK_N), gl.num_programs(0)):
        seg, m0, row_end, n0 = _locate(tile, starts, ends, tiles, first_tile, N, PARTS * WG_ROWS, BLOCK_N, GROUP_M)
        b_row0 = seg * N + n0  # B is (E * N, K): expert seg's rows start at seg * N
        for kb in range(gl.where((seg < E) | (E == 0), k_blocks, 0)):  # (segment E: zeros, no loads)
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # the first lap finds every stage free
            mbarrier.expect(ready.index(s), PARTS * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            for j in gl.static_range(PARTS):
                tma.async_copy_global_to_shared(
                    a_desc, [m0 + j * WG_ROWS, kb * BLOCK_K], ready.index(s), a_ring.index(s * PARTS + j)
                )
            tma.async_copy_global_to_shared(b_desc, [b_row0, kb * BLOCK_K], ready.index(s), b_ring.index(s))
            it += 1


@gluon.jit
def _consumer(
    a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm, stride_as, stride_bse,
    stride_bs, WG: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr,
    TMA_STORE: gl.constexpr,
):  # fmt: skip
    """Consumer partition WG, over this program's tiles: rows [m0 + 64 WG, m0 + 64 WG + 64) of each, all of its
    128 columns. Rows from the segment's end on are computed (from whatever A holds there) but never stored."""
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    ROWS: gl.constexpr = a_ring.shape[1]
    BLOCK_N: gl.constexpr = b_ring.shape[1]
    # wgmma accumulator layout of a 64 x 128 fp32 tile over one warpgroup (fp8: k = 32 per instruction)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)  # (not read: use_acc=False)
    if TMA_STORE:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    _, _, tiles, _ = _segments(GE, E, M, PARTS * ROWS, BLOCK_E)
    it = 0
    for tile in range(gl.program_id(0), gl.sum(tiles, 0) * gl.cdiv(N, BLOCK_N), gl.num_programs(0)):
        # (the segments again, from L2: kept across the K loop they would spill the accumulator's registers)
        starts, ends, tiles, first_tile = _segments(GE, E, M, PARTS * ROWS, BLOCK_E)
        seg, m0, row_end, n0 = _locate(tile, starts, ends, tiles, first_tile, N, PARTS * ROWS, BLOCK_N, GROUP_M)
        row0 = m0 + WG * ROWS
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))  # (64,)
        row_ok = rows < row_end
        as_ptrs = AS + rows * stride_as  # (64,) this K block's a-scales: as_ptrs + kb
        bs_ptr = BS + gl.minimum(seg, gl.maximum(E - 1, 0)) * stride_bse + (n0 // BLOCK_N) * stride_bs
        n_kb = gl.where((seg < E) | (E == 0), k_blocks, 0)  # (segment E: zeros)
        acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
        sa = gl.load(as_ptrs, mask=row_ok, other=0.0)
        sb = gl.load(bs_ptr)
        for kb in range(n_kb):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_ring.index(s * PARTS + WG)  # (64, 128) e4m3, this warpgroup's rows
            partial = warpgroup_mma(a, b_ring.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
            scale = sa * sb
            following = gl.minimum(kb + 1, n_kb - 1)  # prefetch block kb + 1's scales (the last re-reads)
            sa = gl.load(as_ptrs + following, mask=row_ok, other=0.0)
            sb = gl.load(bs_ptr + following)
            partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))  # (64, 128) fp32, one K block
            mbarrier.arrive(empty.index(s))  # this warpgroup is done reading stage s
            acc += partial * scale[:, None]  # promotion on the CUDA cores
            it += 1
        if TMA_STORE:
            # A TMA store clips only at the tensor's end: it serves the rows when all 64 are ours or ours run
            # to M; the others (into the next group's rows) leave through masked stores. (Triton 3.6 fails to
            # compile a store inside a branch here, so the masked store runs always, masked off after TMA.)
            whole = (row0 + ROWS <= row_end) | (row_end == M)
            if whole:
                tma.store_wait(pendings=0)  # the previous tile's store has read c_smem ...
                gl.thread_barrier()  # ... and every thread of the warpgroup knows it
                c_smem.store(acc.to(c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [row0, n0], c_smem)  # clipped at M, N
            _masked_store(acc, C, rows, row_ok & ~whole, n0, N, stride_cm)
        else:
            _masked_store(acc, C, rows, row_ok, n0, N, stride_cm)
    if TMA_STORE:
        tma.store_wait(pendings=0)


@gluon.jit
def _masked_store(acc, C, rows, row_ok, n0, N, stride_cm):
    """acc (64, 128) -> C[rows, n0:n0 + 128], the rows row_ok and the columns < N only."""
    cols = n0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    ptrs = C + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
    gl.store(ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@gluon.jit
def _fp8_gemm_ws_kernel(
    a_desc, b_desc, c_desc, C, AS, BS, GE, M, N, K, E, stride_cm, stride_as, stride_bse, stride_bs,
    BLOCK_E: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """Persistent: program p computes output tiles p, p + P, ... ((64 CONSUMERS) x 128 each) of C = A @ B^T
    (E = 0) or of the grouped product (E >= 1: rows of group e times b[e]^T, B viewed as (E * N, K)). A tile's
    rows past its group's end (the next group's, or zeros past M) and B rows past N (the next expert's) are
    multiplied but never stored. Partitions: three consumer warpgroups (the default partition is the first)
    and a loader warp sharing a STAGES-deep shared-memory ring of A and B tiles."""
    CONSUMERS: gl.constexpr = 3  # the three partitions below
    k_blocks = gl.cdiv(K, a_desc.block_type.shape[1])
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES * CONSUMERS] + a_desc.block_type.shape, a_desc.layout)
    b_ring = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the loader's expect; completes when the bytes have landed
        mbarrier.init(empty.index(s), count=CONSUMERS)  # one arrival per consumer warpgroup
    gl.warp_specialize(
        [
            (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                         stride_as, stride_bse, stride_bs, 0, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
            (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                         stride_as, stride_bse, stride_bs, 1, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
            (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                         stride_as, stride_bse, stride_bs, 2, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
            (_loader, (a_desc, b_desc, a_ring, b_ring, ready, empty, GE, E, M, N, k_blocks, STAGES, GROUP_M,
                       BLOCK_E)),
        ],
        [4, 4, 1],
        [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS],
    )  # fmt: skip


@functools.cache
def _smem_layout(block: tuple[int, int], dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)  # (~20 us of host time uncached)


def _desc(t: torch.Tensor, block: list[int], dtype) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, block, _smem_layout(tuple(block), dtype))


def kernel_args(a, a_scale, b, b_scale, c, programs, group_ends=None):
    """(grid, args, constexprs) of _fp8_gemm_ws_kernel; checked operands: a (M, K) e4m3, and b (N, K) e4m3 with
    b_scale (ceil(N/128), K/128), or grouped (group_ends (E,) int32 or int64, E >= 1) b (E, N, K) contiguous
    with b_scale (E, ceil(N/128), K/128); 16-byte aligned bases and row strides, K % 128 == 0, a_scale
    (M, K/128), the scales with unit K-block strides; c (M, N) bf16, fp16 or fp32 with a unit column stride.
    The grid: `programs` (one per SM), never more than the worst-case tile count (every group may end in a
    part tile)."""
    (m, k), n = a.shape, b.shape[-2]
    n_groups = 0 if group_ends is None else b.shape[0]
    a_desc = _desc(a, [WG_ROWS, BLOCK_K], gl.float8e4nv)
    b_desc = _desc(b.view(-1, k), [BLOCK_N, BLOCK_K], gl.float8e4nv)
    tma_store = c.dtype in (torch.bfloat16, torch.float16) and c.data_ptr() % 16 == 0 and (c.stride(0) * 2) % 16 == 0
    c_desc = _desc(c, [WG_ROWS, BLOCK_N], _GL_DTYPES[c.dtype]) if tma_store else a_desc  # (unused if not)
    tiles = (triton.cdiv(m, BLOCK_M) + n_groups) * triton.cdiv(n, BLOCK_N)
    grid = (min(tiles, programs),)
    stride_bse = b_scale.stride(0) if n_groups else 0
    ge = _no_groups(c.device) if group_ends is None else group_ends
    args = (a_desc, b_desc, c_desc, c, a_scale, b_scale, ge, m, n, k, n_groups, c.stride(0), a_scale.stride(0),
            stride_bse, b_scale.stride(-2))  # fmt: skip
    constexprs = dict(
        BLOCK_E=triton.next_power_of_2(n_groups + 1),
        STAGES=STAGES,
        GROUP_M=GROUP_M,
        TMA_STORE=tma_store,
        CONSUMER_REGS=CONSUMER_REGS,
        LOADER_REGS=LOADER_REGS,
        num_warps=4,
    )
    return grid, args, constexprs


@functools.cache
def _no_groups(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)  # group_ends of a dense GEMM (never read: E = 0)


_launch = FastLaunch(_fp8_gemm_ws_kernel)  # skips Triton's per-call binding once a signature has run (launch.py)


def fp8_gemm_gluon(a, a_scale, b, b_scale, c, group_ends=None):
    """c (M, N) = the block-scaled a @ b^T, or per group e its rows of a @ b[e]^T with the rows past
    group_ends[-1] zero (see kernel_args for what the operands must be); returns c."""
    if c.shape[0] and c.shape[1]:
        grid, args, constexprs = kernel_args(a, a_scale, b, b_scale, c, _sm_count(c.device), group_ends)
        _launch(grid, *args, **constexprs)
    return c


__all__ = ["fp8_gemm_gluon", "kernel_args"]
