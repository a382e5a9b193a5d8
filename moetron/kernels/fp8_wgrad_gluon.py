"""The FP8 weight-gradient GEMM for Hopper (sm_90) in Gluon: block-scaled with 1x128 scales on both operands.

For a linear layer y = x W^T the weight gradient is dW (N, K) = dY^T X, a reduction over the tokens. In
DeepSeek-V3's recipe both operands are quantized along the tokens (moetron/kernels/fp8_linear.py): A = dY^T
(N, T) and B = X^T (K, T) in e4m3, each with one fp32 scale per row and 128-token block. So

    C[n, k] = sum over token blocks t of (A_t @ B_t^T)[n, k] * a_scale[n, t] * b_scale[k, t]

and each block's partial product is promoted with an outer product of two scale vectors, where the forward
GEMM (moetron/kernels/fp8_gemm_gluon.py) needs a row vector and one scalar. Per output element and block that
is a multiply and a fused multiply-add on the CUDA cores against the forward's one FMA, so the promotion
needs twice the issue slots, and it must hide behind the tensor cores all the same.

The structure is the forward kernel's (its docstring explains the partitions, the ring and the persistent
tile order), with one change in where the scales come from: the loader copies each stage's scale vectors
(a_scale[m0:m0 + BLOCK_M, t] and b_scale[n0:n0 + BLOCK_N, t], contiguous because the quantizer stores the
scales token-block-major) into shared memory with the same TMA transaction as the tiles, so a consumer reads
them from shared memory (tens of cycles) once their stage is ready, never from global memory inside its loop.
Per K block a consumer warpgroup:

    wait ready[s]; issue the wgmma of its 64 rows x 128 columns of stage s (async); read its 64 a-scales;
    wait for the MMA; read the stage's 128 b-scales; release stage s;
    acc += (partial * sb[None, :]) * sa[:, None]        (an FMUL and an FFMA per element)

The b-scales are read after the MMA's wait: read before it, their 32 registers per thread would be live next
to the accumulators and the partial, and ptxas spills. Tiles: wide, 128 x 256 (two consumers of 64 rows, each
with two 128-column halves: two accumulators and one partial), and square, 128 x 128, for problems where the
wide tiles would leave SMs idle and for fp32 outputs (choose_tiles). Outputs leave through a TMA store from
shared memory, fp32 ones too (the weight gradient of fp32 master weights).

Measured on the H100 against the Triton kernel, same run (bench/results/fp8_wgrad_gluon_tiles.json, large
problems): bf16 outputs 789-864 against 639-683 TFLOP/s (1.16-1.34x), fp32 outputs on the square tiles 740-789
against 609-673 (1.15-1.22x). A Gluon version that loaded the b-scales from global memory inside the loop
(f3c7ebc, reverted) measured 600-685, slower than Triton on most shapes.

Grouped (the MoE experts' weight gradients, fp8_grouped_gemm_wgrad): C[e] (N, K) reduces over expert e's tokens
[group_ends[e - 1], group_ends[e]), every group starting on a 128-token block. Tiles are numbered expert by
expert, each with its own K-block range (empty groups store zeros). The tokens past the last group's end may
hold any bytes (NaN codes included): the loader builds the A and B descriptors on the device with the token
extent cut at group_ends[-1], so TMA zero-fills them in the last group's partial block. Output rows of a tile
that run past an expert's N (the next expert's rows) leave through masked stores.

GPU only (no interpreter); tests/kernels/test_fp8_gluon.py compiles it for sm_90a on the CPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from moetron.kernels.fp8_gemm_gluon import (
    _GL_DTYPES,
    BLOCK_K,
    BLOCK_N,
    GROUP_M,
    WG_ROWS,
    Tiles,
    _desc,
    _no_groups,
    _smem_layout,
    _store,
)
from moetron.kernels.fp8_gemm_gluon import (
    choose_tiles as choose_gemm_tiles,
)
from moetron.kernels.fp8_gemm_triton import _sm_count
from moetron.kernels.gluon_names import tma_load
from moetron.kernels.launch import FastLaunch, cdiv, device_scratch, host_descriptor

# Two consumer warpgroups of 64 rows with 240 registers each (two 64 x 128 accumulators and one partial for the
# wide tile, 128 x 256; one of each for the square one, 128 x 128). `speed`: measured relative throughput on
# large problems with bf16 outputs (wide 0-14% faster: median 6% in bench/results/fp8_wgrad_gluon_tiles.json,
# 9% in fp8_wgrad_gluon_variants_experiment.json).
WGRAD_TILES = {"wide": Tiles(2, 2, 240, 1.08), "square": Tiles(2, 1, 240, 1.0)}
# Ring depth per tile shape, the most that fits next to the output staging (fp32 staging is 2 x 32 KB): wide
# 3 x 48 KB (4 do not fit with bf16 staging either), square 4 x 32 KB, with the scale vectors, of 227 KB.
WGRAD_STAGES = {2: 3, 1: 4}
WGRAD_LOADER_REGS = 40  # (24 or 32 spill: the loader also places the scale vectors; the first consumer gets 232)

_WG_ROWS, _BLOCK_N, _BLOCK_K = gl.constexpr(WG_ROWS), gl.constexpr(BLOCK_N), gl.constexpr(BLOCK_K)
# the scales as flat fp32 vectors, copied in unswizzled runs of `width`: part of one K block's scales per stage
_SCALE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)


@gluon.jit
def _tile(tile, GE, E, M, N, k_blocks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
          GROUP_M: gl.constexpr):  # fmt: skip
    """Output tile index -> (expert e, first row m0, first column n0, K blocks [kb_lo, kb_hi)). Tiles are numbered
    expert by expert, and within one GROUP_M row tiles down each column first (neighbours share A and B tiles
    in L2). Dense (E = 0): one expert, every K block. Grouped: expert e reduces over its tokens
    [group_ends[e - 1], group_ends[e]), which start on a 128-token block (the caller pads each group)."""
    n_m, n_n = gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N)
    e, t = tile // (n_m * n_n), tile % (n_m * n_n)
    width = GROUP_M * n_n
    first_m = (t // width) * GROUP_M
    group_rows = gl.minimum(n_m - first_m, GROUP_M)
    m0, n0 = (first_m + (t % width) % group_rows) * BLOCK_M, (t % width) // group_rows * BLOCK_N
    start = gl.where(e > 0, gl.load(GE + gl.maximum(e - 1, 0)).to(gl.int32), 0)
    end = gl.maximum(gl.load(GE + e).to(gl.int32), start)
    kb_lo = gl.where(E == 0, 0, start // BLOCK_K)
    kb_hi = gl.where(E == 0, k_blocks, gl.cdiv(end, BLOCK_K))
    return e, m0, n0, kb_lo, kb_hi


@gluon.jit
def _loader(A, B, sa_desc, sb_desc, a_ring, b_ring, sa_ring, sb_ring, ready, empty, GE, E, M, N, T, stride_a,
            stride_b, STAGES: gl.constexpr, GROUP_M: gl.constexpr):  # fmt: skip
    """Producer partition: per K block kb of each of this program's tiles, into stage s: A rows [m0, m0 + BLOCK_M)
    as 64-row boxes, B rows [n0, n0 + BLOCK_N) as 128-row boxes, and their scales of block kb (a run of each
    token-block-major scale vector), all completing ready[s]. The descriptors of A and B are built here, on the
    device, with the token extent cut at the last group's end: TMA zero-fills the tokens past it in a partial
    last block (they may hold any bytes, NaN included), and what lies past the tensors."""
    WG_ROWS: gl.constexpr = a_ring.shape[1]
    BLOCK_K: gl.constexpr = a_ring.shape[2]
    BLOCK_N: gl.constexpr = b_ring.shape[1]
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    HALVES: gl.constexpr = b_ring.shape[0] // STAGES
    BYTES: gl.constexpr = (PARTS * WG_ROWS * BLOCK_K + HALVES * BLOCK_N * BLOCK_K
                           + 4 * (PARTS * sa_desc.block_type.shape[0] + sb_desc.block_type.shape[0]))  # fmt: skip
    t_end = gl.where(E == 0, T, gl.load(GE + gl.maximum(E - 1, 0)).to(gl.int32))
    t_end = gl.maximum(t_end, 1)  # (all groups empty: no loads, but a valid descriptor)
    a_desc = tma.make_tensor_descriptor(A, [M, t_end], [stride_a, 1], [WG_ROWS, BLOCK_K], a_ring.layout)
    b_desc = tma.make_tensor_descriptor(B, [N, t_end], [stride_b, 1], [BLOCK_N, BLOCK_K], b_ring.layout)
    k_blocks = gl.cdiv(T, BLOCK_K)
    it = 0
    n_tiles = gl.maximum(E, 1) * gl.cdiv(M, PARTS * WG_ROWS) * gl.cdiv(N, HALVES * BLOCK_N)
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        _, m0, n0, kb_lo, kb_hi = _tile(tile, GE, E, M, N, k_blocks, PARTS * WG_ROWS, HALVES * BLOCK_N, BLOCK_K,
                                        GROUP_M)  # fmt: skip
        for kb in range(kb_lo, kb_hi):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # the first lap finds every stage free
            mbarrier.expect(ready.index(s), BYTES)
            for j in gl.static_range(PARTS):
                tma_load(a_desc, [m0 + j * WG_ROWS, kb * BLOCK_K], ready.index(s), a_ring.index(s * PARTS + j))
            for h in gl.static_range(HALVES):
                tma_load(b_desc, [n0 + h * BLOCK_N, kb * BLOCK_K], ready.index(s), b_ring.index(s * HALVES + h))
            for j in gl.static_range(PARTS):
                tma_load(sa_desc, [kb * M + m0 + j * WG_ROWS], ready.index(s), sa_ring.index(s * PARTS + j))
            tma_load(sb_desc, [kb * N + n0], ready.index(s), sb_ring.index(s))
            it += 1


@gluon.jit
def _consumer(a_ring, b_ring, sa_ring, sb_ring, ready, empty, c_desc, C, GE, E, M, N, T, stride_cm,
              WG: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, TMA_STORE: gl.constexpr):  # fmt: skip
    """Consumer partition WG: rows [m0 + 64 WG, m0 + 64 WG + 64) of each of this program's tiles, all of its
    columns (one or two 128-column halves). Expert e's output rows are rows e M ... of C viewed as (E M, N)."""
    PARTS: gl.constexpr = a_ring.shape[0] // STAGES
    HALVES: gl.constexpr = b_ring.shape[0] // STAGES
    ROWS: gl.constexpr = a_ring.shape[1]
    BLOCK_K: gl.constexpr = a_ring.shape[2]
    BLOCK_N: gl.constexpr = b_ring.shape[1]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)  # (64,): two distinct rows per thread
    col_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)  # (128,): 32 distinct columns per thread
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)  # (not read: use_acc=False)
    c_smem = c_desc  # (unused without TMA_STORE)
    if TMA_STORE:
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    k_blocks = gl.cdiv(T, BLOCK_K)
    rows_total = gl.maximum(E, 1) * M  # rows of C viewed as (E M, N)
    it = 0
    n_tiles = gl.maximum(E, 1) * gl.cdiv(M, PARTS * ROWS) * gl.cdiv(N, HALVES * BLOCK_N)
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m0, n0, kb_lo, kb_hi = _tile(tile, GE, E, M, N, k_blocks, PARTS * ROWS, HALVES * BLOCK_N, BLOCK_K,
                                        GROUP_M)  # fmt: skip
        row0 = e * M + m0 + WG * ROWS
        rows = row0 + gl.arange(0, ROWS, layout=row_layout)
        acc = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
        if HALVES == 2:
            acc1 = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=acc_layout)
        for _ in range(kb_lo, kb_hi):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_ring.index(s * PARTS + WG)  # (64, 128) e4m3, this warpgroup's rows
            partial = warpgroup_mma(a, b_ring.index(s * HALVES).permute((1, 0)), zero, use_acc=False, is_async=True)
            sa = sa_ring.index(s * PARTS + WG).load(row_layout)  # (64,) block kb's a-scales of our rows
            partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))  # (64, 128) fp32, one K block
            # (the b-scales only now: loaded before the wait, their 32 registers would be live next to the
            # accumulators and the partial, and ptxas spills)
            sb = sb_ring.index(s).slice(0, BLOCK_N).load(col_layout)  # (128,) its b-scales of our columns
            if HALVES == 2:
                acc += (partial * sb[None, :]) * sa[:, None]  # promotion on the CUDA cores: FMUL, FFMA
                # half 1 into the same registers (passing the spent partial as the accumulator ties them)
                partial = warpgroup_mma(a, b_ring.index(2 * s + 1).permute((1, 0)), partial, use_acc=False,
                                        is_async=True)  # fmt: skip
                partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))
                sb = sb_ring.index(s).slice(BLOCK_N, BLOCK_N).load(col_layout)
                mbarrier.arrive(empty.index(s))  # this warpgroup is done reading stage s
                acc1 += (partial * sb[None, :]) * sa[:, None]
            else:
                mbarrier.arrive(empty.index(s))
                acc += (partial * sb[None, :]) * sa[:, None]
            it += 1
        # rows past the expert's M are the next expert's: masked off (they leave through masked stores)
        row_end = e * M + M
        row_ok = rows < row_end
        _store(acc, c_smem, c_desc, C, rows, row_ok, row0, row_end, n0, rows_total, N, stride_cm, TMA_STORE)
        if HALVES == 2:
            _store(acc1, c_smem, c_desc, C, rows, row_ok, row0, row_end, n0 + BLOCK_N, rows_total, N, stride_cm,
                   TMA_STORE)  # fmt: skip
    if TMA_STORE:
        tma.store_wait(pendings=0)


@gluon.jit
def _fp8_wgrad_ws_kernel(
    A, B, sa_desc, sb_desc, c_desc, C, GE, E, M, N, T, stride_a, stride_b, stride_cm,
    A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
    TMA_STORE: gl.constexpr, CONSUMERS: gl.constexpr, HALVES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """Persistent: program p computes output tiles p, p + P, ... ((64 CONSUMERS) x (128 HALVES) each) of
    C = A @ B^T (E = 0) or, per expert e, of C[e] = A[:, tokens of e] @ B[:, tokens of e]^T, with 1x128 scales
    on both operands, by CONSUMERS consumer warpgroups and a loader warp that share a STAGES-deep ring of A and
    B tiles and their scale vectors."""
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * CONSUMERS, _WG_ROWS, _BLOCK_K], A_LAYOUT)
    b_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES * HALVES, _BLOCK_N, _BLOCK_K], B_LAYOUT)
    sa_ring = gl.allocate_shared_memory(gl.float32, [STAGES * CONSUMERS] + sa_desc.block_type.shape, sa_desc.layout)
    sb_ring = gl.allocate_shared_memory(gl.float32, [STAGES] + sb_desc.block_type.shape, sb_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the loader's expect; completes when the bytes have landed
        mbarrier.init(empty.index(s), count=CONSUMERS)  # one arrival per consumer warpgroup
    gl.warp_specialize(
        [
            (_consumer, (a_ring, b_ring, sa_ring, sb_ring, ready, empty, c_desc, C, GE, E, M, N, T, stride_cm, 0,
                         STAGES, GROUP_M, TMA_STORE)),
            (_consumer, (a_ring, b_ring, sa_ring, sb_ring, ready, empty, c_desc, C, GE, E, M, N, T, stride_cm, 1,
                         STAGES, GROUP_M, TMA_STORE)),
            (_loader, (A, B, sa_desc, sb_desc, a_ring, b_ring, sa_ring, sb_ring, ready, empty, GE, E, M, N, T,
                       stride_a, stride_b, STAGES, GROUP_M)),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )  # fmt: skip


def _scale_desc(scale: torch.Tensor, width: int):
    """A (rows, K/128) scale matrix stored token-block-major, as the flat vector it is in memory (K block kb's
    scale of row r at kb * rows + r), in runs of `width`. A run past a block's last row reads the next block's
    first scales: they scale rows that are never stored."""
    return host_descriptor(scale.t().reshape(-1), [width], _SCALE_LAYOUT)


def wgrad_ok(a_scale, b_scale) -> bool:
    """Whether this kernel takes these checked operands: both scale matrices token-block-major (unit row stride)
    with 16-byte aligned bases and K-block strides (row counts multiple of 4), as quantize_1x128_t stores them."""
    return all(
        s.stride(0) == 1 and s.stride(1) == s.shape[0] and s.data_ptr() % 16 == 0 and s.shape[0] % 4 == 0
        for s in (a_scale, b_scale)
    )


def choose_tiles(m: int, n: int, programs: int, out_bytes: int = 2) -> Tiles:
    """For 16-bit outputs, WGRAD_TILES' shape with the shorter estimated time (fp8_gemm_gluon.choose_tiles):
    wide on large outputs, square where the wide tiles would leave most SMs idle in the last wave. Square for
    fp32 outputs (`out_bytes` 4): their staging leaves the wide tile a 3-deep ring, and it measured no faster
    (740-766 against 740-789 TFLOP/s)."""
    return WGRAD_TILES["square"] if out_bytes > 2 else choose_gemm_tiles(m, n, 0, programs, WGRAD_TILES)


def kernel_args(a, a_scale, b, b_scale, c, programs, tiles: Tiles | None = None, group_ends=None):
    """(grid, args, constexprs) of _fp8_wgrad_ws_kernel for a (M, T) and b (N, T) e4m3, T % 128 == 0, 16-byte
    aligned with 16-byte row strides, their (M, T/128) and (N, T/128) scales passing wgrad_ok, c (M, N) bf16,
    fp16 or fp32 with a unit column stride, or grouped (group_ends (E,) int32 or int64, E >= 1, every group
    starting at a multiple of 128) c (E, M, N) contiguous. `tiles`: one of WGRAD_TILES, else choose_tiles picks."""
    (m, t), n = a.shape, b.shape[0]
    n_groups = 0 if group_ends is None else group_ends.shape[0]
    c2 = c.view(-1, n) if n_groups else c  # (E M, N): expert e's rows e M ...
    tiles = tiles or choose_tiles(m * max(n_groups, 1), n, programs, c.element_size())
    tma_store = c2.data_ptr() % 16 == 0 and (c2.stride(0) * c2.element_size()) % 16 == 0
    # (without the TMA store the kernel never reads c_desc: any descriptor fills the slot)
    c_desc = _desc(c2, [WG_ROWS, BLOCK_N], _GL_DTYPES[c.dtype]) if tma_store else _scale_desc(a_scale, WG_ROWS)
    count = max(n_groups, 1) * cdiv(m, tiles.block_m) * cdiv(n, tiles.block_n)
    grid = (min(count, programs),)
    ge = _no_groups(c.device) if group_ends is None else group_ends
    args = (a, b, _scale_desc(a_scale, WG_ROWS), _scale_desc(b_scale, tiles.block_n), c_desc, c2, ge, n_groups, m, n,
            t, a.stride(0), b.stride(0), c2.stride(0))  # fmt: skip
    constexprs = dict(
        A_LAYOUT=_smem_layout((WG_ROWS, BLOCK_K), gl.float8e4nv),
        B_LAYOUT=_smem_layout((BLOCK_N, BLOCK_K), gl.float8e4nv),
        STAGES=WGRAD_STAGES[tiles.halves],
        GROUP_M=GROUP_M,
        TMA_STORE=tma_store,
        CONSUMERS=tiles.consumers,
        HALVES=tiles.halves,
        CONSUMER_REGS=tiles.consumer_regs,
        LOADER_REGS=WGRAD_LOADER_REGS,
        num_warps=4,
    )
    return grid, args, constexprs


_launch = FastLaunch(_fp8_wgrad_ws_kernel)


def fp8_wgrad_gluon(a, a_scale, b, b_scale, c, tiles: Tiles | None = None, group_ends=None):
    """c (M, N) = the block-scaled a @ b^T with 1x128 scales on both operands, or grouped c[e] over the tokens of
    group e (see kernel_args); returns c. The kernel builds its A and B descriptors on the device."""
    if c.numel():
        grid, args, constexprs = kernel_args(a, a_scale, b, b_scale, c, _sm_count(c.device), tiles, group_ends)
        triton.set_allocator(device_scratch)
        _launch(grid, *args, **constexprs)
    return c


__all__ = ["WGRAD_TILES", "choose_tiles", "fp8_wgrad_gluon", "kernel_args", "wgrad_ok"]
