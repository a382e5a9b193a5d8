"""The consumer partition of the Gluon attention forward (attention_gluon.py, whose docstring describes the
kernel): per work item the loader hands out, a consumer warpgroup's 64 query rows against the item's key blocks.
Per key block j it issues S_j = Q K_j^T and, behind it, O += P_{j-1} V_{j-1}, waits for S_j only, computes the
online softmax of block j on the CUDA cores while the P V product runs on the tensor cores, then rescales O; at
the end it writes O / l and the logsumexp.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from moetron.kernels.attention_gluon_sched import _get_item, _key_range


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


__all__ = ["_consumer"]
