"""Hugging Face config.json <-> ModelConfig for DeepseekV3, Mixtral, Qwen3-MoE and Llama.

`config_from_hf(config.json dict) -> ModelConfig` and `config_to_hf(cfg, architecture) -> dict`.
A field moetron cannot represent raises ValueError naming it and the valid values, never a silent
approximation. transformers 5 writes RoPE under `rope_parameters`; older configs use `rope_theta` +
`rope_scaling`; both are read, and export writes both.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from moetron.model.config import ModelConfig, RopeScaling

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Defaults of HF's config classes for the keys hub configs sometimes omit.
_HF_DEFAULTS = {
    "deepseek_v3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 1e4},
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1e4},
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 1e4},
}


def model_type_of(hf_config: Mapping) -> str:
    """The `model_type` of a config.json dict, checked against the supported architectures."""
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type={model_type!r}; supported: {sorted(ARCHITECTURES)}")
    return model_type


def config_from_hf(hf_config: Mapping, weight_names: Collection[str] = ()) -> ModelConfig:
    """ModelConfig of a Hugging Face config.json dict.

    `weight_names` (the checkpoint's tensor names) decides DeepSeek's mtp_depth: num_nextn_predict_layers
    counts only when the MTP weights (`model.layers.{n_layers + k}.eh_proj.weight`) are present, else 0.
    Training-only fields (balancing rates, loss weights, capacity) keep ModelConfig's defaults."""
    arch = model_type_of(hf_config)
    d = dict(hf_config)
    get = _getter(d, arch)
    _reject_common(d, arch)
    rope_theta, rope_scaling = _rope_from_hf(d, arch)
    fields = dict(
        vocab_size=get("vocab_size"),
        d_model=get("hidden_size"),
        n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"),
        max_seq_len=get("max_position_embeddings"),
        norm_eps=get("rms_norm_eps"),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=d.get("initializer_range", 0.02),
        ffn_hidden=get("intermediate_size"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
    )
    if arch == "deepseek_v3":
        fields.update(_deepseek_fields(d, get, weight_names))
    else:
        fields.update(_gqa_fields(d, get, arch))
    return ModelConfig(**fields)


def _getter(d: Mapping, arch: str):
    def get(key: str):
        if key in d and d[key] is not None:
            return d[key]
        if key in _HF_DEFAULTS[arch]:
            return _HF_DEFAULTS[arch][key]
        raise ValueError(f"{arch} config.json lacks the required field {key!r}")

    return get


def _reject_common(d: Mapping, arch: str) -> None:
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ValueError(
            f"quantization_config (quant_method={method!r}) is not supported: moetron imports unquantized "
            "bf16/fp16/fp32 checkpoints; dequantize the weights first"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported: moetron's SwiGLU uses 'silu'")


def _gqa_fields(d: Mapping, get, arch: str) -> dict:
    n_heads = get("num_attention_heads")
    fields = dict(
        attention="gqa",
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or get("hidden_size") // n_heads,
        # q/k/v/o biases in Llama and Qwen3; Mixtral has none (transformers ignores the key there).
        attention_bias=arch != "mixtral" and bool(d.get("attention_bias", False)),
    )
    if arch == "llama":
        if d.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported: moetron's SwiGLU has no biases")
        return fields
    if arch == "mixtral":
        if d.get("sliding_window") is not None:
            raise ValueError(f"sliding_window={d['sliding_window']} is not supported (valid: null, full attention)")
        n_experts = d.get("num_local_experts", d.get("num_experts"))
        return fields | dict(
            n_routed_experts=n_experts if n_experts is not None else 8,
            top_k=d.get("num_experts_per_tok", 2),
            moe_ffn_hidden=get("intermediate_size"),
            score_func="softmax",
            norm_topk_prob=True,
        )
    # qwen3_moe
    if d.get("use_sliding_window", False):
        raise ValueError(f"use_sliding_window=True (sliding_window={d.get('sliding_window')}) is not supported")
    if d.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"decoder_sparse_step={d['decoder_sparse_step']} is not supported: moetron's MoE layers are "
            "every layer after the first first_k_dense_replace (valid: 1)"
        )
    dense = sorted(d.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ValueError(
            f"mlp_only_layers={dense} is not supported: moetron keeps only a leading run of dense layers "
            f"(valid: [] or [0, 1, ..., k-1], which maps to first_k_dense_replace=k)"
        )
    n_experts = d.get("num_experts", d.get("num_local_experts"))
    if not n_experts:
        raise ValueError(f"num_experts={n_experts!r} is not supported for qwen3_moe (valid: >= 1)")
    return fields | dict(
        qk_norm=True,
        n_routed_experts=n_experts,
        top_k=d.get("num_experts_per_tok", 8),
        moe_ffn_hidden=get("moe_intermediate_size"),
        first_k_dense_replace=len(dense),
        score_func="softmax",
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
    )


def _deepseek_fields(d: Mapping, get, weight_names: Collection[str]) -> dict:
    if d.get("attention_bias", False):
        raise ValueError("attention_bias=True is not supported for deepseek_v3: moetron's MLA has no biases")
    for key, valid in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if d.get(key, valid) != valid:
            raise ValueError(f"{key}={d[key]!r} is not supported for deepseek_v3 (valid: {valid!r})")
    n_layers = get("num_hidden_layers")
    n_mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
    names = set(weight_names)
    mtp_depth = 0
    while mtp_depth < n_mtp and f"model.layers.{n_layers + mtp_depth}.eh_proj.weight" in names:
        mtp_depth += 1
    fields = dict(
        attention="mla",
        q_lora_rank=d.get("q_lora_rank"),
        kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"),
        mtp_depth=mtp_depth,
    )
    if not d.get("n_routed_experts"):
        return fields  # every layer dense
    return fields | dict(
        n_routed_experts=d["n_routed_experts"],
        n_shared_experts=d.get("n_shared_experts") or 0,
        moe_ffn_hidden=get("moe_intermediate_size"),
        top_k=get("num_experts_per_tok"),
        first_k_dense_replace=min(d.get("first_k_dense_replace") or 0, n_layers),
        score_func="sigmoid",
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
    )


def _rope_from_hf(d: Mapping, arch: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or the older top-level
    `rope_theta` + `rope_scaling` ({"type" or "rope_type": ...})."""
    # transformers 5 lets a legacy rope_scaling win over rope_parameters; the theta inside the dict
    # wins over the top-level one.
    modern = dict(d.get("rope_parameters") or {})
    params = dict(d.get("rope_scaling") or modern)
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters {params} are not supported (one RoPE for all layers)")
    default_theta = modern.get("rope_theta", _HF_DEFAULTS[arch]["rope_theta"])
    theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (valid: 1.0, rotate every head dim)")
    if rope_type == "default":
        return theta, None
    if rope_type not in ("yarn", "llama3"):
        raise ValueError(f"rope_type={rope_type!r} is not supported; valid: 'default', 'yarn', 'llama3'")
    max_pos = d.get("max_position_embeddings", _HF_DEFAULTS[arch]["max_position_embeddings"])
    original = params.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:  # HF's YaRN fallback
        factor = max_pos / original
    if rope_type == "llama3":
        return theta, RopeScaling(
            type="llama3",
            factor=float(factor),
            original_max_seq_len=int(original),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    attention_factor = params.get("attention_factor")
    scaling = RopeScaling(
        type="yarn",
        factor=float(factor),
        original_max_seq_len=int(original),
        beta_fast=float(params.get("beta_fast") or 32),  # HF: `or 32` / `or 1`
        beta_slow=float(params.get("beta_slow") or 1),
        # HF reads a missing mscale as "unset" (cos/sin scale from factor alone); moetron spells that 0.
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )
    return theta, scaling


def infer_architecture(cfg: ModelConfig) -> str:
    """The HF architecture a config exports to by default: MLA -> deepseek_v3; MoE -> qwen3_moe with
    qk_norm, else mixtral; dense -> llama."""
    if cfg.attention == "mla":
        return "deepseek_v3"
    if cfg.is_moe:
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    return "llama"


def config_to_hf(cfg: ModelConfig, architecture: str | None = None) -> dict:
    """config.json content for `architecture` (None: `infer_architecture(cfg)`). Raises ValueError
    when the config uses something the target cannot express. Training-only fields (balancing rates,
    loss weights, capacity_factor) have no HF counterpart and are not written."""
    arch = architecture or infer_architecture(cfg)
    _check_expressible(cfg, arch)
    d = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "intermediate_size": cfg.ffn_hidden,
    }
    d.update(_rope_to_hf(cfg))
    if arch == "deepseek_v3":
        d.update(
            num_key_value_heads=cfg.n_heads,  # MLA has no kv heads; HF divides by this number
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts,
            moe_intermediate_size=cfg.moe_ffn_hidden,
            num_experts_per_tok=cfg.top_k,
            first_k_dense_replace=cfg.first_k_dense_replace if cfg.is_moe else cfg.n_layers,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            num_nextn_predict_layers=cfg.mtp_depth,
            rope_interleave=True,  # export writes DeepSeek's interleaved rotary rows
            attention_bias=False,
        )
        return d
    d.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    if arch == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    elif arch == "mixtral":
        d.update(
            num_local_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.top_k,
            intermediate_size=cfg.moe_ffn_hidden,
            sliding_window=None,
        )
    else:  # qwen3_moe
        d.update(
            attention_bias=cfg.attention_bias,
            num_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.top_k,
            moe_intermediate_size=cfg.moe_ffn_hidden,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.first_k_dense_replace)),
            use_sliding_window=False,
        )
    return d


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers 5's `rope_parameters`, plus the legacy top-level `rope_theta` and `rope_scaling`
    for older readers (transformers 4, DeepSeek's own modeling code)."""
    rs = cfg.rope_scaling
    params: dict = {"rope_type": "default" if rs is None else rs.type, "rope_theta": cfg.rope_theta}
    if rs is not None:
        params.update(factor=rs.factor, original_max_position_embeddings=rs.original_max_seq_len)
    if rs is not None and rs.type == "llama3":
        params.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    if rs is not None and rs.type == "yarn":
        params.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
        params.update({k: getattr(rs, k) for k in ("mscale", "mscale_all_dim", "attention_factor") if getattr(rs, k)})
    out = {"rope_parameters": params, "rope_theta": cfg.rope_theta}
    if rs is not None:
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"} | {"type": rs.type}
    return out


def _check_expressible(cfg: ModelConfig, arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"cannot export to {arch}: {what}")

    if arch == "deepseek_v3":
        need(cfg.attention == "mla", f"attention={cfg.attention!r} (deepseek_v3 needs 'mla')")
        need(
            not cfg.is_moe or cfg.score_func == "sigmoid",
            f"score_func={cfg.score_func!r} (deepseek_v3 routes with 'sigmoid')",
        )
        return
    need(cfg.attention == "gqa", f"attention={cfg.attention!r} ({arch} needs 'gqa'; MLA exports to deepseek_v3)")
    if arch == "llama":
        need(
            not cfg.is_moe,
            f"n_routed_experts={cfg.n_routed_experts} (llama is dense; MoE exports to mixtral or qwen3_moe)",
        )
        need(not cfg.qk_norm, "qk_norm=True (llama has no q/k norm; qwen3_moe has)")
        return
    need(cfg.is_moe, f"n_routed_experts={cfg.n_routed_experts} ({arch} is a MoE; dense models export to llama)")
    need(cfg.score_func == "softmax", f"score_func={cfg.score_func!r} ({arch} routes with 'softmax')")
    need(cfg.n_shared_experts == 0, f"n_shared_experts={cfg.n_shared_experts} ({arch} has no shared experts)")
    need(
        cfg.n_group == 1 or cfg.topk_group == cfg.n_group,
        f"n_group={cfg.n_group}, topk_group={cfg.topk_group} ({arch} has no group-limited routing)",
    )
    need(cfg.routed_scaling_factor == 1.0, f"routed_scaling_factor={cfg.routed_scaling_factor} ({arch} needs 1.0)")
    if arch == "mixtral":
        need(not cfg.qk_norm, "qk_norm=True (mixtral has no q/k norm; qwen3_moe has)")
        need(not cfg.attention_bias, "attention_bias=True (mixtral's attention has no biases)")
        need(cfg.norm_topk_prob, "norm_topk_prob=False (mixtral always renormalizes the top-k weights)")
        need(
            cfg.first_k_dense_replace == 0,
            f"first_k_dense_replace={cfg.first_k_dense_replace} (mixtral has no dense layers)",
        )
    else:
        need(cfg.qk_norm, "qk_norm=False (qwen3_moe always normalizes q and k; mixtral does not)")
