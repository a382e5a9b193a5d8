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
  warpgroups drift apart, so one's softmax also overlaps the other's matrix products.

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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from moetron.kernels.attention_gluon_sched import (
    _get_item,
    _item,
    _item_counter,
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
def _key_range(m0, k_len, offset, window, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, MIN_BLOCKS: gl.constexpr):  # fmt: skip
    """Key blocks a query block [m0, m0 + BLOCK_M) visits, [lo, hi); from `full` on they need a mask (the
    causal diagonal, the partial last block, every block of a window). MIN_BLOCKS = 1 (the forward): a
    query block that sees no key at all still runs one fully masked block (its output is 0, its
    logsumexp -inf); the backward's dQ kernel passes 0."""
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = gl.minimum(k_len, m0 + BLOCK_M + offset)
        full = gl.maximum(0, gl.minimum(m0 + offset + 1, k_len)) // BLOCK_N * BLOCK_N
    else:
        full = k_len // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        lo = gl.maximum(0, (m0 + offset - window + 1) // BLOCK_N * BLOCK_N)
        full = lo
    hi = gl.maximum(hi, lo + MIN_BLOCKS)
    full = gl.minimum(gl.maximum(full, lo), hi)
    return lo, full, hi


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
def _pack16(x, dtype: gl.constexpr):
    """x (fp32) rounded to dtype (bf16/fp16) two elements at a time, with one cvt.rn.{bf16,f16}x2.f32 per
    pair. `x.to(dtype)` converts one element at a time and ptxas then packs each pair in the opposite
    order and swaps it back (a PRMT per register: 32 per thread per key block here)."""
    if dtype == gl.bfloat16:
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16,
                                         is_pure=True, pack=2)  # fmt: skip
    else:
        return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.float16,
                                         is_pure=True, pack=2)  # fmt: skip


@gluon.jit
def _softmax(scores, m_i, l_i, rows, n0, k_len, offset, window, scale_log2,
             MASKED: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr):  # fmt: skip
    """Online softmax of one block of raw scores (64, BLOCK_N) for keys n0 .. n0 + BLOCK_N: P (unnormalized,
    fp32), the new running max and sum, and alpha = exp2(m_old - m_new), the factor that rescales what O has
    accumulated.

    The mask keeps, per query row, the keys in one interval (first, last]: the causal diagonal, the window and
    the end of the keys bound it. Each key's offset in the block (an arange, the same in every block) is
    compared with the row's bounds minus n0: one compare per score (two with a window), against three to
    four for key positions tested against each bound in turn, which measured 2-8% faster on causal inputs
    (bench/results/attention_mask_experiment.json). Rows past q_len are not masked: they are computed,
    never stored, and no row reads another."""
    if MASKED:
        pos = rows + offset  # (64,) query position on the key axis (bottom-right causal alignment)
        if CAUSAL:
            last = gl.minimum(pos, k_len - 1)
        elif HAS_WINDOW:
            last = gl.minimum(pos + window - 1, k_len - 1)
        else:
            last = pos * 0 + (k_len - 1)
        key = gl.arange(0, scores.shape[1], layout=gl.SliceLayout(0, scores.type.layout))  # key - n0
        ok = key[None, :] <= (last - n0)[:, None]
        if HAS_WINDOW:
            ok = ok & (key[None, :] > (pos - window - n0)[:, None])
        scores = gl.where(ok, scores, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(scores, 1) * scale_log2)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    else:
        m_new = gl.maximum(m_i, gl.max(scores, 1) * scale_log2)
        m_safe = m_new
    # Scale and shift in one FMA per score (log2 units).
    p = gl.exp2(scores * scale_log2 - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _block(
    q_tile, qt_tile, k_ring, kt_ring, v_ring, k_ready, k_empty, v_ready, v_empty, j, n0, acc, p_op, m_i, l_i,
    rows, k_len, offset, window, scale_log2,
    s_layout: gl.constexpr, STAGES: gl.constexpr, TAIL: gl.constexpr, MASKED: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """Key block j (keys n0 .. n0 + BLOCK_N) of one consumer, overlapped with block j - 1's P V product.
    acc (64, D_V) fp32 and p_op (64, BLOCK_N) 16-bit (block j - 1's probabilities) in, both updated out."""
    ROWS: gl.constexpr = q_tile.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    s = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
    zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)  # (not read: use_acc=False)
    scores = warpgroup_mma(q_tile, k_ring.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
    if TAIL:
        scores = warpgroup_mma(qt_tile, kt_ring.index(s).permute((1, 0)), scores, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_ring.index(prev), acc, is_async=True)  # O += P_{j-1} V_{j-1}
    scores = warpgroup_mma_wait(num_outstanding=1, deps=(scores,))  # S_j is done; P V may still run
    mbarrier.arrive(k_empty.index(s))
    p, m_i, l_i, alpha = _softmax(scores, m_i, l_i, rows, n0, k_len, offset, window, scale_log2,
                                  MASKED, CAUSAL, HAS_WINDOW)  # fmt: skip
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(prev))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    p_op = gl.convert_layout(_pack16(p, q_tile.dtype), p_op.type.layout)
    return acc, p_op, m_i, l_i


@gluon.jit
def _consumer(
    q_tiles, qt_tiles, k_ring, kt_ring, v_ring, items, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, Out,
    LSE, stride_ot, stride_oh, stride_lh, window, scale_log2,
    WG: gl.constexpr, D_QK: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """Consumer partition WG: query rows [m0 + 64 WG, m0 + 64 WG + 64) of each work item the loader hands
    out, until it hands out head -1."""
    Q_BUFS: gl.constexpr = q_ready.shape[0]
    PARTS: gl.constexpr = q_tiles.shape[0] // Q_BUFS  # consumer warpgroups
    ROWS: gl.constexpr = q_tiles.shape[1]
    TAIL: gl.constexpr = D_QK > q_tiles.shape[2]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D_V: gl.constexpr = v_ring.shape[2]
    # wgmma accumulator layouts over one warpgroup (16-bit inputs: k = 16 per instruction)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D_V, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P from registers
    c = 0  # key blocks consumed so far, over all items: the ring position
    n_done = 0
    mbarrier.wait(q_ready.index(0), 0)
    h, q_start, k_start, q_len, k_len, m0 = _get_item(items.index(0))  # the loader's item; h = -1: none left
    while h >= 0:
        qb = n_done % Q_BUFS
        q_tile = q_tiles.index(qb * PARTS + WG)  # (64, D_QK), or its first 128 columns (TAIL)
        qt_tile = qt_tiles.index(qb * PARTS + WG)  # (64, 64): columns 128..191 (TAIL; unused otherwise)
        offset = k_len - q_len
        lo, full, hi = _key_range(m0, k_len, offset, window, PARTS * ROWS, BLOCK_N, CAUSAL, HAS_WINDOW, 1)
        # This warpgroup's rows may be done before the item's last key blocks (causal: the blocks past
        # their diagonal) or lie past q_len (then every block): it runs [lo, hi_wg), unmasked up to
        # full_wg, and only releases the ring stages of the blocks after.
        m0_wg = m0 + WG * ROWS
        _, full_wg, hi_wg = _key_range(m0_wg, k_len, offset, window, ROWS, BLOCK_N, CAUSAL, HAS_WINDOW, 1)
        if HAS_WINDOW:
            full_wg = lo  # every block of a window is masked
        hi_wg = gl.where(m0_wg < q_len, gl.minimum(hi_wg, hi), lo)
        full_wg = gl.minimum(gl.maximum(full_wg, lo), hi_wg)
        rows = m0_wg + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))  # (64,) positions
        if hi_wg > lo:
            # Block lo alone: its softmax has no P V product to hide behind. Masked if any of its scores
            # needs it.
            s = c % STAGES
            mbarrier.wait(k_ready.index(s), (c // STAGES) & 1)
            zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
            scores = warpgroup_mma(q_tile, k_ring.index(s).permute((1, 0)), zero, use_acc=False, is_async=TAIL)
            if TAIL:
                scores = warpgroup_mma(qt_tile, kt_ring.index(s).permute((1, 0)), scores, is_async=True)
                scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores,))
            mbarrier.arrive(k_empty.index(s))
            m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
            if lo + BLOCK_N <= full_wg:
                p, m_i, l_i, alpha = _softmax(scores, m_i, l_i, rows, lo, k_len, offset, window, scale_log2,
                                              False, CAUSAL, HAS_WINDOW)  # fmt: skip
            else:
                p, m_i, l_i, alpha = _softmax(scores, m_i, l_i, rows, lo, k_len, offset, window, scale_log2,
                                              True, CAUSAL, HAS_WINDOW)  # fmt: skip
            p_op = gl.convert_layout(_pack16(p, q_tile.dtype), p_layout)
            acc = gl.zeros([ROWS, D_V], gl.float32, layout=o_layout)
            c += 1

            for n0 in range(lo + BLOCK_N, full_wg, BLOCK_N):  # every (query, key) pair allowed: no mask
                acc, p_op, m_i, l_i = _block(
                    q_tile, qt_tile, k_ring, kt_ring, v_ring, k_ready, k_empty, v_ready, v_empty, c, n0, acc, p_op,
                    m_i, l_i, rows, k_len, offset, window, scale_log2,
                    s_layout, STAGES, TAIL, False, CAUSAL, HAS_WINDOW,
                )  # fmt: skip
                c += 1
            for n0 in range(gl.maximum(full_wg, lo + BLOCK_N), hi_wg, BLOCK_N):
                acc, p_op, m_i, l_i = _block(
                    q_tile, qt_tile, k_ring, kt_ring, v_ring, k_ready, k_empty, v_ready, v_empty, c, n0, acc, p_op,
                    m_i, l_i, rows, k_len, offset, window, scale_log2,
                    s_layout, STAGES, TAIL, True, CAUSAL, HAS_WINDOW,
                )  # fmt: skip
                c += 1
            mbarrier.arrive(q_empty.index(qb))  # every Q K^T of the item is done: the loader may fetch the next Q
            last = (c - 1) % STAGES  # the last block's P V product
            mbarrier.wait(v_ready.index(last), ((c - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_ring.index(last), acc)
            mbarrier.arrive(v_empty.index(last))

            seen = l_i > 0
            l_safe = gl.where(seen, l_i, 1.0)
            out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
            lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
            gl.store(LSE + h * stride_lh + q_start + rows, lse, mask=rows < q_len)
            o_rows = m0 + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            o_cols = gl.arange(0, D_V, layout=gl.SliceLayout(0, o_layout))
            ptrs = Out + h * stride_oh + (q_start + o_rows).to(gl.int64)[:, None] * stride_ot + o_cols[None, :]
            gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(o_rows < q_len)[:, None])
        else:
            mbarrier.arrive(q_empty.index(qb))
        # The item's blocks past hi_wg: wait until every consumer has released the stage's previous
        # block (so that this arrival counts for this block), then release it.
        for _n0 in range(lo + gl.cdiv(hi_wg - lo, BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            s = c % STAGES
            free = ((c // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(s), free)
            mbarrier.arrive(k_empty.index(s))
            mbarrier.wait(v_empty.index(s), free)
            mbarrier.arrive(v_empty.index(s))
            c += 1
        n_done += 1
        qb = n_done % Q_BUFS
        mbarrier.wait(q_ready.index(qb), (n_done // Q_BUFS) & 1)
        h, q_start, k_start, q_len, k_len, m0 = _get_item(items.index(qb))


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
