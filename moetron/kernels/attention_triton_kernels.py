"""FlashAttention-2-style Triton kernels (Dao 2023): forward and backward, and their autotuning space.

The launchers, the autograd.Function and the entry point are in moetron/kernels/attention_triton.py.

Never materializes the (seq_q x seq_k) scores. The forward walks the key blocks of one query block
with an online softmax (running max m, running sum l, rescaled accumulator; exp2 with log2(e) folded
into the scale) and saves the logsumexp. The backward recomputes the probabilities from it:
  delta_i = rowsum(dO_i * O_i)               (preprocessing: one kernel, which also rescales the lse)
  P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dK = scale * dS^T Q, dQ = scale * dS K
in two kernels with no atomics, so gradients are bit-identical run to run: one per key block
accumulating dK and dV over every query head of its GQA group, one per query block accumulating dQ.
(A variant adding dQ from the first kernel with fp32 atomics, 5 matmuls per block pair instead of 7,
measured slower on the H100: 283 vs 351 TFLOP/s forward+backward at (4, 32, 4096, 128), 77 vs 225 at
MLA's 192/128.)

Batches are handled as variable-length sequences: sequence b owns query rows [cu_q[b], cu_q[b+1]) and
key rows [cu_k[b], cu_k[b+1]) of the flattened (tokens, heads, dim) tensors; a padded batch is the
special case cu = arange(batch + 1) * seq. Causal masks align queries to the end of the keys
(bottom-right), as in moetron.kernels.attention's reference.

Tiles move between global and shared memory either through tensor descriptors (TMA=True: the Hopper
copy engine, one descriptor per head clipped to the sequence, so rows past its end read 0 and are never
written) or through masked pointer loads; the autotuner picks per head dim and mask mode, because
neither wins everywhere on the H100 (descriptors: +4..10% forward at head dim 128 and 192, -5..10% at
64). Triton 3.6's automatic warp specialization on Hopper (`tl.range(..., warp_specialize=True)`) fails
to compile this forward loop ("PassManager::run failed"), and issuing the next block's QK^T before the
current block's softmax by hand (FlashAttention-3's overlap) measured 1-26% slower, so neither is used.

Under TRITON_INTERPRET=1 (CPU tests) the kernels upcast bf16/fp16 to fp32 right after loading: the
interpreter's low-precision dot is wrong (../shared/TESTING.md).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # (kernels may read module globals only as constexprs; the interpreter does not check)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _sequence(cu_q, cu_k, b):
    """First row and length of sequence b's queries and keys in the flattened tensors."""
    q_start, k_start = tl.load(cu_q + b), tl.load(cu_k + b)
    return q_start, k_start, tl.load(cu_q + b + 1) - q_start, tl.load(cu_k + b + 1) - k_start


@triton.jit
def _head(
    ptr, head, stride_h, stride_t, n_rows,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One head of a (tokens, heads, dim) tensor, clipped to rows [0, n_rows) and columns [0, D): a
    tensor descriptor (TMA=True, the copy engine on Hopper) or the head's base pointer."""
    if TMA:
        return tl.make_tensor_descriptor(
            ptr + head * stride_h, shape=[n_rows, D], strides=[stride_t, 1], block_shape=[BLOCK_ROWS, BLOCK_D]
        )
    else:
        return ptr + head * stride_h


@triton.jit
def _load(
    head, row, stride_t, n_rows, D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr
):  # fmt: skip
    """(BLOCK_ROWS, BLOCK_D) tile of `_head` from `row`; rows past n_rows and columns past D read as 0."""
    if TMA:
        return head.load([row, 0])
    else:
        rows, cols = row + tl.arange(0, BLOCK_ROWS), tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
        return tl.load(head + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store(
    head, row, value, stride_t, n_rows,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Write a (BLOCK_ROWS, BLOCK_D) tile of `_head` at `row`, dropping rows past n_rows and columns past D."""
    if TMA:
        head.store([row, 0], value)
    else:
        rows, cols = row + tl.arange(0, BLOCK_ROWS), tl.arange(0, BLOCK_D)
        tl.store(
            head + rows[:, None] * stride_t + cols[None, :], value, mask=(rows[:, None] < n_rows) & (cols[None, :] < D)
        )


@triton.jit
def _key_mask(offs_m, offs_n, q_len, k_len, offset, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) allowed pairs: in range, causal (bottom-right), inside the window."""
    pos = offs_m[:, None] + offset  # query position on the key axis
    ok = (offs_m[:, None] < q_len) & (offs_n[None, :] < k_len)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos)
    if HAS_WINDOW:
        ok = ok & (pos - offs_n[None, :] < window)
        if not CAUSAL:
            ok = ok & (offs_n[None, :] - pos < window)
    return ok


def _configs(kind: str) -> list[triton.Config]:
    """Autotuning candidates per kernel: tile shapes x (tensor descriptors or pointer loads). Under the
    interpreter one config (tuning means nothing there); MOETRON_ATTN_TMA=0 selects its pointer path,
    so that the CPU tests check both."""
    if INTERPRET:
        tma = os.environ.get("MOETRON_ATTN_TMA", "1") == "1"
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "TMA": tma}, num_warps=4, num_stages=1)]
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4)]
    else:
        shapes = [(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": tma}, num_warps=w, num_stages=st)
        for m, n, w, st in shapes
        for tma in (True, False)
    ]


def _prune(configs, named_args, **kwargs):
    """Large head dims do not fit the biggest tiles in shared memory/registers."""
    args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    big = max(args["D_QK"], args["D_V"]) > 128
    kept = [c for c in configs if not big or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 * 2]
    return kept or configs[:1]


@triton.jit
def _key_blocks(
    m0, k_len, offset, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    MASK_TAIL: tl.constexpr,
):  # fmt: skip
    """The key blocks a query block [m0, m0 + BLOCK_M) visits: [lo, full) need no mask (every query of
    the block sees every key: left of the causal diagonal), [full, hi) are masked (the diagonal, windows,
    and with MASK_TAIL the partial last block, whose keys past k_len must stay out of a softmax). Causal
    blocks past the diagonal and blocks left of the window are skipped."""
    lo, hi = 0, k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + offset)
        full = tl.maximum(0, tl.minimum(m0 + offset + 1, k_len)) // BLOCK_N * BLOCK_N
    elif MASK_TAIL:
        full = k_len // BLOCK_N * BLOCK_N
    else:
        full = k_len
    if HAS_WINDOW:
        lo = tl.maximum(0, (m0 + offset - window + 1) // BLOCK_N * BLOCK_N)
        full = lo  # windows: every block masked
    return lo, full, hi


@triton.jit
def _fwd_block(
    q, acc, m_i, l_i, kd, vd, k_row, k_end, stride_kt, stride_vt, kn, offs_m, q_len, k_len, offset, window,
    scale_log2, D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One key block (rows k_row.. of the descriptors kd, vd; key positions kn) of the online softmax.
    MASKED=False: every (query, key) pair is allowed, so the block skips the mask arithmetic (the
    blocks left of the causal diagonal)."""
    k = _load(kd, k_row, stride_kt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)  # (BLOCK_N, BLOCK_DQK)
    v = _load(vd, k_row, stride_vt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)  # (BLOCK_N, BLOCK_DV)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) raw scores
    if MASKED:
        s = tl.where(_key_mask(offs_m, kn, q_len, k_len, offset, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = m_new
    # Scale and shift in one FMA per score (log2 units): measured +4..6% forward on the H100 over
    # scaling the scores first.
    p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.autotune(
    configs=_configs("fwd"),
    key=["D_QK", "D_V", "CAUSAL", "HAS_WINDOW"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    n_heads, group, scale_log2, window,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    hk = h // group
    q_start, k_start, q_len, k_len = _sequence(cu_q, cu_k, b)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offset = k_len - q_len
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # Descriptors clipped to this sequence: rows past its end read as 0 and are never written.
    q_end, k_end = q_start + q_len, k_start + k_len
    qd = _head(Q, h, stride_qh, stride_qt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)
    kd = _head(K, hk, stride_kh, stride_kt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)
    vd = _head(V, hk, stride_vh, stride_vt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)
    q = _load(qd, q_start + m0, stride_qt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)  # (BLOCK_M, BLOCK_DQK)
    if UPCAST:
        q = q.to(tl.float32)

    lo, full, hi = _key_blocks(m0, k_len, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(lo, full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            q, acc, m_i, l_i, kd, vd, k_start + n0, k_end, stride_kt, stride_vt, n0 + offs_n, offs_m, q_len, k_len,
            offset, window, scale_log2, D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, False, CAUSAL, HAS_WINDOW, UPCAST, TMA,
        )  # fmt: skip
    for n0 in range(tl.maximum(full, lo), hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            q, acc, m_i, l_i, kd, vd, k_start + n0, k_end, stride_kt, stride_vt, n0 + offs_n, offs_m, q_len, k_len,
            offset, window, scale_log2, D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, True, CAUSAL, HAS_WINDOW, UPCAST, TMA,
        )  # fmt: skip

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    od = _head(Out, h, stride_oh, stride_ot, q_end, D_V, BLOCK_M, BLOCK_DV, TMA)
    _store(od, q_start + m0, out.to(Out.dtype.element_ty), stride_ot, q_end, D_V, BLOCK_M, BLOCK_DV, TMA)
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _bwd_preprocess_kernel(
    DO, Out, LSE, DELTA, LSE2, n_tokens, stride_dot, stride_doh, stride_ot, stride_oh, stride_l, stride_out,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """The backward's per-row inputs, for BLOCK_T tokens of head h, in one read of dO and O:
    delta[h, t] = sum_d dO[t, h, d] O[t, h, d] (fp32) and lse2[h, t] = lse[h, t] log2(e), +inf where
    lse = -inf (rows that saw no key: their P recomputes to 0). DO, Out (tokens, heads, D_V); LSE, DELTA,
    LSE2 (heads, tokens) fp32. Heads vary fastest over the grid, so neighbouring programs read neighbouring
    bytes of the (tokens, heads, dim) tensors."""
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_DV)
    in_seq = t < n_tokens
    mask = in_seq[:, None] & (d < D_V)[None, :]
    t64 = t.to(tl.int64)[:, None]
    do = tl.load(DO + t64 * stride_dot + h * stride_doh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    o = tl.load(Out + t64 * stride_ot + h * stride_oh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * stride_out + t, tl.sum(do * o, 1), mask=in_seq)
    lse = tl.load(LSE + h * stride_l + t, mask=in_seq, other=0.0)
    tl.store(LSE2 + h * stride_out + t, tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E), mask=in_seq)


@triton.jit
def _probs(
    q, k, lse2, qm, kn, q_len, k_len, offset, window, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    """P = exp(S - lse) of one (BLOCK_M, BLOCK_N) block, recomputed from the saved logsumexp (lse2: in
    log2 units, +inf for rows that saw no key or lie past the sequence, whose P is then 0). Unmasked
    blocks need no mask: keys past the sequence read as zero rows, so whatever P they get multiplies
    zeros in dQ, and their own dK/dV rows are never written."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse2[:, None])
    if MASKED:
        p = tl.where(_key_mask(qm, kn, q_len, k_len, offset, window, CAUSAL, HAS_WINDOW), p, 0.0)
    return p


@triton.jit
def _dkdv_block(
    dk, dv, k, v, qd, dod, LSE2_h, DELTA_h, q_start, m0, q_end, offs_m, offs_n, stride_qt, stride_dot,
    q_len, k_len, offset, window, scale_log2,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Add one query block's contribution to dK (unscaled) and dV of a key block."""
    qm = m0 + offs_m
    q = _load(qd, q_start + m0, stride_qt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)  # (BLOCK_M, BLOCK_DQK)
    do = _load(dod, q_start + m0, stride_dot, q_end, D_V, BLOCK_M, BLOCK_DV, TMA)  # (BLOCK_M, BLOCK_DV)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse2 = tl.load(LSE2_h + q_start + qm, mask=qm < q_len, other=float("inf"))
    delta = tl.load(DELTA_h + q_start + qm, mask=qm < q_len, other=0.0)
    p = _probs(q, k, lse2, qm, offs_n, q_len, k_len, offset, window, scale_log2, MASKED, CAUSAL, HAS_WINDOW)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])  # (BLOCK_M, BLOCK_N) = P * (dP - delta)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.autotune(
    configs=_configs("bwd"),
    key=["D_QK", "D_V", "CAUSAL", "HAS_WINDOW"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    n_kv_heads, group, scale, window,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // n_kv_heads, pid_bh % n_kv_heads
    q_start, k_start, q_len, k_len = _sequence(cu_q, cu_k, b)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    offset = k_len - q_len
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    q_end, k_end = q_start + q_len, k_start + k_len
    kd = _head(K, hk, stride_kh, stride_kt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)
    vd = _head(V, hk, stride_vh, stride_vt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)
    k = _load(kd, k_start + n0, stride_kt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)  # (BLOCK_N, BLOCK_DQK)
    v = _load(vd, k_start + n0, stride_vt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)  # (BLOCK_N, BLOCK_DV)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    scale_log2 = scale * 1.4426950408889634
    # Query blocks that see this key block: [lo, full) cross the causal diagonal (masked), [full, hi)
    # see all its keys (unmasked); causal skips the blocks that end before it, a window those past it.
    lo, hi = 0, q_len
    full = 0
    if CAUSAL:
        lo = tl.maximum(0, n0 - offset) // BLOCK_M * BLOCK_M
        full = tl.minimum(hi, tl.maximum(lo, tl.cdiv(tl.maximum(0, n0 + BLOCK_N - 1 - offset), BLOCK_M) * BLOCK_M))
    if HAS_WINDOW:
        hi = tl.minimum(q_len, n0 + BLOCK_N - offset + window)
        full = hi  # windows: every block masked
    for g in range(0, group):  # every query head of this kv head's group: dK, dV summed over them
        h = hk * group + g
        qd = _head(Q, h, stride_qh, stride_qt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)
        dod = _head(DO, h, stride_doh, stride_dot, q_end, D_V, BLOCK_M, BLOCK_DV, TMA)
        for m0 in range(lo, full, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, qd, dod, LSE2 + h * stride_lh, DELTA + h * stride_lh, q_start, m0, q_end, offs_m,
                offs_n, stride_qt, stride_dot, q_len, k_len, offset, window, scale_log2,
                D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, True, CAUSAL, HAS_WINDOW, TMA, UPCAST,
            )  # fmt: skip
        for m0 in range(tl.maximum(full, lo), hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, qd, dod, LSE2 + h * stride_lh, DELTA + h * stride_lh, q_start, m0, q_end, offs_m,
                offs_n, stride_qt, stride_dot, q_len, k_len, offset, window, scale_log2,
                D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_M, False, CAUSAL, HAS_WINDOW, TMA, UPCAST,
            )  # fmt: skip
    dkd = _head(DK, hk, stride_dkh, stride_dkt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)
    dvd = _head(DV, hk, stride_dvh, stride_dvt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)
    _store(dkd, k_start + n0, (dk * scale).to(DK.dtype.element_ty), stride_dkt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)
    _store(dvd, k_start + n0, dv.to(DV.dtype.element_ty), stride_dvt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, kd, vd, k_start, n0, k_end, offs_m, offs_n, stride_kt, stride_vt,
    q_len, k_len, offset, window, scale_log2,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Add one key block's contribution to dQ (unscaled) of a query block."""
    k = _load(kd, k_start + n0, stride_kt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)  # (BLOCK_N, BLOCK_DQK)
    v = _load(vd, k_start + n0, stride_vt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)  # (BLOCK_N, BLOCK_DV)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    kn = n0 + offs_n
    p = _probs(q, k, lse2, offs_m, kn, q_len, k_len, offset, window, scale_log2, MASKED, CAUSAL, HAS_WINDOW)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])  # (BLOCK_M, BLOCK_N)
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.autotune(
    configs=_configs("bwd"),
    key=["D_QK", "D_V", "CAUSAL", "HAS_WINDOW"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
    stride_dqt, stride_dqh,
    n_heads, group, scale, window,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    TMA: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    hk = h // group
    q_start, k_start, q_len, k_len = _sequence(cu_q, cu_k, b)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offset = k_len - q_len
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q_end, k_end = q_start + q_len, k_start + k_len
    qd = _head(Q, h, stride_qh, stride_qt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)
    dod = _head(DO, h, stride_doh, stride_dot, q_end, D_V, BLOCK_M, BLOCK_DV, TMA)
    q = _load(qd, q_start + m0, stride_qt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)  # (BLOCK_M, BLOCK_DQK)
    do = _load(dod, q_start + m0, stride_dot, q_end, D_V, BLOCK_M, BLOCK_DV, TMA)  # (BLOCK_M, BLOCK_DV)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    kd = _head(K, hk, stride_kh, stride_kt, k_end, D_QK, BLOCK_N, BLOCK_DQK, TMA)
    vd = _head(V, hk, stride_vh, stride_vt, k_end, D_V, BLOCK_N, BLOCK_DV, TMA)
    lse2 = tl.load(LSE2 + h * stride_lh + q_start + offs_m, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=offs_m < q_len, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    scale_log2 = scale * 1.4426950408889634
    # As in the forward, except that the partial last key block needs no mask here (see _probs).
    lo, full, hi = _key_blocks(m0, k_len, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, False)
    for n0 in range(lo, full, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, kd, vd, k_start, n0, k_end, offs_m, offs_n, stride_kt, stride_vt,
            q_len, k_len, offset, window, scale_log2,
            D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, False, CAUSAL, HAS_WINDOW, TMA, UPCAST,
        )  # fmt: skip
    for n0 in range(tl.maximum(full, lo), hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, kd, vd, k_start, n0, k_end, offs_m, offs_n, stride_kt, stride_vt,
            q_len, k_len, offset, window, scale_log2,
            D_QK, D_V, BLOCK_DQK, BLOCK_DV, BLOCK_N, True, CAUSAL, HAS_WINDOW, TMA, UPCAST,
        )  # fmt: skip
    dqd = _head(DQ, h, stride_dqh, stride_dqt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)
    _store(dqd, q_start + m0, (dq * scale).to(DQ.dtype.element_ty), stride_dqt, q_end, D_QK, BLOCK_M, BLOCK_DQK, TMA)
