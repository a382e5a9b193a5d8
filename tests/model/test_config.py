"""ModelConfig validation, presets, and the analytical parameter and FLOP counts."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moetron.model import ModelConfig, Transformer, list_presets
from moetron.model.counting import count_parameters, training_flops_per_token

PRESETS = ["tiny", "moe_debug", "deepseek_v3_mini", "llama_dense_1b", "mixtral_8x7b", "deepseek_v3"]


def test_every_preset_loads_and_validates():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_overrides_and_unknown_preset():
    cfg = ModelConfig.from_preset("tiny", n_layers=3)
    assert cfg.n_layers == 3
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({"n_layer": 3})


def test_deepseek_v3_parameter_counts():
    cfg = ModelConfig.from_preset("deepseek_v3")
    counts = count_parameters(cfg)
    assert abs(counts["total"] / 671e9 - 1) < 0.01  # 671.03B
    # 36.63B counting one embedding row per token; the paper rounds to 37B (see README: 1.01% below it).
    assert round(counts["active"] / 1e9) == 37 and abs(counts["active"] / 37e9 - 1) < 0.0105
    assert (
        abs(counts["mtp_total"] + 2 * counts["embedding"] - 14e9) / 14e9 < 0.05
    )  # the 14B MTP module with its own embedding and head copies
    # the analytical count equals the parameters of the model built on the meta device
    with torch.device("meta"):
        model = Transformer(cfg)
    numel = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert numel == counts["total"]


def test_mixtral_preset_counts():
    counts = count_parameters(ModelConfig.from_preset("mixtral_8x7b"))
    assert abs(counts["total"] / 46.7e9 - 1) < 0.01
    assert abs((counts["active"] + counts["embedding"]) / 12.9e9 - 1) < 0.01  # Mistral counts the whole table


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_heads=2, qk_norm=True, attention_bias=True, tie_embeddings=True),
        dict(attention="mla", q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
        dict(
            attention="mla",
            q_lora_rank=12,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
            mtp_depth=2,
        ),
        dict(n_routed_experts=0),
    ],
)
def test_counts_match_built_model_and_flop_counter(overrides):
    cfg = ModelConfig(
        **{
            **dict(
                vocab_size=50,
                d_model=32,
                n_layers=3,
                n_heads=4,
                ffn_hidden=40,
                n_routed_experts=4,
                n_shared_experts=1,
                moe_ffn_hidden=12,
                top_k=2,
                first_k_dense_replace=1,
            ),
            **overrides,
        }
    )
    model = Transformer(cfg)
    counts = count_parameters(cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert (main, mtp) == (counts["total"], counts["mtp_total"])

    batch, seq = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    # The reference attention computes the full (seq x seq) score matrix, so compare with causal=False.
    expected = training_flops_per_token(cfg, seq, causal=False) * batch * seq
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    assert training_flops_per_token(cfg, seq, causal=True) < expected / (batch * seq)


BAD = [
    (dict(n_routed_experts=8, top_k=9), r"top_k=9 must be in \[1, n_routed_experts=8\]"),
    (
        dict(n_heads=8, n_kv_heads=3),
        r"n_heads=8 must be divisible by n_kv_heads=3 \(valid n_kv_heads: \[1, 2, 4, 8\]\)",
    ),
    (dict(head_dim=7), r"head_dim=7 must be a positive even number"),
    (dict(attention="mla", qk_rope_head_dim=7), r"qk_rope_head_dim=7 must be even"),
    (dict(attention="mha"), r"attention='mha' must be one of 'gqa', 'mla'"),
    (dict(n_routed_experts=8, n_group=3), r"n_group=3 must divide n_routed_experts=8 \(valid: \[1, 2, 4, 8\]\)"),
    (dict(n_routed_experts=8, n_group=4, topk_group=5), r"topk_group=5 must be in \[1, n_group=4\]"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, top_k=3), r"top_k=3 exceeds the experts reachable"),
    (dict(n_routed_experts=8, score_func="relu"), r"score_func='relu' must be one of"),
    (dict(n_routed_experts=8, first_k_dense_replace=9), r"first_k_dense_replace=9 must be in \[0, n_layers=4\]"),
    (dict(n_routed_experts=8, capacity_factor=0.0), r"capacity_factor=0.0 must be positive"),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0}), r"rope_scaling.type='ntk' must be one of"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5}), r"rope_scaling.factor=0.5 must be >= 1"),
    (dict(mtp_depth=-1), r"mtp_depth=-1 must be >= 0"),
    (dict(vocab_size=0), r"vocab_size=0 must be a positive integer"),
    (dict(attention="mla", qk_norm=True), r"qk_norm and attention_bias apply to attention='gqa' only"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_inconsistent_configs_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_yaml_roundtrip(tmp_path):
    cfg = ModelConfig.from_preset("deepseek_v3")
    cfg.to_yaml(tmp_path / "m.yaml")
    again = ModelConfig.from_yaml(tmp_path / "m.yaml")
    assert again == cfg and dataclasses.asdict(again.rope_scaling)["factor"] == 40.0
