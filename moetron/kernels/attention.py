"""Fused attention: the public entry point and its pure-torch reference.

`flash_attention(q, k, v, ...)` is the one attention call of the model. Today it dispatches to

* `attention_reference`: exact softmax attention in fp32, materializing the score matrix. It is the
  CPU path and the oracle every faster backend is tested against;
* `"sdpa"`: torch's `scaled_dot_product_attention` (the default for CUDA tensors until the Triton
  kernel lands), used only for what it supports (no logsumexp, no window); other calls fall back
  to the reference.

Semantics shared by every backend:

* q (batch, seq_q, n_heads, head_dim), k (batch, seq_k, n_kv_heads, head_dim),
  v (batch, seq_k, n_kv_heads, v_head_dim); output (batch, seq_q, n_heads, v_head_dim).
  n_kv_heads divides n_heads (GQA/MQA): query head h reads kv head h // (n_heads // n_kv_heads).
* causal: query i sees key j iff j <= i + (seq_k - seq_q) (bottom-right alignment, as FlashAttention).
* window: each query sees at most `window` keys ending at its own position (Mistral's sliding
  window); without causal, keys with |i - j| < window.
* cu_seqlens (n_docs + 1,) int: document boundaries over the flattened batch*seq tokens (packed
  sequences). Tokens attend only inside their document. With batch > 1 no document may cross a
  row boundary. Its values are checked for CPU tensors only: on the GPU a check would stall every
  call (the model builds them correct by construction and validates user input once per forward).
* return_lse: also return the logsumexp of the scaled scores, (batch, n_heads, seq_q) in fp32, so
  that attention over blocks of keys can be merged (ring attention). A query that sees no key
  gets output 0 and lse -inf.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Triton reads TRITON_INTERPRET once, when it loads; reading it here once too keeps it off the per-call path.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BACKENDS = ("torch", "sdpa", "triton")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    window: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Softmax attention softmax(q k^T * scale + mask) v. See the module docstring for the semantics.

    `max_seqlen` (the longest document) is a launch hint for kernels; the reference ignores it.
    `backend`: None picks the best available for the inputs; "torch", "sdpa" or "triton" force one.
    Every backward here is deterministic (the Triton one uses no atomics).
    """
    _check_shapes(q, k, v, causal, cu_seqlens, window)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if backend is None:
        backend = _default_backend(q, v, return_lse, window)
    if backend == "triton":
        from moetron.kernels.attention_triton import triton_attention

        return triton_attention(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen, window, return_lse)
    if backend == "sdpa" and not return_lse and window is None:
        return _sdpa_attention(q, k, v, causal, softmax_scale, cu_seqlens)
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: unknown backend {backend!r}; valid: {BACKENDS} or None")
    return attention_reference(q, k, v, causal, softmax_scale, cu_seqlens, window, return_lse)


def _default_backend(q, v, return_lse, window) -> str:
    """Triton for bf16/fp16 CUDA tensors (and under TRITON_INTERPRET=1), SDPA for other CUDA tensors,
    the reference elsewhere."""
    dims_ok = max(q.shape[-1], v.shape[-1]) <= 256 and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0
    if dims_ok and (_INTERPRET or (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16))):
        return "triton"
    if q.is_cuda and not return_lse and window is None:
        return "sdpa"
    return "torch"


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def attention_reference(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window=None, return_lse=False):
    """Exact attention in fp32 (fp64 for fp64 inputs, and fp32 under autocast too) with a materialized
    (seq_q, seq_k) score matrix per head."""
    batch, seq_q, n_heads, head_dim = q.shape
    seq_k, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    # GQA without repeating K/V: view the query heads as (n_kv_heads, group).
    qf = q.to(acc).reshape(batch, seq_q, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # (b, hkv, g, sq, d)
    kf = k.to(acc).permute(0, 2, 1, 3)  # (b, hkv, sk, d)
    vf = v.to(acc).permute(0, 2, 1, 3)  # (b, hkv, sk, dv)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qf, kf) * scale  # (b, hkv, g, sq, sk)

    allowed = attention_mask(seq_q, seq_k, causal, window, cu_seqlens, batch, q.device)
    if allowed is not None:  # (b or 1, sq, sk)
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (b, hkv, g, sq)
    # Rows that see no key have lse = -inf; give them probability 0 instead of NaN.
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, vf)  # (b, hkv, g, sq, dv)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, seq_q, n_heads, -1).to(q.dtype)
    if return_lse:
        return out, lse.reshape(batch, n_heads, seq_q)
    return out


def attention_mask(seq_q, seq_k, causal, window, cu_seqlens, batch, device):
    """Boolean (batch or 1, seq_q, seq_k) mask of allowed (query, key) pairs, or None if all are."""
    if not causal and window is None and cu_seqlens is None:
        return None
    offset = seq_k - seq_q  # bottom-right alignment of queries to keys
    qi = torch.arange(seq_q, device=device)[:, None] + offset
    kj = torch.arange(seq_k, device=device)[None, :]
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= kj <= qi
    if window is not None:
        allowed &= (qi - kj < window) & (kj - qi < (1 if causal else window))
    allowed = allowed[None]
    if cu_seqlens is not None:
        doc = doc_ids_from_cu_seqlens(cu_seqlens, batch * seq_q).view(batch, seq_q)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    return allowed


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) document index of every token, from boundaries [0, len0, len0+len1, ..., total]."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)


def _sdpa_attention(q, k, v, causal, scale, cu_seqlens):
    seq_q, seq_k = q.shape[1], k.shape[1]
    mask = None
    if cu_seqlens is not None or (causal and seq_q != seq_k):
        mask = attention_mask(seq_q, seq_k, causal, None, cu_seqlens, q.shape[0], q.device)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # (b, h, sq, dv)
    return out.transpose(1, 2)


def _check_shapes(q, k, v, causal, cu_seqlens, window) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attention expects 4-D (batch, seq, heads, head_dim) tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"flash_attention: incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}: "
            "k and v must share (batch, seq, n_kv_heads), q and k must share batch and head_dim"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attention: n_heads={q.shape[2]} is not a multiple of n_kv_heads={k.shape[2]}")
    if window is not None and window < 1:
        raise ValueError(f"flash_attention: window={window} must be >= 1 or None")
    if cu_seqlens is not None:
        total = q.shape[0] * q.shape[1]
        if q.shape[1] != k.shape[1]:
            raise ValueError("flash_attention: cu_seqlens (packed documents) needs seq_q == seq_k")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("flash_attention: cu_seqlens must be 1-D [0, ..., batch*seq]")
        if cu_seqlens.is_cuda:
            return  # checking the values would stall the GPU on every call; the caller vouches for them
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != total or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"flash_attention: cu_seqlens must rise from 0 to batch*seq={total}, got {cu_seqlens.tolist()}"
            )
        if q.shape[0] > 1:
            rows = torch.arange(0, total + 1, q.shape[1], device=cu_seqlens.device)
            if not bool(torch.isin(rows, cu_seqlens).all()):
                raise ValueError(
                    "flash_attention: with batch > 1 every row start must be a document boundary in "
                    "cu_seqlens; pass q, k, v as (1, total, heads, dim) for documents that span rows"
                )
