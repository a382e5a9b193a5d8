"""Warp-specialized FlashAttention forward for Hopper (sm_90), in Gluon (Triton 3.6's explicit-layout dialect).

The same arithmetic as the Triton forward (moetron/kernels/attention_triton_kernels.py: online softmax
over key blocks in log2 units, fp32 accumulation, logsumexp saved for the backward), organized the way
FlashAttention-3 (Shah et al. 2024) organizes it on Hopper. A work item is a block of 128 query rows of
one head (192 for head dim 64 without a window: three consumer warpgroups); each program is split into
partitions that run concurrently on the SM:

* a loader (1 warp): takes the next item from a counter shared by the programs, TMA-copies its query
  tiles (two buffers, so the next item's arrive during this one; one for head dim 192) and then the key
  and value tiles of its key blocks into a STAGES-deep ring of shared memory; `k_ready[s]`/`v_ready[s]`
  complete when stage s has landed, `k_empty[s]`/`v_empty[s]` when every consumer is done reading it;
* two or three consumer warpgroups (4 warps each), each owning 64 query rows. Per key block j a consumer issues
  S_j = Q K_j^T and, behind it, O += P_{j-1} V_{j-1} (both asynchronous wgmma), waits for S_j only,
  computes the softmax of block j on the CUDA cores while the P V product runs on the tensor cores,
  then waits for it and rescales O. That is FlashAttention-3's intra-warpgroup overlap; the two
  warpgroups drift apart, so one's softmax also overlaps the other's matrix products. The consumer partition
  is in attention_gluon_consumer.py, the work items in attention_gluon_sched.py.

Masks: only the blocks that need one pay for it (the causal diagonal, windows, the partial last block),
and a warpgroup skips the item's key blocks past its own rows' diagonal. Causal items run longest first
and programs take them as they finish (dynamic scheduling, attention_gluon_sched.py), so the short ones
fill the tail.
Batches are variable-length sequences as in the Triton kernels (cu_q, cu_k row offsets of the flattened
(tokens, heads, dim) tensors). Tiles are read through host tensor descriptors over (tokens, heads * dim):
rows past a sequence belong to the next one, so keys past k_len are masked and query rows past q_len
are computed but never written (outputs leave through masked stores).

Shapes served: bf16/fp16, head dims (q/k, v) in {(64, 64), (128, 128), (192, 128)}, any lengths, causal
or not, windows, GQA. `supported()` says whether an input qualifies; the Triton kernel serves the rest,
TRITON_INTERPRET=1 and other GPUs (Gluon has no interpreter mode). tests/kernels/test_attention_gluon.py
compiles this kernel for sm_90a on the CPU (Triton ships ptxas); GPU tests in test_attention_gpu.py.
"""

from __future__ import annotations

import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from moetron.kernels.attention_gluon_consumer import _consumer
from moetron.kernels.attention_gluon_sched import (
    _item,
    _item_counter,
    _key_range,
    _put_item,
    l2_section,
)
from moetron.kernels.gluon_names import tma_load
from moetron.kernels.launch import FastLaunch, cdiv

WG_ROWS = 64  # query rows per consumer warpgroup: one m64 wgmma
BLOCK_N = 128  # keys per block
# Registers per thread: O (up to 64 fp32) + S (64) + P (32) + softmax state per consumer; the worker consumers
# get REGS[consumers][0] each, the loader REGS[consumers][1], the default partition what is left of 512 per
# warpgroup (two consumers: 240; three: 168), found by the compile test.
REGS = {2: (232, 32), 3: (160, 24)}
HEAD_DIMS = ((64, 64), (128, 128), (192, 128))  # (q/k, v) pairs with a compiled configuration
LOG2E = 1.4426950408889634
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _consumers(d_qk: int, d_v: int, window) -> int:
    """Consumer warpgroups: three (192 query rows an item) for head dim 64 without a window, whose 64 x 64 O
    accumulator leaves the registers for a third (non-causal: 3-6% faster than two on the H100; causal, now
    that each warpgroup stops at its own diagonal and items are scheduled dynamically: 0-4%,
    bench/results/attention_sched_experiment.json); two (128 rows) otherwise: at 160 registers the window
    masks spill (bench/results/attention_hd64_experiment.json)."""
    return 3 if max(d_qk, d_v) <= 64 and window is None else 2


def _q_bufs(d_qk: int) -> int:
    """Query-tile buffers: two (the loader fetches the next item's query tiles while this item runs) where
    they fit next to the key/value ring; MLA's 192-wide tiles keep one."""
    return 2 if d_qk <= 128 else 1


def _stages(d_qk: int, d_v: int) -> int:
    """Ring depth that fits next to the query tiles in 227 KB of shared memory."""
    return 3 if max(d_qk, d_v) <= 64 else 2


@gluon.jit
def _loader(
    Q, K, V, q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty, v_ready,
    v_empty, cu_q, cu_k, next_item, total_q, total_k, stride_qt, stride_kt, stride_vt, n_heads, group, window,
    n_q_blocks, n_bh, section,
    D_QK: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """Producer partition: takes work items (the program id, then programs + an atomic counter's count) and,
    for each, writes it to shared memory for the consumers and copies its query tiles (into buffer
    n_done % Q_BUFS, once the consumers' Q K^T products of the item that used it last are done), then key
    block j's K and V into ring stage c % STAGES (c counts blocks over items).
    Query/key tiles of head dim 192 come in two column pieces, 128 + 64 wide (TMA boxes are powers of
    two): the tail tiles. The descriptors are built here, on the device, once per program."""
    Q_BUFS: gl.constexpr = q_ready.shape[0]
    PARTS: gl.constexpr = q_tiles.shape[0] // Q_BUFS  # consumer warpgroups
    ROWS: gl.constexpr = q_tiles.shape[1]
    MAIN: gl.constexpr = q_tiles.shape[2]
    TAIL: gl.constexpr = D_QK > MAIN
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D_V: gl.constexpr = v_ring.shape[2]
    q_desc = tma.make_tensor_descriptor(Q, [total_q, n_heads * D_QK], [stride_qt, 1], [ROWS, MAIN], q_tiles.layout)
    k_desc = tma.make_tensor_descriptor(K, [total_k, n_heads // group * D_QK], [stride_kt, 1], [BLOCK_N, MAIN],
                                        k_ring.layout)  # fmt: skip
    v_desc = tma.make_tensor_descriptor(V, [total_k, n_heads // group * D_V], [stride_vt, 1], [BLOCK_N, D_V],
                                        v_ring.layout)  # fmt: skip
    if TAIL:
        qt_desc = tma.make_tensor_descriptor(Q, [total_q, n_heads * D_QK], [stride_qt, 1], [ROWS, D_QK - MAIN],
                                             qt_tiles.layout)  # fmt: skip
        kt_desc = tma.make_tensor_descriptor(K, [total_k, n_heads // group * D_QK], [stride_kt, 1],
                                             [BLOCK_N, D_QK - MAIN], kt_ring.layout)  # fmt: skip
    q_bytes: gl.constexpr = PARTS * ROWS * D_QK * Q.dtype.element_ty.primitive_bitwidth // 8
    k_bytes: gl.constexpr = BLOCK_N * D_QK * K.dtype.element_ty.primitive_bitwidth // 8
    v_bytes: gl.constexpr = BLOCK_N * D_V * V.dtype.element_ty.primitive_bitwidth // 8
    c = 0
    n_done = 0
    t = gl.program_id(0)
    while t < n_bh * n_q_blocks:
        t_next = gl.num_programs(0) + gl.atomic_add(next_item, 1)  # (its latency hides behind this item's copies)
        h, q_start, k_start, q_len, k_len, m0 = _item(t, n_q_blocks, n_heads, n_bh, section, cu_q, cu_k, PARTS * ROWS,
                                                      CAUSAL)  # fmt: skip
        if m0 < q_len:
            lo, full, hi = _key_range(m0, k_len, k_len - q_len, window, PARTS * ROWS, BLOCK_N, CAUSAL, HAS_WINDOW,
                                      1)  # fmt: skip
            q_col = h * D_QK
            k_col = h // group * D_QK
            qb = n_done % Q_BUFS
            # the first lap finds the query buffers free
            mbarrier.wait(q_empty.index(qb), ((n_done // Q_BUFS) & 1) ^ 1)
            _put_item(items.index(qb), h, q_start, k_start, q_len, k_len, m0)  # for the consumers
            mbarrier.expect(q_ready.index(qb), q_bytes)
            for w in gl.static_range(PARTS):
                tma_load(q_desc, [q_start + m0 + w * ROWS, q_col], q_ready.index(qb), q_tiles.index(qb * PARTS + w))
                if TAIL:
                    tma_load(qt_desc, [q_start + m0 + w * ROWS, q_col + MAIN], q_ready.index(qb),
                             qt_tiles.index(qb * PARTS + w))  # fmt: skip
            for n0 in range(k_start + lo, k_start + hi, BLOCK_N):
                s = c % STAGES
                free = ((c // STAGES) & 1) ^ 1  # the first lap finds every stage free
                mbarrier.wait(k_empty.index(s), free)
                mbarrier.expect(k_ready.index(s), k_bytes)
                tma_load(k_desc, [n0, k_col], k_ready.index(s), k_ring.index(s))
                if TAIL:
                    tma_load(kt_desc, [n0, k_col + MAIN], k_ready.index(s), kt_ring.index(s))
                mbarrier.wait(v_empty.index(s), free)
                mbarrier.expect(v_ready.index(s), v_bytes)
                tma_load(v_desc, [n0, h // group * D_V], v_ready.index(s), v_ring.index(s))
                c += 1
            n_done += 1
        t = t_next
    # No item left: the consumers read head -1.
    qb = n_done % Q_BUFS
    mbarrier.wait(q_empty.index(qb), ((n_done // Q_BUFS) & 1) ^ 1)
    _put_item(items.index(qb), -1, 0, 0, 0, 0, 0)
    mbarrier.arrive(q_ready.index(qb))
    # The last program out (every other one has taken its last item) zeroes the counter pair for the next launch.
    if gl.atomic_add(next_item + 1, 1) == gl.num_programs(0) - 1:
        gl.atomic_xchg(next_item, 0)
        gl.atomic_xchg(next_item + 1, 0)


@gluon.jit
def _attn_fwd_ws_kernel(
    Q, K, V, Out, LSE, cu_q, cu_k, total_q, total_k, stride_qt, stride_kt, stride_vt, stride_ot, stride_oh,
    stride_lh, n_heads, group, scale_log2, window, n_q_blocks, n_bh, section, next_item,
    D_QK: gl.constexpr, D_V: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
    SMEM: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
    Q_BUFS: gl.constexpr,
):  # fmt: skip
    """Persistent: each program takes work items (a (64 CONSUMERS)-query block of one head and sequence; see
    _item) until none is left; next_item[0] counts the items taken past the first wave and next_item[1] the
    programs done (int32, both zero at launch and zeroed again by the last program; see
    attention_gluon_sched.py). CONSUMERS (2, or 3 for head dim 64) consumer warpgroups (the default partition
    is the first) and a loader warp share the query tiles and the key/value ring; the loader fetches the next
    item's tiles during the current one's last blocks and output."""
    ROWS: gl.constexpr = 64
    MAIN: gl.constexpr = 128 if D_QK > 128 else D_QK  # query/key columns in the main tiles
    TAIL: gl.constexpr = D_QK > MAIN
    BLOCK_N: gl.constexpr = 128
    q_tiles = gl.allocate_shared_memory(Q.dtype.element_ty, [Q_BUFS * CONSUMERS, ROWS, MAIN], SMEM)
    k_ring = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, MAIN], SMEM)
    if TAIL:
        qt_tiles = gl.allocate_shared_memory(Q.dtype.element_ty, [Q_BUFS * CONSUMERS, ROWS, D_QK - MAIN], SMEM)
        kt_ring = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, D_QK - MAIN], SMEM)
    else:
        qt_tiles = q_tiles  # (unused)
        kt_ring = k_ring
    v_ring = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, BLOCK_N, D_V], SMEM)
    items = gl.allocate_shared_memory(gl.int32, [Q_BUFS, 8], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(Q_BUFS):
        mbarrier.init(q_ready.index(b), count=1)  # the loader's expect; completes when the bytes have landed
        mbarrier.init(q_empty.index(b), count=CONSUMERS)  # one arrival per consumer warpgroup
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
    if CONSUMERS == 3:
        gl.warp_specialize(
            [
                (_consumer, (q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, Out, LSE, stride_ot, stride_oh, stride_lh, window, scale_log2, 0,
                             D_QK, STAGES, CAUSAL, HAS_WINDOW)),
                (_consumer, (q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, Out, LSE, stride_ot, stride_oh, stride_lh, window, scale_log2, 1,
                             D_QK, STAGES, CAUSAL, HAS_WINDOW)),
                (_consumer, (q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, Out, LSE, stride_ot, stride_oh, stride_lh, window, scale_log2, 2,
                             D_QK, STAGES, CAUSAL, HAS_WINDOW)),
                (_loader, (Q, K, V, q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready,
                           k_empty, v_ready, v_empty, cu_q, cu_k, next_item, total_q, total_k, stride_qt, stride_kt,
                           stride_vt, n_heads, group, window, n_q_blocks, n_bh, section, D_QK, STAGES, CAUSAL,
                           HAS_WINDOW)),
            ],
            [4, 4, 1],
            [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip
    else:
        gl.static_assert(CONSUMERS == 2, "CONSUMERS: 2, or 3 for head dim 64")
        gl.warp_specialize(
            [
                (_consumer, (q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, Out, LSE, stride_ot, stride_oh, stride_lh, window, scale_log2, 0,
                             D_QK, STAGES, CAUSAL, HAS_WINDOW)),
                (_consumer, (q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, Out, LSE, stride_ot, stride_oh, stride_lh, window, scale_log2, 1,
                             D_QK, STAGES, CAUSAL, HAS_WINDOW)),
                (_loader, (Q, K, V, q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready,
                           k_empty, v_ready, v_empty, cu_q, cu_k, next_item, total_q, total_k, stride_qt, stride_kt,
                           stride_vt, n_heads, group, window, n_q_blocks, n_bh, section, D_QK, STAGES, CAUSAL,
                           HAS_WINDOW)),
            ],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )  # fmt: skip


def gluon_enabled(x: torch.Tensor) -> bool:
    """What both Gluon attention kernels need of an input: a bf16/fp16 tensor on an sm_90 GPU, outside the
    interpreter, with MOETRON_ATTN_GLUON not set to 0."""
    return (
        x.is_cuda
        and x.dtype in _GL_DTYPES
        and os.environ.get("MOETRON_ATTN_GLUON", "1") != "0"
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
        and _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) == (9, 0)
    )


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Gluon forward serves these inputs: gluon_enabled and a compiled head-dim pair."""
    return gluon_enabled(q) and (q.shape[-1], v.shape[-1]) in HEAD_DIMS


@functools.cache
def _capability(device: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _smem_layout(dtype: torch.dtype):
    """128-byte swizzled shared-memory tiles: every tile here is at least 64 16-bit elements wide."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, dim) with heads packed and 16-byte aligned rows, as the (tokens, heads * dim)
    tensor descriptors need (views of a fused projection usually are)."""
    ok = x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.data_ptr() % 16 == 0 and (x.stride(0) * 2) % 16 == 0
    return x if ok else x.contiguous()


def kernel_args(q2, k2, v2, out, lse, cu_q, cu_k, max_q, n_heads, group, causal, scale, window, programs):
    """(grid, args, constexprs) of _attn_fwd_ws_kernel for flattened (tokens, heads, dim) q2, k2, v2,
    out (tokens, heads, d_v), lse (heads, tokens) fp32, on `programs` persistent programs at most."""
    d_qk, d_v = q2.shape[2], v2.shape[2]
    consumers = _consumers(d_qk, d_v, window)
    q2, k2, v2 = _packed(q2), _packed(k2), _packed(v2)
    n_q_blocks = cdiv(max_q, consumers * WG_ROWS)
    n_bh = (cu_q.numel() - 1) * n_heads  # (sequence, head) pairs
    section = l2_section(n_bh, max_q * (d_qk + d_v) * q2.element_size() / group)
    next_item = _item_counter(q2.device)
    grid = (min(n_bh * n_q_blocks, programs),)
    args = (
        q2, k2, v2, out, lse, cu_q, cu_k, q2.shape[0], k2.shape[0], q2.stride(0), k2.stride(0), v2.stride(0),
        out.stride(0), out.stride(1), lse.stride(0), n_heads, group, scale * LOG2E, window or 0, n_q_blocks, n_bh,
        section, next_item,
    )  # fmt: skip
    constexprs = dict(
        D_QK=d_qk,
        D_V=d_v,
        STAGES=_stages(d_qk, d_v),
        CAUSAL=causal,
        HAS_WINDOW=window is not None,
        SMEM=_smem_layout(q2.dtype),
        CONSUMERS=consumers,
        CONSUMER_REGS=REGS[consumers][0],
        LOADER_REGS=REGS[consumers][1],
        Q_BUFS=_q_bufs(d_qk),
        num_warps=4,
    )
    return grid, args, constexprs


_launch = FastLaunch(_attn_fwd_ws_kernel)  # skips Triton's per-call binding once a signature has run


def gluon_attention_forward(q2, k2, v2, out, lse, cu_q, cu_k, max_q, n_heads, group, causal, scale, window):
    """Fill out (tokens, heads, d_v) and lse (heads, tokens) for the flattened inputs; see kernel_args.
    The kernel builds its tensor descriptors in global scratch memory from triton.set_allocator."""
    programs = _sm_count(q2.device.index if q2.device.index is not None else torch.cuda.current_device())
    grid, args, constexprs = kernel_args(q2, k2, v2, out, lse, cu_q, cu_k, max_q, n_heads, group, causal, scale,
                                         window, programs)  # fmt: skip
    if grid[0]:
        _launch(grid, *args, **constexprs)


__all__ = ["gluon_attention_forward", "gluon_enabled", "kernel_args", "supported", "HEAD_DIMS"]
