"""The dQ kernel of the warp-specialized Gluon attention backward for Hopper (sm_90a): one program per (128-query
block, head, sequence). The loader loads the block's Q and dO once (two 64-row halves) and streams K/V tiles of BN
rows through a STAGES-deep ring; each of the two consumer warpgroups owns 64 query rows and computes
S = Q_wg K^T, dP = dO_wg V^T, P, dS and dQ += dS (registers) @ K (B = K tile, MN-major), then writes dQ.

How the backward works, its masking and the shared helpers: moetron/kernels/attention_gluon_bwd_kernels.py (which
holds the dK/dV kernel); the launcher: moetron/kernels/attention_gluon_bwd.py.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from moetron.kernels.attention_gluon_bwd_kernels import (
    CONSUMER_REGS,
    LOADER_REGS,
    _acc_layout,
    _load_halves,
    _op_layout,
    _write_out,
)
from moetron.kernels.attention_gluon_sched import _key_range
from moetron.kernels.gluon_names import tma_load


@gluon.jit
def _dq_loader(
    q_desc, qb_desc, do_desc, k_desc, kb_desc, v_desc,
    q_smem, qb_smem, do_smem, k_ring, kb_ring, v_ring, qdo_bar, ready, empty,
    q_start, k_start, m0, h, hk, lo, hi,
    D_QK: gl.constexpr, D_V: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    DA: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    _load_halves(q_desc, qb_desc, do_desc, q_smem, qb_smem, do_smem, qdo_bar, q_start + m0, h * D_QK, h * D_V, SPLIT)
    TILE_BYTES: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes + SPLIT * kb_desc.block_type.nbytes
    it = 0
    for n0 in range(lo, hi, BN):
        s = it % STAGES
        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, TILE_BYTES)
        tma_load(k_desc, [k_start + n0, hk * D_QK], bar, k_ring.index(s))
        if SPLIT:
            tma_load(kb_desc, [k_start + n0, hk * D_QK + DA], bar, kb_ring.index(s))
        tma_load(v_desc, [k_start + n0, hk * D_V], bar, v_ring.index(s))
        it += 1


@gluon.jit
def _dq_step(
    dq, dqb, q_s, qb_s, do_s, k_ring, kb_ring, v_ring, ready, empty, it, n0, lse2, delta, qm, q_len, k_len,
    offset, window, scale_log2,
    SPLIT: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
    HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """One key block's contribution to this warpgroup's 64 rows of dQ (unscaled)."""
    BN: gl.constexpr = k_ring.shape[1]
    DA: gl.constexpr = k_ring.shape[2]
    DB: gl.constexpr = kb_ring.shape[2]
    s_layout: gl.constexpr = _acc_layout(BN)
    s = it % STAGES
    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
    k_t = k_ring.index(s)
    zero = gl.zeros([64, BN], gl.float32, layout=s_layout)
    st = warpgroup_mma(q_s, k_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    if SPLIT:
        st = warpgroup_mma(qb_s, kb_ring.index(s).permute((1, 0)), st, is_async=True)
    dp = warpgroup_mma(do_s, v_ring.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(num_outstanding=1, deps=(st,))
    p = gl.exp2(st * scale_log2 - lse2[:, None])
    if MASKED:
        kn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        pos = qm[:, None] + offset
        ok = kn[None, :] < k_len  # keys past the sequence belong to the next one
        if CAUSAL:
            ok = ok & (kn[None, :] <= pos)
        if HAS_WINDOW:
            ok = ok & (pos - kn[None, :] < window)
            if not CAUSAL:
                ok = ok & (kn[None, :] - pos < window)
        p = gl.where(ok, p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
    ds = p * (dp - delta[:, None])
    dtype: gl.constexpr = k_ring.dtype
    dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), _op_layout(DA)), k_t, dq, is_async=True)
    if SPLIT:
        dqb = warpgroup_mma(gl.convert_layout(ds.to(dtype), _op_layout(DB)), kb_ring.index(s), dqb, is_async=True)
        dq, dqb = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dqb))
    else:
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
    mbarrier.arrive(empty.index(s))
    return dq, dqb


@gluon.jit
def _dq_consumer(
    dq_desc, dqb_desc, DQ, q_smem, qb_smem, do_smem, k_ring, kb_ring, v_ring, qdo_bar, ready, empty,
    LSE2, DELTA, stride_l, stride_dqt, q_start, q_len, k_len, m0, h, lo, full, hi, scale, window,
    WG: gl.constexpr, D_QK: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    """Consumer warpgroup WG: query rows [m0 + 64 WG, m0 + 64 WG + 64) of the block."""
    BN: gl.constexpr = k_ring.shape[1]
    DA: gl.constexpr = k_ring.shape[2]
    DB: gl.constexpr = kb_ring.shape[2] if SPLIT else 8  # (8: a small unused stand-in)
    s_layout: gl.constexpr = _acc_layout(BN)
    qm = m0 + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    in_seq = qm < q_len
    lse2 = gl.load(LSE2 + h * stride_l + q_start + qm, mask=in_seq, other=float("inf"))
    delta = gl.load(DELTA + h * stride_l + q_start + qm, mask=in_seq, other=0.0)
    offset = k_len - q_len
    scale_log2 = scale * 1.4426950408889634
    q_s = q_smem.index(WG)
    qb_s = qb_smem.index(WG)
    do_s = do_smem.index(WG)
    dq = gl.zeros([64, DA], gl.float32, layout=_acc_layout(DA))
    dqb = gl.zeros([64, DB], gl.float32, layout=_acc_layout(DB))
    mbarrier.wait(qdo_bar, 0)
    it = 0
    for n0 in range(lo, full, BN):  # left of the causal diagonal, inside the sequence: no mask
        dq, dqb = _dq_step(
            dq, dqb, q_s, qb_s, do_s, k_ring, kb_ring, v_ring, ready, empty, it, n0, lse2, delta, qm, q_len, k_len,
            offset, window, scale_log2, SPLIT, STAGES, False, CAUSAL, HAS_WINDOW,
        )  # fmt: skip
        it += 1
    for n0 in range(full, hi, BN):  # the diagonal, windows, the partial last block: masked
        dq, dqb = _dq_step(
            dq, dqb, q_s, qb_s, do_s, k_ring, kb_ring, v_ring, ready, empty, it, n0, lse2, delta, qm, q_len, k_len,
            offset, window, scale_log2, SPLIT, STAGES, True, CAUSAL, HAS_WINDOW,
        )  # fmt: skip
        it += 1
    dtype: gl.constexpr = q_smem.dtype
    row0 = q_start + m0 + WG * 64
    n_rows = q_len - m0 - WG * 64
    _write_out(dq_desc, DQ, stride_dqt, q_s, (dq * scale).to(dtype), row0, h * D_QK, n_rows)
    if SPLIT:
        _write_out(dqb_desc, DQ, stride_dqt, qb_s, (dqb * scale).to(dtype), row0, h * D_QK + DA, n_rows)


@gluon.jit
def _dq_kernel(
    q_desc, qb_desc, do_desc, k_desc, kb_desc, v_desc, dq_desc, dqb_desc,
    DQ, LSE2, DELTA, cu_q, cu_k, stride_l, stride_dqt, n_heads, group, scale, window,
    D_QK: gl.constexpr, D_V: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
):  # fmt: skip
    BM: gl.constexpr = 2 * q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first
        pid_m = gl.num_programs(0) - 1 - pid_m
    pid_bh = gl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    q_start = gl.load(cu_q + b)
    k_start = gl.load(cu_k + b)
    q_len = gl.load(cu_q + b + 1) - q_start
    k_len = gl.load(cu_k + b + 1) - k_start
    m0 = pid_m * BM
    if m0 >= q_len:
        return
    offset = k_len - q_len
    # Key blocks: [lo, full) unmasked, [full, hi) masked (diagonal, window, partial last block).
    lo, full, hi = _key_range(m0, k_len, offset, window, BM, BN, CAUSAL, HAS_WINDOW, 0)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if SPLIT:
        qb_smem = gl.allocate_shared_memory(qb_desc.dtype, [2] + qb_desc.block_type.shape, qb_desc.layout)
        kb_ring = gl.allocate_shared_memory(kb_desc.dtype, [STAGES] + kb_desc.block_type.shape, kb_desc.layout)
    else:
        qb_smem = q_smem
        kb_ring = k_ring
    qdo_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(qdo_bar.index(0), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    gl.warp_specialize(
        [
            (_dq_consumer, (dq_desc, dqb_desc, DQ, q_smem, qb_smem, do_smem, k_ring, kb_ring, v_ring,
                            qdo_bar.index(0), ready, empty, LSE2, DELTA, stride_l, stride_dqt, q_start, q_len, k_len,
                            m0, h, lo, full, hi, scale, window, 0, D_QK, SPLIT, STAGES, CAUSAL, HAS_WINDOW)),
            (_dq_consumer, (dq_desc, dqb_desc, DQ, q_smem, qb_smem, do_smem, k_ring, kb_ring, v_ring,
                            qdo_bar.index(0), ready, empty, LSE2, DELTA, stride_l, stride_dqt, q_start, q_len, k_len,
                            m0, h, lo, full, hi, scale, window, 1, D_QK, SPLIT, STAGES, CAUSAL, HAS_WINDOW)),
            (_dq_loader, (q_desc, qb_desc, do_desc, k_desc, kb_desc, v_desc, q_smem, qb_smem, do_smem, k_ring,
                          kb_ring, v_ring, qdo_bar.index(0), ready, empty, q_start, k_start, m0, h, hk, lo, hi,
                          D_QK, D_V, SPLIT, STAGES)),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )  # fmt: skip


__all__ = ["_dq_kernel"]
