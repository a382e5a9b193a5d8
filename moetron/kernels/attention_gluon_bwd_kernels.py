"""Warp-specialized FlashAttention backward for Hopper (sm_90a) in Gluon (Triton 3.6), FA3-style but
deterministic: two kernels, no atomics (like moetron/kernels/attention_triton_kernels.py's
_bwd_dkdv_kernel / _bwd_dq_kernel, whose semantics and argument conventions this follows).

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale * dS^T Q,  dQ = scale * dS K
    P = exp2(S * scale * log2(e) - lse2),  lse2 = lse * log2(e) (+inf for rows that saw no key)

dK/dV kernel: one program per (128-key block, kv head, sequence); 3 partitions:
  * loader (1 warp): TMA of the program's K and V rows (once, as two 64-row halves), then for every
    query head of the GQA group and every query block of BM rows the Q and dO tiles into a STAGES-deep
    ring (ready[s]: bytes landed; empty[s]: both consumer warpgroups are done with stage s);
  * two consumer warpgroups (default partition + one 4-warp worker), each owning 64 key rows:
        S^T  = K_wg Q^T      (64 x BM, A = K smem half, B = Q tile permuted: K-major)
        dP^T = V_wg dO^T     (64 x BM, issued right after S^T; the exp2 overlaps it)
        P^T  = exp2(S^T c - lse2[None, :]) (masked only on causal-diagonal / window blocks)
        dS^T = P^T (dP^T - delta[None, :])
        dV  += P^T  (registers, DotOperand A) @ dO   (B = dO tile [BM, Dv], MN-major)
        dK  += dS^T (registers)               @ Q    (B = Q tile [BM, D], MN-major)
    dK/dV stay in registers (fp32) for the whole program; at the end each warpgroup writes them
    (bf16/fp16) over its own half of the K/V shared tiles and stores them with TMA when its 64 rows lie
    inside the sequence, else with masked stores (rows past the sequence belong to the next one).
dQ kernel (moetron/kernels/attention_gluon_bwd_dq.py): one program per (128-query block, head, sequence): the
  loader loads Q and dO once (two 64-row halves) and streams K/V tiles of BN rows through the ring; each consumer
  warpgroup owns 64 query rows: S = Q_wg K^T, dP = dO_wg V^T, P, dS as above, dQ += dS (registers) @ K (B = K
  tile, MN-major).
This file holds the dK/dV kernel and the helpers both kernels use.

Details:
  * lse2 / delta of each query block (dK/dV kernel) are read by the loader warp with masked gl.loads
    (+inf / 0 past q_len) and stored next to the Q/dO stage in shared memory (ready[s] then counts two
    arrivals: the expect + TMA bytes and this store); the consumers read them right before use (holding
    them across the wgmmas in registers spilled);
  * dV += P^T dO is issued before waiting for dP^T, so it overlaps the dS arithmetic;
  * values needed only per GQA head / in the epilogue (loop bounds, output row, kv head) are parked in a
    few bytes of shared memory instead of registers (keeping them live made ptxas spill);
  * D = 128 with a window uses BM = 32 (the window mask did not fit next to BM = 64 tiles);
  * causal dQ programs start with the last (heaviest) query blocks.

Masking (flattened (tokens, heads * dim) 2-D descriptors over the whole batch: rows past a sequence are
the next sequence's rows, not zeros):
  * query rows past q_len get lse2 = +inf and delta = 0 (masked gl.loads) -> P = dS = 0 in both kernels;
  * keys past k_len: irrelevant in the dK/dV kernel (their dK/dV rows are never written); masked to
    P = 0 in the dQ kernel (the tail key block is on the masked path).
Head dims: (D_QK, D_V) in {(64, 64), (128, 128), (192, 128)}. Triton tensors and TMA blocks must be powers
of two, so D_QK = 192 is handled as two column chunks 128 + 64 (SPLIT): two smem tiles, two wgmmas.
Sliding windows are supported (every visited block is masked, as in the Triton kernels).

The launcher, its tile configurations and the dispatch rule are in moetron/kernels/attention_gluon_bwd.py;
the forward is moetron/kernels/attention_gluon.py. tests/kernels/test_attention_gluon.py compiles both
kernels for sm_90a on the CPU; tests/kernels/test_attention_gpu.py checks their gradients on the H100.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from moetron.kernels.gluon_names import tma_load, tma_store

WG_ROWS = 64  # rows per consumer warpgroup (one m64 wgmma): 128 per program with two
CONSUMER_REGS = gl.constexpr(240)  # the worker consumer; the default partition gets 504 - 240 - 24 = 240 as well
LOADER_REGS = gl.constexpr(24)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@gluon.constexpr_function
def _acc_layout(n):
    """wgmma accumulator layout of a 64 x n fp32 tile over one warpgroup (16-bit operands)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _op_layout(n):
    """Register A operand of a wgmma whose accumulator is 64 x n."""
    return gl.DotOperandLayout(operand_index=0, parent=_acc_layout(n), k_width=2)


@gluon.jit
def _stash_put(stash, a, b, c, d, e, f):
    """Park six int32 scalars in shared memory: values used rarely (per GQA head, in the epilogue) that
    made ptxas spill when kept in registers across the main loop."""
    layout: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])  # every thread: all 8
    i = gl.arange(0, 8, layout=layout)
    v = gl.where(i == 0, a, gl.where(i == 1, b, gl.where(i == 2, c, gl.where(i == 3, d, gl.where(i == 4, e, f)))))
    stash.store(v)


@gluon.jit
def _stash_get(stash, j: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
    i = gl.arange(0, 8, layout=layout)
    return gl.sum(gl.where(i == j, stash.load(layout), 0), axis=0)  # (within each thread)


@gluon.jit
def _store_rows(ptr, stride_t, row0, n_rows, smem):
    """Write the first n_rows rows of a (64, COLS) shared tile to ptr + (row0 + r) * stride_t + c."""
    ROWS: gl.constexpr = smem.shape[0]
    COLS: gl.constexpr = smem.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    tile = smem.load(layout)
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    ptrs = ptr + (row0 + r).to(gl.int64)[:, None] * stride_t + c[None, :]
    gl.store(ptrs, tile, mask=(r < n_rows)[:, None] & (c < COLS)[None, :])


@gluon.jit
def _write_out(desc, ptr, stride_t, smem, value, row0, col0, n_rows):
    """value (64 x COLS, registers) -> smem -> rows [row0, row0 + min(64, n_rows)) of the output:
    TMA store when the 64 rows all belong to the sequence, masked stores otherwise."""
    smem.store(value)
    fence_async_shared()
    if n_rows >= smem.shape[0]:
        tma_store(desc, [row0, col0], smem)
        tma.store_wait(pendings=0)
    else:
        _store_rows(ptr + col0, stride_t, row0, n_rows, smem)


@gluon.jit
def _load_halves(x_desc, xb_desc, y_desc, x_smem, xb_smem, y_smem, bar, row0, x_col, y_col, SPLIT: gl.constexpr):
    """The program's fixed tiles, loaded once as two 64-row halves (one per consumer warpgroup): rows
    [row0, row0 + 128) of x (columns x_col..; with SPLIT its 128 + 64 column pieces) and of y (y_col..)."""
    ROWS: gl.constexpr = x_desc.block_type.shape[0]
    DA: gl.constexpr = x_desc.block_type.shape[1]
    BYTES: gl.constexpr = 2 * (x_desc.block_type.nbytes + y_desc.block_type.nbytes + SPLIT * xb_desc.block_type.nbytes)
    mbarrier.expect(bar, BYTES)
    for w in gl.static_range(2):
        row = row0 + w * ROWS
        tma_load(x_desc, [row, x_col], bar, x_smem.index(w))
        if SPLIT:
            tma_load(xb_desc, [row, x_col + DA], bar, xb_smem.index(w))
        tma_load(y_desc, [row, y_col], bar, y_smem.index(w))


# ----------------------------------------------------------------------------------------------
# dK / dV kernel
# ----------------------------------------------------------------------------------------------


@gluon.jit
def _dkdv_loader(
    q_desc, qb_desc, do_desc, k_desc, kb_desc, v_desc,
    q_ring, qb_ring, do_ring, lse_ring, delta_ring, k_smem, kb_smem, v_smem, kv_bar, ready, empty,
    LSE2, DELTA, stride_l, q_start, k_start, q_len, n0, hk, group, lo, hi,
    D_QK: gl.constexpr, D_V: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    BM: gl.constexpr = q_desc.block_type.shape[0]
    vec_layout: gl.constexpr = gl.BlockedLayout([BM // 32], [32], [1], [0])
    DA: gl.constexpr = q_desc.block_type.shape[1]
    _load_halves(k_desc, kb_desc, v_desc, k_smem, kb_smem, v_smem, kv_bar, k_start + n0, hk * D_QK, hk * D_V, SPLIT)
    TILE_BYTES: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes + SPLIT * qb_desc.block_type.nbytes
    it = 0
    for g in range(group):
        h = hk * group + g
        for m0 in range(lo, hi, BM):
            # lse2 / delta of the block's queries, +inf / 0 past the sequence (P = dS = 0 there)
            qm = m0 + gl.arange(0, BM, layout=vec_layout)
            in_seq = qm < q_len
            lse2 = gl.load(LSE2 + h * stride_l + q_start + qm, mask=in_seq, other=float("inf"))
            delta = gl.load(DELTA + h * stride_l + q_start + qm, mask=in_seq, other=0.0)
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # first lap: fresh barriers pass
            bar = ready.index(s)
            mbarrier.expect(bar, TILE_BYTES)
            tma_load(q_desc, [q_start + m0, h * D_QK], bar, q_ring.index(s))
            if SPLIT:
                tma_load(qb_desc, [q_start + m0, h * D_QK + DA], bar, qb_ring.index(s))
            tma_load(do_desc, [q_start + m0, h * D_V], bar, do_ring.index(s))
            lse_ring.index(s).store(lse2)
            delta_ring.index(s).store(delta)
            mbarrier.arrive(bar)  # second arrival on ready[s]: lse2 / delta are in shared memory
            it += 1


@gluon.jit
def _dkdv_step(
    dk, dkb, dv, k_s, kb_s, v_s, q_ring, qb_ring, do_ring, lse_ring, delta_ring, ready, empty, it, m0,
    kq, window, scale_log2,
    SPLIT: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
    HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """One query block's contribution to this warpgroup's 64 rows of dK (unscaled) and dV."""
    BM: gl.constexpr = q_ring.shape[1]
    DA: gl.constexpr = q_ring.shape[2]
    DB: gl.constexpr = qb_ring.shape[2]
    DV: gl.constexpr = do_ring.shape[2]
    s_layout: gl.constexpr = _acc_layout(BM)
    vec_layout: gl.constexpr = gl.SliceLayout(0, s_layout)  # indexed by query (columns of S^T)
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    q_t = q_ring.index(s)
    do_t = do_ring.index(s)
    zero = gl.zeros([64, BM], gl.float32, layout=s_layout)
    st = warpgroup_mma(k_s, q_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    if SPLIT:
        st = warpgroup_mma(kb_s, qb_ring.index(s).permute((1, 0)), st, is_async=True)
    dpt = warpgroup_mma(v_s, do_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))
    lse2 = lse_ring.index(s).load(vec_layout)
    p = gl.exp2(st * scale_log2 - lse2[None, :])  # P^T (keys x queries)
    if MASKED:
        # query c of the block sees key r iff kq[r] - m0 <= c (causal), c - (kq[r] - m0) < window, ...
        # d = (query position - key position) on the key axis; one compare per element:
        #   causal: d >= 0;  causal + window: 0 <= d < window;  window alone: -window < d < window
        c = gl.arange(0, BM, layout=vec_layout)[None, :]
        t = (kq - m0)[:, None]
        if HAS_WINDOW:
            d = c - t
            if CAUSAL:
                ok = d.to(gl.uint32, bitcast=True) < window.to(gl.uint32, bitcast=True)
            else:
                ok = (d + (window - 1)).to(gl.uint32, bitcast=True) < (2 * window - 1).to(gl.uint32, bitcast=True)
        else:
            ok = c >= t  # (MASKED blocks exist only with CAUSAL or HAS_WINDOW)
        p = gl.where(ok, p, 0.0)
    dtype: gl.constexpr = q_ring.dtype
    p16 = p.to(dtype)
    # dV += P^T dO goes first: it runs on the tensor cores while dS is computed
    dv = warpgroup_mma(gl.convert_layout(p16, _op_layout(DV)), do_t, dv, is_async=True)
    dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt,))  # (in-order groups: S^T, dP^T done)
    delta = delta_ring.index(s).load(vec_layout)
    ds = p * (dpt - delta[None, :])  # dS^T (from the fp32 P)
    dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), _op_layout(DA)), q_t, dk, is_async=True)
    if SPLIT:
        dkb = warpgroup_mma(gl.convert_layout(ds.to(dtype), _op_layout(DB)), qb_ring.index(s), dkb, is_async=True)
        dv, dk, dkb = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dkb))
    else:
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
    mbarrier.arrive(empty.index(s))  # this warpgroup is done reading stage s
    return dk, dkb, dv


@gluon.jit
def _dkdv_consumer(
    dk_desc, dkb_desc, dv_desc, DK, DV, q_ring, qb_ring, do_ring, lse_ring, delta_ring, k_smem, kb_smem, v_smem,
    kv_bar, ready, empty, stash, stride_dkt, stride_dvt, kq0, group, scale, window,
    WG: gl.constexpr, D_QK: gl.constexpr, D_V: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """Consumer warpgroup WG: key rows [n0 + 64 WG, n0 + 64 WG + 64) of the block."""
    BM: gl.constexpr = q_ring.shape[1]
    DA: gl.constexpr = q_ring.shape[2]
    DB: gl.constexpr = qb_ring.shape[2] if SPLIT else 8  # (8: a small unused stand-in)
    s_layout: gl.constexpr = _acc_layout(BM)
    # key positions (rows) moved to the query axis: key kn is visible to query qm iff kq <= qm (causal)
    kq = kq0 + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))  # kq0 = n0 - (k_len - q_len)
    scale_log2 = scale * 1.4426950408889634
    k_s = k_smem.index(WG)
    kb_s = kb_smem.index(WG)
    v_s = v_smem.index(WG)
    dk = gl.zeros([64, DA], gl.float32, layout=_acc_layout(DA))
    dkb = gl.zeros([64, DB], gl.float32, layout=_acc_layout(DB))
    dv = gl.zeros([64, D_V], gl.float32, layout=_acc_layout(D_V))
    mbarrier.wait(kv_bar, 0)
    it = 0
    for _ in range(group):
        lo = _stash_get(stash, 3)  # query blocks [lo, full) masked, [full, hi) not
        full = _stash_get(stash, 4)
        hi = _stash_get(stash, 5)
        if CAUSAL or HAS_WINDOW:
            for m0 in range(lo, full, BM):  # crossing the causal diagonal / inside a window: masked
                dk, dkb, dv = _dkdv_step(
                    dk, dkb, dv, k_s, kb_s, v_s, q_ring, qb_ring, do_ring, lse_ring, delta_ring, ready, empty, it, m0,
                    kq, window, scale_log2, SPLIT, STAGES, True, CAUSAL, HAS_WINDOW,
                )  # fmt: skip
                it += 1
        if not HAS_WINDOW:  # (windows: full == hi)
            for m0 in range(full, hi, BM):  # every query sees every key of the block
                dk, dkb, dv = _dkdv_step(
                    dk, dkb, dv, k_s, kb_s, v_s, q_ring, qb_ring, do_ring, lse_ring, delta_ring, ready, empty, it,
                    m0, kq, window, scale_log2, SPLIT, STAGES, False, CAUSAL, HAS_WINDOW,
                )  # fmt: skip
                it += 1
    # Epilogue: this warpgroup's halves of the K/V tiles are no longer read by anyone.
    dtype: gl.constexpr = k_smem.dtype
    row0 = _stash_get(stash, 0) + WG * 64  # first output row
    n_rows = _stash_get(stash, 1) - WG * 64  # rows left in the sequence
    hk = _stash_get(stash, 2)
    _write_out(dk_desc, DK, stride_dkt, k_s, (dk * scale).to(dtype), row0, hk * D_QK, n_rows)
    if SPLIT:
        _write_out(dkb_desc, DK, stride_dkt, kb_s, (dkb * scale).to(dtype), row0, hk * D_QK + DA, n_rows)
    _write_out(dv_desc, DV, stride_dvt, v_s, dv.to(dtype), row0, hk * D_V, n_rows)


@gluon.jit
def _dkdv_kernel(
    q_desc, qb_desc, do_desc, k_desc, kb_desc, v_desc, dk_desc, dkb_desc, dv_desc,
    DK, DV, LSE2, DELTA, cu_q, cu_k, stride_l, stride_dkt, stride_dvt, n_kv, group, scale, window,
    D_QK: gl.constexpr, D_V: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = 2 * k_desc.block_type.shape[0]
    pid_n = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // n_kv
    hk = pid_bh % n_kv
    q_start = gl.load(cu_q + b)
    k_start = gl.load(cu_k + b)
    q_len = gl.load(cu_q + b + 1) - q_start
    k_len = gl.load(cu_k + b + 1) - k_start
    n0 = pid_n * BN
    if n0 >= k_len:
        return
    offset = k_len - q_len
    # Query blocks that see this key block: [lo, full) are masked, [full, hi) unmasked (as in Triton).
    lo = 0
    hi = q_len
    full = 0
    if CAUSAL:
        lo = gl.maximum(0, n0 - offset) // BM * BM
        full = gl.cdiv(gl.maximum(0, n0 + BN - 1 - offset), BM) * BM
    if HAS_WINDOW:
        hi = gl.minimum(q_len, n0 + BN - offset + window)
        full = hi
    hi = gl.maximum(hi, lo)
    full = gl.minimum(gl.maximum(full, lo), hi)

    q_ring = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    if SPLIT:
        qb_ring = gl.allocate_shared_memory(qb_desc.dtype, [STAGES] + qb_desc.block_type.shape, qb_desc.layout)
        kb_smem = gl.allocate_shared_memory(kb_desc.dtype, [2] + kb_desc.block_type.shape, kb_desc.layout)
    else:  # unused stand-ins
        qb_ring = q_ring
        kb_smem = k_smem
    vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_smem)
    delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BM], vec_smem)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    stash = gl.allocate_shared_memory(gl.int32, [8], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    _stash_put(stash, k_start + n0, k_len - n0, hk, lo, full, hi)
    mbarrier.init(kv_bar.index(0), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=2)  # the loader's expect (+ TMA bytes) and its lse2/delta arrive
        mbarrier.init(empty.index(s), count=2)  # one arrival per consumer warpgroup
    gl.warp_specialize(
        [
            (_dkdv_consumer, (dk_desc, dkb_desc, dv_desc, DK, DV, q_ring, qb_ring, do_ring, lse_ring, delta_ring,
                              k_smem, kb_smem, v_smem, kv_bar.index(0), ready, empty, stash, stride_dkt, stride_dvt,
                              n0 - offset, group, scale, window,
                              0, D_QK, D_V, SPLIT, STAGES, CAUSAL, HAS_WINDOW)),
            (_dkdv_consumer, (dk_desc, dkb_desc, dv_desc, DK, DV, q_ring, qb_ring, do_ring, lse_ring, delta_ring,
                              k_smem, kb_smem, v_smem, kv_bar.index(0), ready, empty, stash, stride_dkt, stride_dvt,
                              n0 - offset, group, scale, window,
                              1, D_QK, D_V, SPLIT, STAGES, CAUSAL, HAS_WINDOW)),
            (_dkdv_loader, (q_desc, qb_desc, do_desc, k_desc, kb_desc, v_desc, q_ring, qb_ring, do_ring, lse_ring,
                            delta_ring, k_smem, kb_smem, v_smem, kv_bar.index(0), ready, empty, LSE2, DELTA, stride_l,
                            q_start, k_start, q_len, n0, hk, group, lo, hi, D_QK, D_V, SPLIT, STAGES)),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )  # fmt: skip


__all__ = ["CONSUMER_REGS", "LOADER_REGS", "WG_ROWS", "_dkdv_kernel"]
