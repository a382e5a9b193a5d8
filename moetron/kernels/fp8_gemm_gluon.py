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
* consumer warpgroups (4 warps each), each owning 64 rows of the output tile: wait for `ready[s]`, one async
  wgmma of its rows of stage s into a fresh fp32 partial, wait for it, release the stage (`empty[s]`
  completes after every consumer released it), promote the partial into its accumulator.

Two tile shapes (`TILES`), picked per problem by `choose_tiles`:

* narrow, 192 x 128: three consumers, each 64 x 128 (a 64-register accumulator and a 64-register
  partial). The three drift apart, so one's promotion overlaps another's MMA.
* wide, 128 x 256: two consumers, each 64 x 256 as two 128-column halves, one b-scale block each: wgmma
  of half 0, wait, promote it, wgmma of half 1 into the same partial registers, wait, promote
  (two accumulators and one partial: 192 registers of 240). The other consumer's MMAs fill the tensor
  cores during each promotion.

Why two: on the H100 these GEMMs run near the L2 cache's bandwidth (Nsight Compute: L2-to-SM traffic
78-82% of peak for this kernel and for cuBLAS's rowwise FP8 GEMM alike), so bytes loaded per FLOP
decide the speed. A K block of a 192 x 128 tile loads 320 rows of A and B for 24576 outputs; of a
128 x 256 tile, 384 rows for 32768, 10% fewer bytes per output. The wide tile measured 1-13% faster
on large problems (bench/results/fp8_wide_tile_experiment.json); on small ones its larger tiles leave
SMs idle in the last wave, and the narrow one wins.

The scales of block kb + 1 are loaded into registers while block kb's wgmma runs, after the last use of
block kb's (so no register copy waits on the load before the next wgmma). 16-bit outputs leave through
shared memory and a TMA store (it clips rows past M and columns past N; its completion is awaited only
before the staging buffer is written again); fp32 outputs (the staging would not fit next to the ring)
with masked stores.

Small problems (DEVICE_DESC_FLOPS) have the loader build the A and B descriptors on the device
(tma.make_tensor_descriptor, in global scratch that triton.set_allocator provides). Each host descriptor costs
the launch host time (building it, hashing it into the launch signature, encoding it in Triton's launcher), and
at 4096^3 the GEMM's ~110 us on the GPU were shorter than the ~110-180 us of host time of a call; large problems
keep host descriptors, which run faster on the GPU (bench/results/fp8_host_overhead.json).

The kernel is persistent: one program per SM walks output tiles p, p + P, ..., and the ring position runs
on across tiles, so the loader fetches the next tile's first K blocks while the consumers finish this one
and store it. Tiles are numbered GROUP_M row tiles down each column first, so the tiles in flight at once
share A and B tiles in L2.

Grouped (E >= 1 experts): the output rows are cut into segments, the E groups and then the rows past
group_ends[-1] (zeros), each into ceil(rows / 192) row tiles. Every partition counts them on the device
from group_ends (no host sync) and finds its tile's segment; a dense GEMM is the case E = 0, one segment. The
segment search reduces across lanes; its results are marked warp-uniform (_uniform), or ptxas would keep the
ring position and the wgmma descriptors in vector registers (10-12% slower; docs/gluon_hopper.md, 23).
A tile's 64-row slices that run past their group's end (into the next group's rows) store through masked
stores, the others through TMA. Rows past a group's end and B rows past N (the next expert's, or TMA's
zeros) are multiplied but never stored.

Measured on the H100 (bench/results/fp8_gluon_variants_experiment.json and
fp8_grouped_gluon_experiment.json): 192 x 128 tiles with three consumer warpgroups beat 128 x 128 with two
(less L2 -> shared-memory traffic per FLOP) except on small or 128-aligned problems, and a 128 x 256 tile
with two partials in flight (which spilled registers); the persistent grid beats one program per tile,
most at short K.

GPU only: Gluon has no interpreter mode; the Triton kernel serves TRITON_INTERPRET=1 and other GPUs.
tests/kernels/test_fp8_gluon.py compiles this kernel for sm_90a on the CPU (Triton ships ptxas).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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

from moetron.kernels.fp8_gemm_triton import _sm_count
from moetron.kernels.gluon_names import cta_barrier, tma_load, tma_store
from moetron.kernels.launch import FastLaunch, cdiv, device_scratch, host_descriptor, next_power_of_2

WG_ROWS = 64  # output rows per consumer warpgroup: one m64 wgmma
BLOCK_N = 128  # one weight scale block: one scalar b-scale per (half) tile and K block
BLOCK_K = 128  # one scale block: one wgmma group per promotion
STAGES = 4  # ring depth: narrow 4 x 40 KB + 3 x 16 KB staging = 208 KB; wide 4 x 48 + 2 x 16 = 224 KB
GROUP_M = 8
LOADER_REGS = 24
_WG_ROWS, _BLOCK_N, _BLOCK_K = gl.constexpr(WG_ROWS), gl.constexpr(BLOCK_N), gl.constexpr(BLOCK_K)  # (in kernels)
# Problems below this many FLOPs (2 M N K) build the A and B descriptors on the device: ~35 us less host time a
# call, which decides where a call's ~110-150 us of host time exceed its GPU time (4096^3: ~110 us); larger ones
# take host descriptors, whose L2 promotion the device-built ones lack (8192^3: 1004-1017 against 1082-1232
# TFLOP/s; bench/results/fp8_host_overhead.json).
DEVICE_DESC_FLOPS = 2e11


@dataclass(frozen=True)
class Tiles:
    """One tile shape of the kernel: `consumers` warpgroups of 64 rows, `halves` 128-column halves each;
    `consumer_regs` per thread of each worker consumer (a program's warpgroups share 512 registers per
    thread: the default partition, the first consumer, gets what the others and LOADER_REGS leave);
    `speed`, throughput relative to narrow measured on large problems (1-13%), for choose_tiles."""

    consumers: int
    halves: int
    consumer_regs: int
    speed: float

    @property
    def block_m(self) -> int:
        return WG_ROWS * self.consumers

    @property
    def block_n(self) -> int:
        return BLOCK_N * self.halves


# narrow: per thread 64 accumulator + 64 partial + addresses; wide: 2 x 64 accumulators + 64 partial + addresses
TILES = {"narrow": Tiles(3, 1, 160, 1.0), "wide": Tiles(2, 2, 240, 1.07)}
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
def _uniform(x):
    """x (an int32 scalar, equal in every thread) marked warp-uniform for ptxas: `redux.sync` writes a uniform
    register. Values reduced across lanes (gl.sum, associative_scan: shuffles) are not known uniform, and a ring
    position or loop bound derived from them puts the wgmma descriptors into vector registers (R2UR per K block)."""
    return gl.inline_asm_elementwise(
        "redux.sync.max.s32 $0, $1, 0xffffffff;", "=r,r", [x], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def _locate(tile, starts, ends, tiles, first_tile, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            GROUP_M: gl.constexpr):  # fmt: skip
    """Output tile index -> (segment, first row, end row of the segment, first column). Tiles are numbered
    GROUP_M row tiles down each column first, so the tiles in flight at once share A and B tiles in L2."""
    n_m, n_n = _uniform(gl.sum(tiles, 0)), gl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (tile // width) * GROUP_M
    group_rows = gl.minimum(n_m - first_m, GROUP_M)  # row tiles in this super-row
    t = first_m + (tile % width) % group_rows  # row tile
    tn = (tile % width) // group_rows  # column tile
    seg = _uniform(gl.sum((first_tile + tiles <= t).to(gl.int32), 0))  # the segment holding row tile t
    here = gl.arange(0, starts.shape[0], layout=starts.type.layout) == seg
    m0 = _uniform(gl.sum(gl.where(here, starts + (t - first_tile) * BLOCK_M, 0), 0))
    return seg, m0, _uniform(gl.sum(gl.where(here, ends, 0), 0)), tn * BLOCK_N


@gluon.jit
def _loader(a_src, b_src, a_ring, b_ring, ready, empty, GE, E, M, N, K, stride_a, stride_b, STAGES: gl.constexpr,
            GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, DEVICE_DESC: gl.constexpr):  # fmt: skip
    """Producer partition, over this program's tiles: stage s of K block kb holds the tile's A rows
    [m0, m0 + BLOCK_M) as 64-row boxes and its B rows [b_row0, b_row0 + TILE_N) as 128-row boxes; TMA
    zero-fills what lies past the tensors. The ring position `it` runs on across tiles, so the next tile's
    blocks load during this one's last MMAs and its epilogue. a_src / b_src: the host's TMA descriptors of A and
    B, or with DEVICE_DESC the tensors, whose descriptors are built here (see kernel_args)."""
    WG_ROWS: gl.constexpr = a_ring.shape[1]
    BLOCK_K: gl.constexpr = a_ring.shape[2]
    BLOCK_N: gl.constexpr = b_ring.shape[1]
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES  # consumers
    HALVES: gl.constexpr = b_ring.shape[0] // STAGES
    a_desc = a_src
    b_desc = b_src
    if DEVICE_DESC:
        a_desc = tma.make_tensor_descriptor(a_src, [M, K], [stride_a, 1], [WG_ROWS, BLOCK_K], a_ring.layout)
        b_desc = tma.make_tensor_descriptor(b_src, [gl.maximum(E, 1) * N, K], [stride_b, 1], [BLOCK_N, BLOCK_K],
                                            b_ring.layout)  # fmt: skip
    k_blocks = gl.cdiv(K, BLOCK_K)
    starts, ends, tiles, first_tile = _segments(GE, E, M, PARTS * WG_ROWS, BLOCK_E)
    it = 0
    for tile in range(gl.program_id(0), _uniform(gl.sum(tiles, 0)) * gl.cdiv(N, HALVES * BLOCK_N), gl.num_programs(0)):
        seg, m0, row_end, n0 = _locate(tile, starts, ends, tiles, first_tile, N, PARTS * WG_ROWS,
                                       HALVES * BLOCK_N, GROUP_M)  # fmt: skip
        b_row0 = seg * N + n0  # B is (E * N, K): expert seg's rows start at seg * N
        for kb in range(gl.where((seg < E) | (E == 0), k_blocks, 0)):  # (segment E: zeros, no loads)
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # the first lap finds every stage free
            mbarrier.expect(ready.index(s), (PARTS * WG_ROWS + HALVES * BLOCK_N) * BLOCK_K)  # (1-byte elements)
            for j in gl.static_range(PARTS):
                tma_load(a_desc, [m0 + j * WG_ROWS, kb * BLOCK_K], ready.index(s), a_ring.index(s * PARTS + j))
            for h in gl.static_range(HALVES):
                tma_load(b_desc, [b_row0 + h * BLOCK_N, kb * BLOCK_K], ready.index(s), b_ring.index(s * HALVES + h))
            it += 1


@gluon.jit
def _consumer(
    a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm, stride_as, stride_bse,
    stride_bs, WG: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr,
    TMA_STORE: gl.constexpr,
):  # fmt: skip
    """Consumer partition WG, over this program's tiles: rows [m0 + 64 WG, m0 + 64 WG + 64) of each, all of its
    columns (one or two 128-column halves). Rows from the segment's end on are computed (from whatever A
    holds there) but never stored."""
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    HALVES: gl.constexpr = b_ring.shape[0] // STAGES
    ROWS: gl.constexpr = a_ring.shape[1]
    BLOCK_N: gl.constexpr = b_ring.shape[1]
    # wgmma accumulator layout of a 64 x 128 fp32 tile over one warpgroup (fp8: k = 32 per instruction)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)  # (not read: use_acc=False)
    c_smem = c_desc  # (unused without TMA_STORE)
    if TMA_STORE:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    _, _, tiles, _ = _segments(GE, E, M, PARTS * ROWS, BLOCK_E)
    it = 0
    for tile in range(gl.program_id(0), _uniform(gl.sum(tiles, 0)) * gl.cdiv(N, HALVES * BLOCK_N), gl.num_programs(0)):
        # (the segments again, from L2: kept across the K loop they would spill the accumulator's registers)
        starts, ends, tiles, first_tile = _segments(GE, E, M, PARTS * ROWS, BLOCK_E)
        seg, m0, row_end, n0 = _locate(tile, starts, ends, tiles, first_tile, N, PARTS * ROWS, HALVES * BLOCK_N,
                                       GROUP_M)  # fmt: skip
        row0 = m0 + WG * ROWS
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))  # (64,)
        row_ok = rows < row_end
        as_ptrs = AS + rows * stride_as  # (64,) this K block's a-scales: as_ptrs + kb
        bs_ptr = BS + gl.minimum(seg, gl.maximum(E - 1, 0)) * stride_bse + (n0 // BLOCK_N) * stride_bs
        n_kb = gl.where((seg < E) | (E == 0), k_blocks, 0)  # (segment E: zeros)
        acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
        sa = gl.load(as_ptrs, mask=row_ok, other=0.0)
        sb = gl.load(bs_ptr)
        if HALVES == 2:  # half 1's b-scales: the next 128 rows of B (half 0's again where half 1 lies past N)
            bs_ptr1 = bs_ptr + gl.where(n0 + BLOCK_N < N, stride_bs, 0)
            acc1 = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
            sb1 = gl.load(bs_ptr1)
        for kb in range(n_kb):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_ring.index(s * PARTS + WG)  # (64, 128) e4m3, this warpgroup's rows
            partial = warpgroup_mma(a, b_ring.index(s * HALVES).permute((1, 0)), zero, use_acc=False, is_async=True)
            # While it runs: block kb's scale products, then block kb + 1's scales (the last block re-reads).
            scale = sa * sb
            if HALVES == 2:
                scale1 = sa * sb1
            following = gl.minimum(kb + 1, n_kb - 1)
            sa = gl.load(as_ptrs + following, mask=row_ok, other=0.0)
            sb = gl.load(bs_ptr + following)
            if HALVES == 2:
                sb1 = gl.load(bs_ptr1 + following)
            partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))  # (64, 128) fp32, one K block
            if HALVES == 2:
                acc += partial * scale[:, None]  # promotion on the CUDA cores
                # half 1 into the same registers (passing the spent partial as the accumulator ties them)
                partial = warpgroup_mma(a, b_ring.index(2 * s + 1).permute((1, 0)), partial, use_acc=False,
                                        is_async=True)  # fmt: skip
                partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))
                mbarrier.arrive(empty.index(s))  # this warpgroup is done reading stage s
                acc1 += partial * scale1[:, None]
            else:
                mbarrier.arrive(empty.index(s))
                acc += partial * scale[:, None]
            it += 1
        _store(acc, c_smem, c_desc, C, rows, row_ok, row0, row_end, n0, M, N, stride_cm, TMA_STORE)
        if HALVES == 2:
            _store(acc1, c_smem, c_desc, C, rows, row_ok, row0, row_end, n0 + BLOCK_N, M, N, stride_cm, TMA_STORE)
    if TMA_STORE:
        tma.store_wait(pendings=0)


@gluon.jit
def _store(acc, c_smem, c_desc, C, rows, row_ok, row0, row_end, n0, M, N, stride_cm, TMA_STORE: gl.constexpr):
    """acc (64, 128) fp32 -> C[rows, n0:n0 + 128] in C's dtype: the rows row_ok, the columns < N.

    With TMA_STORE, a TMA store from c_smem: it clips only at the tensor's end, so it serves the rows when all
    64 are ours or ours run to M; the others (into the next group's rows) leave through masked stores.
    (Triton 3.6 fails to compile a store inside a branch here, so the masked store runs always, masked off
    after TMA.)"""
    if TMA_STORE:
        whole = (row0 + acc.shape[0] <= row_end) | (row_end == M)
        if whole:
            tma.store_wait(pendings=0)  # the previous store has read c_smem ...
            cta_barrier()  # ... and every thread of the warpgroup knows it
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma_store(c_desc, [row0, n0], c_smem)  # clipped at M, N
        _masked_store(acc, C, rows, row_ok & ~whole, n0, N, stride_cm)
    else:
        _masked_store(acc, C, rows, row_ok, n0, N, stride_cm)


@gluon.jit
def _masked_store(acc, C, rows, row_ok, n0, N, stride_cm):
    """acc (64, 128) -> C[rows, n0:n0 + 128], the rows row_ok and the columns < N only."""
    cols = n0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    ptrs = C + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
    gl.store(ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@gluon.jit
def _fp8_gemm_ws_kernel(
    a_src, b_src, c_desc, C, AS, BS, GE, M, N, K, E, stride_a, stride_b, stride_cm, stride_as, stride_bse, stride_bs,
    A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr,
    GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr, CONSUMERS: gl.constexpr, HALVES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, DEVICE_DESC: gl.constexpr,
):  # fmt: skip
    """Persistent: program p computes output tiles p, p + P, ... ((64 CONSUMERS) x (128 HALVES) each) of
    C = A @ B^T (E = 0) or of the grouped product (E >= 1: rows of group e times b[e]^T, B viewed as
    (E * N, K)). Partitions: CONSUMERS consumer warpgroups (the default partition is the first) and a loader
    warp sharing a STAGES-deep shared-memory ring of A and B tiles."""
    k_blocks = gl.cdiv(K, _BLOCK_K)
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * CONSUMERS, _WG_ROWS, _BLOCK_K], A_LAYOUT)
    b_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * HALVES, _BLOCK_N, _BLOCK_K], B_LAYOUT)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the loader's expect; completes when the bytes have landed
        mbarrier.init(empty.index(s), count=CONSUMERS)  # one arrival per consumer warpgroup
    if CONSUMERS == 3:
        gl.warp_specialize(
            [
                (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                             stride_as, stride_bse, stride_bs, 0, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
                (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                             stride_as, stride_bse, stride_bs, 1, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
                (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                             stride_as, stride_bse, stride_bs, 2, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
                (_loader, (a_src, b_src, a_ring, b_ring, ready, empty, GE, E, M, N, K, stride_a, stride_b, STAGES,
                           GROUP_M, BLOCK_E, DEVICE_DESC)),
            ],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                             stride_as, stride_bse, stride_bs, 0, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
                (_consumer, (a_ring, b_ring, ready, empty, c_desc, C, AS, BS, GE, E, M, N, k_blocks, stride_cm,
                             stride_as, stride_bse, stride_bs, 1, STAGES, GROUP_M, BLOCK_E, TMA_STORE)),
                (_loader, (a_src, b_src, a_ring, b_ring, ready, empty, GE, E, M, N, K, stride_a, stride_b, STAGES,
                           GROUP_M, BLOCK_E, DEVICE_DESC)),
            ],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip


@functools.cache
def _smem_layout(block: tuple[int, int], dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)  # (~20 us of host time uncached)


def _desc(t: torch.Tensor, block: list[int], dtype):
    return host_descriptor(t, block, _smem_layout(tuple(block), dtype))


def choose_tiles(m: int, n: int, n_groups: int, programs: int, shapes: dict[str, Tiles] = TILES) -> Tiles:
    """The tile shape (of `shapes`, TILES by default) with the shorter estimated time: a persistent program runs
    ceil(tiles / programs) tiles one after another, each costing its area over the shape's measured speed.
    Large problems take the wide tiles (fewer bytes per output); where the wide tiles would leave a last wave
    mostly idle (few tiles, or N just past a multiple of 256), the narrow ones. Grouped: counted with the
    worst case of one part tile per group."""

    def time(t: Tiles) -> float:
        count = (cdiv(m, t.block_m) + n_groups) * cdiv(n, t.block_n)
        return cdiv(count, programs) * t.block_m * t.block_n / t.speed

    return min(shapes.values(), key=time)


def kernel_args(a, a_scale, b, b_scale, c, programs, group_ends=None, tiles=None):
    """(grid, args, constexprs) of _fp8_gemm_ws_kernel; checked operands: a (M, K) e4m3, and b (N, K) e4m3 with
    b_scale (ceil(N/128), K/128), or grouped (group_ends (E,) int32 or int64, E >= 1) b (E, N, K) contiguous
    with b_scale (E, ceil(N/128), K/128); 16-byte aligned bases and row strides, K % 128 == 0, a_scale
    (M, K/128), the scales with unit K-block strides; c (M, N) bf16, fp16 or fp32 with a unit column stride.
    `tiles`: a Tiles of TILES, else choose_tiles picks, for outputs that leave through the TMA store and N a
    multiple of 16 (otherwise the wide tiles spill registers: the narrow ones). The grid:
    `programs` (one per SM), never more than the worst-case tile count (every group may end in a part tile)."""
    (m, k), n = a.shape, b.shape[-2]
    n_groups = 0 if group_ends is None else b.shape[0]
    tma_store = c.dtype in (torch.bfloat16, torch.float16) and c.data_ptr() % 16 == 0 and (c.stride(0) * 2) % 16 == 0
    # (N not a multiple of 16: the wide tiles' consumer spilled registers in its K loop, 74 spill loads/stores)
    tiles = tiles or (choose_tiles(m, n, n_groups, programs) if tma_store and n % 16 == 0 else TILES["narrow"])
    device_desc = 2 * m * n * k < DEVICE_DESC_FLOPS
    a_desc = None if device_desc and tma_store else _desc(a, [WG_ROWS, BLOCK_K], gl.float8e4nv)
    a_src, b_src = (a, b) if device_desc else (a_desc, _desc(b.view(-1, k), [BLOCK_N, BLOCK_K], gl.float8e4nv))
    # (without the TMA store the kernel never reads c_desc: A's fills the slot)
    c_desc = _desc(c, [WG_ROWS, BLOCK_N], _GL_DTYPES[c.dtype]) if tma_store else a_desc
    count = (cdiv(m, tiles.block_m) + n_groups) * cdiv(n, tiles.block_n)
    grid = (min(count, programs),)
    stride_bse = b_scale.stride(0) if n_groups else 0
    ge = _no_groups(c.device) if group_ends is None else group_ends
    args = (a_src, b_src, c_desc, c, a_scale, b_scale, ge, m, n, k, n_groups, a.stride(0), b.stride(-2), c.stride(0),
            a_scale.stride(0), stride_bse, b_scale.stride(-2))  # fmt: skip
    constexprs = dict(
        A_LAYOUT=_smem_layout((WG_ROWS, BLOCK_K), gl.float8e4nv),
        B_LAYOUT=_smem_layout((BLOCK_N, BLOCK_K), gl.float8e4nv),
        BLOCK_E=next_power_of_2(n_groups + 1),
        STAGES=STAGES,
        GROUP_M=GROUP_M,
        TMA_STORE=tma_store,
        CONSUMERS=tiles.consumers,
        HALVES=tiles.halves,
        CONSUMER_REGS=tiles.consumer_regs,
        LOADER_REGS=LOADER_REGS,
        DEVICE_DESC=device_desc,
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
        if constexprs["DEVICE_DESC"]:
            triton.set_allocator(device_scratch)  # (global scratch for the descriptors the kernel builds)
        _launch(grid, *args, **constexprs)
    return c


__all__ = ["TILES", "Tiles", "choose_tiles", "fp8_gemm_gluon", "kernel_args"]
