"""Hugging Face interop (moetron.model.hf, moetron.model.io, moetron.convert): tiny transformers models of
every supported architecture, built offline from configs with every tensor randomized, must give the
same logits after import, reload in transformers after export, and survive export -> import bit for bit.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    MixtralConfig,
    Qwen3MoeConfig,
)

from moetron.convert import main as convert_main
from moetron.model import ModelConfig, Transformer
from moetron.model.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    read_hf_config,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf,
)
from moetron.model.io import load_moetron, read_safetensors_dir, save_moetron

VOCAB = 128
BATCH, SEQ = 2, 24
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- tiny HF models
def deepseek_config(**overrides) -> DeepseekV3Config:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.5,
        max_position_embeddings=256,
    )  # fmt: skip
    return DeepseekV3Config(**(base | overrides))


YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
    "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0,
}  # fmt: skip
LLAMA3 = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}  # fmt: skip

CASES = {
    "deepseek_v3-q_lora": lambda: deepseek_config(),
    "deepseek_v3-grouped": lambda: deepseek_config(
        q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=2, norm_topk_prob=False
    ),
    "deepseek_v3-yarn": lambda: deepseek_config(rope_parameters=dict(YARN)),
    "mixtral": lambda: MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    ),  # fmt: skip
    "qwen3_moe": lambda: Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[0],
        max_position_embeddings=128,
    ),  # fmt: skip
    "qwen3_moe-tied-bias": lambda: Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        attention_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    ),  # fmt: skip
    "llama-llama3": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters=dict(LLAMA3),
    ),  # fmt: skip
}


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Overwrite every parameter and persistent buffer: transformers starts routers at zero, norms at
    one and DeepSeek's e_score_correction_bias at zero, values a wrong mapping could still match."""
    for name, tensor in model.state_dict().items():
        if re.search(r"(norm|layernorm)\.weight$", name):
            tensor.copy_(1 + 0.1 * torch.randn_like(tensor))
        elif tensor.dim() == 1:  # biases and the selection bias
            tensor.copy_(0.1 * torch.randn_like(tensor))
        else:  # (out, in) or (experts, out, in): unit-scale outputs
            tensor.copy_(torch.randn_like(tensor) / tensor.shape[-1] ** 0.5)


def build_hf_case(name: str, path: Path):
    """A saved, randomized HF model: (name, model, directory, input_ids, logits)."""
    torch.manual_seed(sorted(CASES).index(name))
    model = AutoModelForCausalLM.from_config(CASES[name](), attn_implementation="eager").eval()
    randomize_(model)
    model.save_pretrained(path)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        logits = model(input_ids).logits
    return name, model, path, input_ids, logits


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    return build_hf_case(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def deepseek_case(tmp_path_factory):
    """The richest case (no q LoRA, group-limited routing, a dense first layer, 2 shared experts)
    for the tests that need only one architecture."""
    return build_hf_case("deepseek_v3-grouped", tmp_path_factory.mktemp("deepseek"))


def logits_of(model: Transformer, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------- import / export equivalence
def test_import_matches_hf_logits(hf_case):
    name, _, path, input_ids, hf_logits = hf_case
    model = from_hf(path)
    err = (logits_of(model, input_ids) - hf_logits).abs().max().item()
    assert err < 1e-4, f"{name}: max |logit error| {err}"
    if name.startswith("deepseek_v3"):
        assert model.cfg.mtp_depth == 0  # num_nextn_predict_layers=1 in the config, but no MTP weights
    if name == "qwen3_moe":
        assert model.cfg.first_k_dense_replace == 1  # mlp_only_layers=[0]


def test_export_reloads_in_transformers(hf_case, tmp_path):
    name, _, path, input_ids, hf_logits = hf_case
    to_hf(from_hf(path), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = reloaded(input_ids).logits
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-6)


def test_export_then_import_is_exact(hf_case, tmp_path):
    _, _, path, _, _ = hf_case
    model = from_hf(path)
    to_hf(model, tmp_path)
    back = from_hf(tmp_path)
    assert back.cfg == model.cfg
    assert_same_tensors(model.state_dict(), back.state_dict())
    if model.cfg.tie_embeddings:
        assert back.lm_head.weight is back.embed.weight


def test_hf_state_dict_roundtrip_is_exact(hf_case):
    _, _, path, _, _ = hf_case
    hf_tensors = read_safetensors_dir(path)
    hf_config = read_hf_config(path)
    cfg = config_from_hf(hf_config, hf_tensors.keys())
    arch = hf_config["model_type"]
    assert_same_tensors(state_dict_to_hf(state_dict_from_hf(hf_tensors, cfg, arch), cfg, arch), hf_tensors)


def fuse(hf_tensors: dict, cfg: ModelConfig, arch: str) -> dict:
    """The split hub layout rewritten into every fused layout import accepts: 3-D experts
    (gate_up_proj (E, 2I, d), down_proj (E, d, I); Mixtral under transformers 5's `mlp.` names),
    dense gate_up_proj and, for GQA, one qkv_proj (q | k | v rows)."""
    fused, experts = {}, {}
    for name, tensor in hf_tensors.items():
        if m := re.fullmatch(r"(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight", name):
            prefix = m.group(1).replace("block_sparse_moe", "mlp")
            role = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m.group(3), m.group(3))
            experts.setdefault(prefix, {}).setdefault(role, {})[int(m.group(2))] = tensor
        else:
            fused[name.replace("block_sparse_moe", "mlp")] = tensor
    for prefix, roles in experts.items():
        stack = {role: torch.stack([by_e[e] for e in sorted(by_e)]) for role, by_e in roles.items()}
        fused[f"{prefix}.experts.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], dim=1)
        fused[f"{prefix}.experts.down_proj"] = stack["down_proj"]
    for name in [n for n in fused if re.fullmatch(r"model\.layers\.\d+\.mlp\.gate_proj\.weight", n)]:
        up = fused.pop(name.replace("gate_proj", "up_proj"))
        fused[name.replace("gate_proj", "gate_up_proj")] = torch.cat([fused.pop(name), up])
    if cfg.attention == "gqa":
        for name in [n for n in fused if n.endswith("self_attn.q_proj.weight") or n.endswith("self_attn.q_proj.bias")]:
            parts = [fused.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
    return fused


def test_fused_layouts_import_like_split(hf_case):
    _, hf_model, path, _, _ = hf_case
    hf_tensors = read_safetensors_dir(path)
    hf_config = read_hf_config(path)
    cfg = config_from_hf(hf_config, hf_tensors.keys())
    arch = hf_config["model_type"]
    expected = state_dict_from_hf(hf_tensors, cfg, arch)
    fused = fuse(hf_tensors, cfg, arch)
    assert any(n.endswith("gate_up_proj") or "qkv_proj" in n for n in fused)
    assert_same_tensors(state_dict_from_hf(fused, cfg, arch), expected)
    # transformers 5's own in-memory layout
    in_memory = {n: t.detach() for n, t in hf_model.state_dict().items()}
    assert_same_tensors(state_dict_from_hf(in_memory, cfg, arch), expected)


# ---------------------------------------------------------------------- sharding, MTP, dtypes
def test_sharded_checkpoints(deepseek_case, tmp_path):
    _, hf_model, path, input_ids, hf_logits = deepseek_case
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = from_hf(tmp_path / "hf")
    assert_same_tensors(model.state_dict(), from_hf(path).state_dict())

    to_hf(model, tmp_path / "ours", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, hf_logits, rtol=0, atol=1e-6)
    assert_same_tensors(from_hf(tmp_path / "ours").state_dict(), model.state_dict())


def moetron_deepseek(mtp_depth: int = 1, **overrides) -> Transformer:
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, attention="mla", q_lora_rank=24, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, ffn_hidden=96, n_routed_experts=4,
        n_shared_experts=1, moe_ffn_hidden=32, top_k=2, first_k_dense_replace=1, score_func="sigmoid",
        routed_scaling_factor=2.5, mtp_depth=mtp_depth, max_seq_len=128, **overrides,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    randomize_(model)  # also the norms and the selection bias, which init_weights sets to 1 and 0
    return model


def test_mtp_export_import_roundtrip(tmp_path):
    model = moetron_deepseek(mtp_depth=1)
    hf_config = to_hf(model, tmp_path)
    assert hf_config["num_nextn_predict_layers"] == 1
    tensors = read_safetensors_dir(tmp_path)
    mtp = "model.layers.2"  # depth 1 sits after the n_layers=2 main layers
    for leaf in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "mlp.gate.weight"):
        assert f"{mtp}.{leaf}" in tensors, leaf
    assert torch.equal(tensors[f"{mtp}.embed_tokens.weight"], model.embed.weight)
    assert torch.equal(tensors[f"{mtp}.shared_head.head.weight"], model.lm_head.weight)

    back = from_hf(tmp_path)
    assert back.cfg.mtp_depth == 1
    assert_same_tensors(model.state_dict(), back.state_dict())
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        assert torch.equal(model(input_ids, labels).mtp_loss, back(input_ids, labels).mtp_loss)
        # transformers' DeepseekV3 has no MTP: it skips those layers and must match the main model
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        err = (hf(input_ids).logits - model(input_ids).logits).abs().max().item()
    assert err < 1e-4


def test_mtp_is_dropped_with_a_warning_for_other_architectures():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64, mtp_depth=1)
    model = Transformer(cfg)
    with pytest.warns(UserWarning, match="mtp_depth=1"):
        tensors = state_dict_to_hf(model.state_dict(), cfg, "llama")
    assert not any("eh_proj" in n for n in tensors)


def test_dtype_and_moetron_directory(tmp_path):
    model = moetron_deepseek(mtp_depth=0, tie_embeddings=True)
    to_hf(model, tmp_path / "hf", dtype="bf16")
    tensors = read_safetensors_dir(tmp_path / "hf")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # as HF keeps it
    assert "lm_head.weight" not in tensors  # tied

    bf16 = from_hf(tmp_path / "hf", dtype=None)
    assert bf16.embed.weight.dtype == torch.bfloat16
    assert bf16.layers["1"].ffn.router.expert_bias.dtype == torch.float32
    save_moetron(bf16, tmp_path / "mt")
    again = load_moetron(tmp_path / "mt")
    assert again.cfg == bf16.cfg and again.lm_head.weight is again.embed.weight
    assert_same_tensors(again.state_dict(), bf16.state_dict())


# ---------------------------------------------------------------------- configs
def test_legacy_rope_fields_read_like_rope_parameters():
    base = config_to_hf(moetron_deepseek(mtp_depth=0).cfg)
    base.pop("rope_theta")
    modern = base | {"rope_parameters": dict(YARN, rope_theta=5e4)}
    legacy = base | {"rope_parameters": None, "rope_theta": 5e4, "rope_scaling": dict(YARN, type="yarn")}
    del legacy["rope_scaling"]["rope_type"], legacy["rope_scaling"]["rope_theta"]
    cfg = config_from_hf(modern)
    assert cfg == config_from_hf(legacy)
    assert cfg.rope_theta == 5e4 and cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 4.0
    assert cfg.rope_scaling.mscale_all_dim == 1.0 and cfg.rope_scaling.original_max_seq_len == 64

    llama = config_to_hf(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2))
    llama.pop("rope_parameters")
    llama["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}
    assert config_from_hf(llama).rope_scaling.type == "llama3"
    llama["rope_scaling"] = {"rope_type": "default"}
    assert config_from_hf(llama).rope_scaling is None


def llama_dict(**overrides) -> dict:
    return config_to_hf(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2), "llama") | overrides


UNSUPPORTED = {
    "mlp_only_layers": ("qwen3_moe", {"mlp_only_layers": [1]}),
    "decoder_sparse_step": ("qwen3_moe", {"decoder_sparse_step": 2}),
    "use_sliding_window": ("qwen3_moe", {"use_sliding_window": True}),
    "sliding_window": ("mixtral", {"sliding_window": 4096}),
    "mlp_bias": ("llama", {"mlp_bias": True}),
    "hidden_act": ("llama", {"hidden_act": "gelu"}),
    "rope_type": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
    "partial_rotary_factor": ("llama", {"partial_rotary_factor": 0.5}),
    "attention_bias": ("deepseek_v3", {"attention_bias": True}),
    "scoring_func": ("deepseek_v3", {"scoring_func": "softmax"}),
    "quantization_config": ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}),
}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_fields_raise(field):
    arch, overrides = UNSUPPORTED[field]
    d = CASES[next(n for n in sorted(CASES) if n.startswith(arch))]().to_dict() | overrides
    with pytest.raises(ValueError, match=field):
        config_from_hf(d)


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*deepseek_v3.*llama.*mixtral.*qwen3_moe"):
        config_from_hf(llama_dict(model_type="gpt2"))


def test_configs_the_target_cannot_express_raise():
    moe = dict(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, n_routed_experts=4, moe_ffn_hidden=16)
    with pytest.raises(ValueError, match="mixtral.*n_shared_experts=1"):
        config_to_hf(ModelConfig(**moe, n_shared_experts=1), "mixtral")
    with pytest.raises(ValueError, match="qwen3_moe.*qk_norm=False"):
        config_to_hf(ModelConfig(**moe), "qwen3_moe")
    with pytest.raises(ValueError, match="deepseek_v3.*attention='gqa'"):
        config_to_hf(ModelConfig(**moe), "deepseek_v3")
    with pytest.raises(ValueError, match="llama.*n_routed_experts=4"):
        config_to_hf(ModelConfig(**moe), "llama")
    model = Transformer(ModelConfig(**moe))
    model.layers["0"].ffn.router.expert_bias.fill_(0.5)  # aux-loss-free balancing moved it
    with pytest.raises(ValueError, match=r"layers\.0\.ffn\.router\.expert_bias is nonzero"):
        state_dict_to_hf(model.state_dict(), model.cfg, "mixtral")


# ---------------------------------------------------------------------- bad weights
def deepseek_tensors(tmp_path) -> tuple[dict, ModelConfig]:
    to_hf(moetron_deepseek(mtp_depth=0), tmp_path)
    tensors = read_safetensors_dir(tmp_path)
    return tensors, config_from_hf(read_hf_config(tmp_path), tensors.keys())


def test_missing_weight_is_named(tmp_path):
    tensors, cfg = deepseek_tensors(tmp_path)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing weight 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        state_dict_from_hf(tensors, cfg, "deepseek_v3")


def test_unknown_weight_is_named(tmp_path):
    tensors, cfg = deepseek_tensors(tmp_path)
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.mystery\.weight"):
        state_dict_from_hf(tensors, cfg, "deepseek_v3")


def test_wrong_shape_is_named(tmp_path):
    tensors, _ = deepseek_tensors(tmp_path)
    config = read_hf_config(tmp_path) | {"kv_lora_rank": 8}  # config disagrees with the weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"kv_a_proj\.weight has shape \(24, 64\); the config implies 16 rows"):
        from_hf(tmp_path)


# ---------------------------------------------------------------------- CLI
def test_cli_roundtrip_is_exact(deepseek_case, tmp_path, capsys):
    _, _, path, _, _ = deepseek_case
    assert convert_main(["--from", "hf", "--src", str(path), "--dst", str(tmp_path / "mt")]) == 0
    assert "hf(deepseek_v3) -> moetron" in capsys.readouterr().out
    assert (tmp_path / "mt" / "config.yaml").exists() and (tmp_path / "mt" / "generation_config.json").exists()
    argv = ["--from", "moetron", "--src", str(tmp_path / "mt"), "--dst", str(tmp_path / "hf"), "--arch", "deepseek_v3"]
    assert convert_main(argv) == 0
    assert "moetron -> hf(deepseek_v3)" in capsys.readouterr().out
    assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(path))

    assert convert_main(["--from", "hf", "--src", str(path), "--dst", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert load_moetron(tmp_path / "bf16").embed.weight.dtype == torch.bfloat16


def test_cli_errors(tmp_path, capsys):
    assert convert_main(["--from", "hf", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert_main(["--from", "hf", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "out")]) == 1
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert convert_main(["--from", "hf", "--src", str(tmp_path / "gpt2"), "--dst", str(tmp_path / "out")]) == 1
    assert "supported: ['deepseek_v3', 'llama', 'mixtral', 'qwen3_moe']" in capsys.readouterr().err
    assert convert_main(["--from", "moetron", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "out")]) == 1
    assert "config.yaml is missing" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    argv = ["--from", "hf", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path)]
    command = [sys.executable, "-m", "moetron.convert", *argv]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "does not exist" in result.stderr
