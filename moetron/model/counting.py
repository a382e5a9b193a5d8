"""Analytical parameter and FLOP counts of a ModelConfig (no model needs to be built).

Parameters
----------
`count_parameters(cfg)` returns
* `total`: every parameter of the main model (embedding, blocks, final norm, head; a tied head
  counts once). MTP modules are reported apart (`mtp_total`), as DeepSeek-V3's 671B excludes its
  14B MTP module.
* `active`: parameters one token uses in a forward pass: all of attention, dense FFNs, norms, the
  router, the shared experts, `top_k` routed experts per MoE layer and the output head. Of the
  embedding table a token reads one row, so only d_model of it counts (frameworks that count the
  whole table report `active + embedding - d_model`).

FLOPs
-----
`training_flops_per_token(cfg, seq_len)`: FLOPs of forward + backward per token, counting the
matrix multiplications (2 FLOPs per multiply-add) and nothing else:

    forward  = 2 * (matmul parameters a token uses)                      # projections, experts, head
             + sum over layers of 2 * n_heads * ctx * (qk_head_dim + v_head_dim)   # q.k and p.v
    training = 3 * forward                                               # backward = dgrad + wgrad

where ctx is the number of keys a query attends to: seq_len without a causal mask, (seq_len + 1) / 2
on average with one (the masked half is not counted, as a causal kernel skips it). MLA enters through
its projections and its head dims (qk = nope + rope, v); MTP depth k adds its projection, block and the
shared head on seq_len - k of the seq_len positions. Embedding lookups, norms, activations, softmax and
the router's top-k are not counted (they are O(d) per token). MoE layers count exactly top_k experts
per token, i.e. dropless routing. Packed documents attend over fewer keys than seq_len; the formula
does not model that (it gives the upper bound used for MFU by Megatron and PaLM alike).
"""

from __future__ import annotations

from moetron.model.config import ModelConfig


def attention_parameters(cfg: ModelConfig) -> int:
    d = cfg.d_model
    if cfg.attention == "gqa":
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        n = d * q_out + 2 * d * kv_out + q_out * d
        if cfg.attention_bias:
            n += q_out + 2 * kv_out + d
        if cfg.qk_norm:
            n += 2 * cfg.head_dim
        return n
    h, qk, rope = cfg.n_heads, cfg.qk_head_dim, cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        q = d * h * qk
    else:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
    kv = (
        d * (cfg.kv_lora_rank + rope)
        + cfg.kv_lora_rank
        + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    )
    return q + kv + h * cfg.v_head_dim * d


def ffn_parameters(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, active per token) of one feed-forward layer."""
    d = cfg.d_model
    if not moe:
        n = 3 * d * cfg.ffn_hidden
        return n, n
    expert = 3 * d * cfg.moe_ffn_hidden
    shared = cfg.n_shared_experts * expert
    router = cfg.n_routed_experts * d
    return router + shared + cfg.n_routed_experts * expert, router + shared + cfg.top_k * expert


def block_parameters(cfg: ModelConfig, layer_idx: int) -> tuple[int, int]:
    attn = attention_parameters(cfg)
    ffn_total, ffn_active = ffn_parameters(cfg, cfg.is_moe_layer(layer_idx))
    norms = 2 * cfg.d_model
    return attn + ffn_total + norms, attn + ffn_active + norms


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    d, v = cfg.d_model, cfg.vocab_size
    embedding = v * d
    head = 0 if cfg.tie_embeddings else v * d
    total, active = embedding + head + d, d + v * d + d  # embedding row, head, final norm
    for i in range(cfg.n_layers):
        t, a = block_parameters(cfg, i)
        total, active = total + t, active + a
    mtp_total = mtp_active = 0
    for k in range(cfg.mtp_depth):
        t, a = block_parameters(cfg, cfg.n_layers + k)
        extra = 2 * d * d + 3 * d  # proj + embed/hidden/output norms
        mtp_total, mtp_active = mtp_total + t + extra, mtp_active + a + extra
    return {"total": total, "active": active, "embedding": embedding, "mtp_total": mtp_total, "mtp_active": mtp_active}


def _matmul_parameters_per_token(cfg: ModelConfig, layer_idx: int) -> int:
    """Weights a token multiplies with in one block (no norms, biases or qk-norm: not matmuls)."""
    d = cfg.d_model
    if cfg.attention == "gqa":
        attn = 2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim
    else:
        h = cfg.n_heads
        q = d * h * cfg.qk_head_dim if cfg.q_lora_rank is None else cfg.q_lora_rank * (d + h * cfg.qk_head_dim)
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (
            cfg.qk_nope_head_dim + cfg.v_head_dim
        )
        attn = q + kv + h * cfg.v_head_dim * d
    return attn + ffn_parameters(cfg, cfg.is_moe_layer(layer_idx))[1]


def _attention_core_flops(cfg: ModelConfig, seq_len: int, causal: bool) -> float:
    ctx = (seq_len + 1) / 2 if causal else seq_len
    return 2.0 * cfg.n_heads * ctx * (cfg.qk_head_dim + cfg.value_head_dim)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    d, v = cfg.d_model, cfg.vocab_size
    flops = 2.0 * d * v  # output head
    for i in range(cfg.n_layers):
        flops += 2.0 * _matmul_parameters_per_token(cfg, i) + _attention_core_flops(cfg, seq_len, causal)
    for k in range(1, cfg.mtp_depth + 1):
        n = seq_len - k
        if n <= 0:
            break
        per_token = 2.0 * (2 * d * d + _matmul_parameters_per_token(cfg, cfg.n_layers + k - 1) + d * v)
        per_token += _attention_core_flops(cfg, n, causal)
        flops += per_token * n / seq_len  # depth k predicts on seq_len - k positions
    return flops


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward + backward FLOPs per token (3x forward); see the module docstring."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal)
