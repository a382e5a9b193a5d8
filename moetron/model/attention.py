"""Self-attention layers: grouped-query attention (MHA/GQA/MQA) and DeepSeek's multi-head latent attention.

Both project the input, apply rotary embeddings and call `moetron.kernels.flash_attention`, which owns
the causal and document masking. Shapes: x (batch, seq, d_model) -> (batch, seq, d_model).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moetron.kernels import flash_attention
from moetron.model.config import ModelConfig
from moetron.model.layers import RMSNorm, apply_rope, make_linear, project_together, sibling_caches

# DeepSeek normalizes the q/kv latents with a fixed epsilon, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads shared by groups of query heads
    (Ainslie et al. 2023); n_kv_heads = n_heads is MHA, 1 is MQA. Optional per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.softmax_scale, self.backend = cfg.softmax_scale, cfg.attention_backend
        bias, fp8 = cfg.attention_bias, cfg.fp8.group("attention")
        self.q_proj = make_linear(cfg.d_model, self.n_heads * self.head_dim, bias, fp8)
        self.k_proj = make_linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias, fp8)
        self.v_proj = make_linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias, fp8)
        self.o_proj = make_linear(self.n_heads * self.head_dim, cfg.d_model, bias, fp8)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.fp8_weight_caches = sibling_caches(fp8, "qkv")
        self.fuse_norm = fp8 is not None and fp8.fuse_norm

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, norm=None):
        """x (batch, seq, d_model); `norm`: the block's pre-norm, applied to x here (in FP8 fused into the
        projections' quantization with `fp8.fuse_norm`)."""
        batch, seq, _ = x.shape
        # (in FP8 without bias: one GEMM for the three, project_together)
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = project_together(x, qkv, self.fp8_weight_caches.get("qkv"), norm, self.fuse_norm)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = flash_attention(
            q,
            k,
            v,
            causal=True,
            softmax_scale=self.softmax_scale,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=self.backend,
        )  # (batch, seq, n_heads, head_dim)
        return self.o_proj(out.reshape(batch, seq, -1))


class MultiHeadLatentAttention(nn.Module):
    """MLA (DeepSeek-V2 section 2.1): keys and values come from a shared low-rank latent c_kv
    (kv_lora_rank), queries optionally from a latent c_q (q_lora_rank). Position enters through a
    decoupled RoPE part: each query head has qk_rope_head_dim rotary dims, while the rotary key
    k_pe is one vector shared by all heads. Per head: q = [q_nope, q_pe] (qk_nope + qk_rope dims),
    k = [k_nope, k_pe], v has v_head_dim dims, so the attention core sees a value head dim that
    differs from the query/key head dim (V3: 192 vs 128)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        self.softmax_scale, self.backend = cfg.softmax_scale, cfg.attention_backend
        qk_dim, fp8 = self.nope_dim + self.rope_dim, cfg.fp8.group("attention")
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(cfg.d_model, self.n_heads * qk_dim, fp8=fp8)
        else:
            self.q_a_proj = make_linear(cfg.d_model, cfg.q_lora_rank, fp8=fp8)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = make_linear(cfg.q_lora_rank, self.n_heads * qk_dim, fp8=fp8)
        self.kv_a_proj = make_linear(cfg.d_model, self.kv_lora_rank + self.rope_dim, fp8=fp8)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = make_linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), fp8=fp8)
        self.o_proj = make_linear(self.n_heads * self.v_dim, cfg.d_model, fp8=fp8)
        self.fp8_weight_caches = sibling_caches(fp8, "q_kv_a")
        self.fuse_norm = fp8 is not None and fp8.fuse_norm

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, norm=None):
        """x (batch, seq, d_model); `norm`: the block's pre-norm, applied to x here. In FP8 with `fp8.fuse_norm`
        it and the latent norms are fused into the quantization of the projections that read them."""
        batch, seq, _ = x.shape
        fuse = self.fuse_norm
        # the projections of x (in FP8: one GEMM for both, project_together)
        q_proj = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv_a = project_together(x, (q_proj, self.kv_a_proj), self.fp8_weight_caches.get("q_kv_a"), norm, fuse)
        if self.q_lora_rank is not None:
            (q,) = project_together(q, (self.q_b_proj,), None, self.q_a_norm, fuse)
        q = q.view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)

        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        (kv,) = project_together(c_kv, (self.kv_b_proj,), None, self.kv_a_norm, fuse)
        kv = kv.view(batch, seq, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)

        cos, sin = rope
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.view(batch, seq, 1, self.rope_dim), cos, sin)  # one rotary key for all heads
        q = torch.cat([q_nope, q_pe], dim=-1)  # (batch, seq, n_heads, nope + rope)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        out = flash_attention(
            q,
            k,
            v,
            causal=True,
            softmax_scale=self.softmax_scale,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            backend=self.backend,
        )  # (batch, seq, n_heads, v_head_dim)
        return self.o_proj(out.reshape(batch, seq, -1))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)
