"""Launcher of the warp-specialized Gluon attention backward for Hopper (the kernels and how they work:
moetron/kernels/attention_gluon_bwd_kernels.py, the dQ kernel in attention_gluon_bwd_dq.py): tile configurations
per head-dim pair, the tensor descriptors over (tokens, heads * dim) views, the rule for when it serves an input,
and the launch of the two (independent) kernels on two streams, so that each fills the SMs the other's last wave
leaves idle.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental.gluon import language as gl

from moetron.kernels.attention_gluon import _GL_DTYPES, gluon_enabled
from moetron.kernels.attention_gluon_bwd_dq import _dq_kernel
from moetron.kernels.attention_gluon_bwd_kernels import WG_ROWS, _dkdv_kernel
from moetron.kernels.launch import FastLaunch, cdiv, host_descriptor

BLOCK = 2 * WG_ROWS  # key rows per dK/dV program, query rows per dQ program
OVERLAP = True  # the dQ kernel on a side stream, beside the dK/dV kernel (False: one stream, for A/B runs)

# Per (D_QK, D_V): dK/dV query block BM, its ring depth; dQ key block BN, its ring depth. Head dim 64 takes
# 128-query blocks (its 64-column dK/dV accumulators leave room for 64 x 128 S^T and dP^T): +10-17% over 64.
# One CTA per SM either way (12 warps x 168 registers fill the register file), so the rings use whatever
# shared memory is left (<= 227 KB).
CONFIGS = {
    (64, 64): dict(BM=128, KV_STAGES=3, BN=128, Q_STAGES=3),
    (128, 128): dict(BM=64, KV_STAGES=3, BN=64, Q_STAGES=4),
    (192, 128): dict(BM=32, KV_STAGES=4, BN=64, Q_STAGES=3),
}


def _split(d_qk):
    """Column chunks of the q/k head dim: (DA, DB), DB = 0 when one power-of-two chunk covers it."""
    return (128, 64) if d_qk == 192 else (d_qk, 0)


@functools.cache
def _smem_layout(block: tuple, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def _desc(t2d, block):
    return host_descriptor(t2d, block, _smem_layout(tuple(block), t2d.dtype))


def _flat(x):
    """(batch, seq, heads, dim) or (tokens, heads, dim) -> contiguous (tokens, heads * dim) 2-D view."""
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous()
    return x.view(x.shape[0], -1)


def supported(q, k, v, window=None) -> bool:
    """Whether this backward serves these inputs (windows included): gluon_enabled (an sm_90 GPU, bf16/fp16,
    not switched off), matching dtypes and a configured head-dim pair; the Triton kernels serve the rest."""
    same = k.dtype == q.dtype and v.dtype == q.dtype and k.shape[-1] == q.shape[-1] and q.shape[-2] % k.shape[-2] == 0
    return same and (q.shape[-1], v.shape[-1]) in CONFIGS and gluon_enabled(q)


def kernel_args(do, q, k, v, lse2, delta, dq, dk, dv, layout, causal, scale, window):
    """Grids, arguments and constexprs of the two kernels (also used by the CPU compile check).
    q, k, v, do, dq, dk, dv: (tokens, heads, dim) contiguous; lse2, delta: (heads, tokens) fp32."""
    cu_q, cu_k, max_q, max_k = layout
    n_seqs = cu_q.numel() - 1
    n_heads, d_qk = q.shape[-2], q.shape[-1]
    n_kv, d_v = k.shape[-2], v.shape[-1]
    group = n_heads // n_kv
    cfg = dict(CONFIGS[(d_qk, d_v)])
    if window is not None and (d_qk, d_v) == (128, 128):
        cfg["BM"] = 32  # the window mask's registers do not fit next to BM = 64 tiles (it spilled)
    if window is not None and causal and (d_qk, d_v) == (64, 64):
        cfg["BM"] = 64  # 128 spilled in the loop here and measured 1% slower (attention_bwd_hd64_experiment.json)
    da, db = _split(d_qk)
    split = db > 0
    q2, k2, v2, do2, dq2, dk2, dv2 = (_flat(x) for x in (q, k, v, do, dq, dk, dv))
    assert dq2.data_ptr() == dq.data_ptr() and dk2.data_ptr() == dk.data_ptr() and dv2.data_ptr() == dv.data_ptr()
    assert lse2.stride() == delta.stride() and lse2.stride(1) == 1
    bm, bn = cfg["BM"], cfg["BN"]
    # dK/dV kernel: query tiles of BM rows, key/output tiles of 64 rows
    kv_descs = (
        _desc(q2, [bm, da]), _desc(q2, [bm, db or da]), _desc(do2, [bm, d_v]),
        _desc(k2, [WG_ROWS, da]), _desc(k2, [WG_ROWS, db or da]), _desc(v2, [WG_ROWS, d_v]),
        _desc(dk2, [WG_ROWS, da]), _desc(dk2, [WG_ROWS, db or da]), _desc(dv2, [WG_ROWS, d_v]),
    )  # fmt: skip
    common = dict(D_QK=d_qk, D_V=d_v, SPLIT=split, CAUSAL=bool(causal), HAS_WINDOW=window is not None, num_warps=4)
    dkdv = (
        (cdiv(max_k, BLOCK), n_seqs * n_kv),
        (*kv_descs, dk2, dv2, lse2, delta, cu_q, cu_k, lse2.stride(0), dk2.stride(0), dv2.stride(0), n_kv, group,
         float(scale), int(window or 0)),
        dict(STAGES=cfg["KV_STAGES"], **common),
    )  # fmt: skip
    # dQ kernel: query/output tiles of 64 rows, key tiles of BN rows
    q_descs = (
        _desc(q2, [WG_ROWS, da]), _desc(q2, [WG_ROWS, db or da]), _desc(do2, [WG_ROWS, d_v]),
        _desc(k2, [bn, da]), _desc(k2, [bn, db or da]), _desc(v2, [bn, d_v]),
        _desc(dq2, [WG_ROWS, da]), _desc(dq2, [WG_ROWS, db or da]),
    )  # fmt: skip
    dqk = (
        (cdiv(max_q, BLOCK), n_seqs * n_heads),
        (*q_descs, dq2, lse2, delta, cu_q, cu_k, lse2.stride(0), dq2.stride(0), n_heads, group, float(scale),
         int(window or 0)),
        dict(STAGES=cfg["Q_STAGES"], **common),
    )  # fmt: skip
    return dkdv, dqk


# Launchers that skip Triton's per-call binding once a signature has run (launch.py).
_launch_dkdv, _launch_dq = FastLaunch(_dkdv_kernel), FastLaunch(_dq_kernel)


def gluon_attention_backward(do, q, k, v, lse2, delta, layout, causal, scale, window):
    """dq, dk, dv shaped like q, k, v from do, q, k, v (batch, seq, heads, dim), the preprocessed lse2 and
    delta of triton_attention_backward ((heads, tokens) fp32: the logsumexp in log2 units, +inf for rows
    that saw no key; rowsum(dO * O)) and layout = (cu_q, cu_k, max_q, max_k)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dkdv, dqk = kernel_args(do, q, k, v, lse2, delta, dq, dk, dv, layout, causal, scale, window)
    (grid, args, kw), (dq_grid, dq_args, dq_kw) = dkdv, dqk
    if not OVERLAP:
        _launch_dkdv(grid, *args, **kw)
        _launch_dq(dq_grid, *dq_args, **dq_kw)
        return dq, dk, dv
    # The kernels are independent: the dQ kernel runs on a side stream, so its programs fill the SMs that the
    # dK/dV kernel's last wave leaves idle (and the other way round).
    main = torch.cuda.current_stream(q.device)
    side = _side_stream(q.device)
    side.wait_stream(main)
    _launch_dkdv(grid, *args, **kw)
    with torch.cuda.stream(side):
        _launch_dq(dq_grid, *dq_args, **dq_kw)
    main.wait_stream(side)
    return dq, dk, dv


@functools.cache
def _side_stream(device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


__all__ = ["gluon_attention_backward", "kernel_args", "supported"]
