"""Hugging Face checkpoint import and export for DeepseekV3, Mixtral, Qwen3-MoE and Llama.

Three layers, each usable alone:

* configs (in `hf_config.py`, re-exported here): `config_from_hf(config.json dict) -> ModelConfig`,
  `config_to_hf(cfg, architecture) -> dict`. A field moetron cannot represent raises ValueError naming it.
* weights: `state_dict_from_hf` / `state_dict_to_hf`, pure functions between dicts of tensors
  (HF names <-> moetron names), exact inverses of each other on HF's split layout.
* files: `from_hf(dir) -> Transformer` and `to_hf(model, dir)`, through safetensors only. `to_hf`
  writes one `model.safetensors`, or above `max_shard_bytes` (5 GiB) HF-style shards with an index.

Layouts. Export writes what hub checkpoints hold: one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`, Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight`);
transformers 5 fuses them on load. Import also takes the fused in-memory layouts of transformers 5
(`experts.gate_up_proj` (E, 2I, d) with gate rows first, `experts.down_proj` (E, d, I)), a fused
dense `mlp.gate_up_proj`, and a Phi-3 style `self_attn.qkv_proj` (q | k | v rows).

RoPE. moetron rotates the pairs (i, i + d/2) of each head, as HF Llama, Mixtral and Qwen3 do. DeepSeek
stores its rotary rows interleaved, pairs (0, 1), (2, 3), ... (HF's `rope_interleave: true`, the
default), so import reorders the rotary rows of q_proj / q_b_proj (per head) and kv_a_proj_with_mqa
by [0, 2, 4, ..., 1, 3, 5, ...] and export undoes it.

DeepSeek multi-token prediction: depth k sits at `model.layers.{n_layers + k}` (DeepSeek's layout:
`enorm`, `hnorm`, `eh_proj`, the usual block, `shared_head.norm`, plus copies of the embedding and head
that import skips and export writes). `mtp_depth` is taken from `num_nextn_predict_layers` only when
those weights are in the checkpoint (HF's own DeepSeek model has no MTP and its saves drop them).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from moetron.model.config import ModelConfig
from moetron.model.hf_config import (
    ARCHITECTURES,
    _check_expressible,
    config_from_hf,
    config_to_hf,
    infer_architecture,
    model_type_of,
)
from moetron.model.io import (
    DEFAULT_MAX_SHARD_BYTES,
    dtype_name,
    model_from_state_dict,
    parse_dtype,
    read_safetensors_dir,
    write_safetensors_dir,
)
from moetron.model.transformer import Transformer

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "infer_architecture",
    "model_type_of",
    "read_hf_config",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf",
]


# ====================================================================== weight names
def _attention_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(moetron, HF) names of one attention layer, relative to the block."""
    if cfg.attention == "mla":
        if cfg.q_lora_rank is None:
            pairs = [("attn.q_proj.weight", "self_attn.q_proj.weight")]
        else:
            pairs = [
                ("attn.q_a_proj.weight", "self_attn.q_a_proj.weight"),
                ("attn.q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
                ("attn.q_b_proj.weight", "self_attn.q_b_proj.weight"),
            ]
        return pairs + [
            ("attn.kv_a_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
            ("attn.kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
            ("attn.kv_b_proj.weight", "self_attn.kv_b_proj.weight"),
            ("attn.o_proj.weight", "self_attn.o_proj.weight"),
        ]
    pairs = [(f"attn.{p}.weight", f"self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if cfg.attention_bias:
        pairs += [(f"attn.{p}.bias", f"self_attn.{p}.bias") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if cfg.qk_norm:
        pairs += [("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight")]
    return pairs


def _moe_prefix(arch: str) -> str:
    return "block_sparse_moe" if arch == "mixtral" else "mlp"


def _expert_names(arch: str, hf_moe: str, e: int) -> tuple[str, str, str]:
    """HF names of expert e's (gate, up, down) weights."""
    if arch == "mixtral":
        return tuple(f"{hf_moe}.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
    return tuple(f"{hf_moe}.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))


def _block_pairs(cfg: ModelConfig, arch: str, layer_idx: int, mt: str, hf: str) -> list[tuple[str, str]]:
    """(moetron, HF) names of every tensor of one block that maps one to one (not the experts)."""
    pairs = [("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight")]
    pairs += _attention_pairs(cfg)
    if cfg.is_moe_layer(layer_idx):
        moe = _moe_prefix(arch)
        pairs.append(("ffn.router.weight", f"{moe}.gate.weight"))
        if arch == "deepseek_v3":
            pairs.append(("ffn.router.expert_bias", f"{moe}.gate.e_score_correction_bias"))
        if cfg.n_shared_experts:
            pairs += [
                (f"ffn.shared_experts.{p}.weight", f"{moe}.shared_experts.{p}.weight")
                for p in ("gate_proj", "up_proj", "down_proj")
            ]
    else:
        pairs += [(f"ffn.{p}.weight", f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
    return [(f"{mt}.{a}", f"{hf}.{b}") for a, b in pairs]


def _blocks(cfg: ModelConfig, arch: str) -> list[tuple[int, str, str]]:
    """(layer index, moetron prefix, HF prefix) of every block, MTP blocks included (DeepSeek only)."""
    blocks = [(i, f"layers.{i}", f"model.layers.{i}") for i in range(cfg.n_layers)]
    if arch == "deepseek_v3":
        blocks += [
            (cfg.n_layers + k, f"mtp.{k}.block", f"model.layers.{cfg.n_layers + k}") for k in range(cfg.mtp_depth)
        ]
    return blocks


def _name_pairs(cfg: ModelConfig, arch: str) -> list[tuple[str, str]]:
    """(moetron, HF) names of every tensor that maps one to one."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for layer_idx, mt, hf in _blocks(cfg, arch):
        pairs += _block_pairs(cfg, arch, layer_idx, mt, hf)
    if arch == "deepseek_v3":
        for k in range(cfg.mtp_depth):
            hf = f"model.layers.{cfg.n_layers + k}"
            pairs += [
                (f"mtp.{k}.embed_norm.weight", f"{hf}.enorm.weight"),
                (f"mtp.{k}.hidden_norm.weight", f"{hf}.hnorm.weight"),
                (f"mtp.{k}.proj.weight", f"{hf}.eh_proj.weight"),
                (f"mtp.{k}.norm.weight", f"{hf}.shared_head.norm.weight"),
            ]
    return pairs


def _expert_blocks(cfg: ModelConfig, arch: str) -> list[tuple[str, str]]:
    """(moetron MoE prefix, HF MoE prefix) of every MoE layer."""
    return [(f"{mt}.ffn", f"{hf}.{_moe_prefix(arch)}") for i, mt, hf in _blocks(cfg, arch) if cfg.is_moe_layer(i)]


def _rope_rows(cfg: ModelConfig, arch: str, rope_interleave: bool) -> dict[str, tuple[int, int]]:
    """moetron names of the projections with DeepSeek's interleaved rotary rows -> (heads, rows per head)
    of the view whose last qk_rope_head_dim rows are rotary."""
    if arch != "deepseek_v3" or cfg.attention != "mla" or not rope_interleave:
        return {}
    q = "attn.q_proj.weight" if cfg.q_lora_rank is None else "attn.q_b_proj.weight"
    rows = {}
    for _, mt, _ in _blocks(cfg, arch):
        rows[f"{mt}.{q}"] = (cfg.n_heads, cfg.qk_head_dim)
        rows[f"{mt}.attn.kv_a_proj.weight"] = (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # [c_kv | k_pe]
    return rows


def _permute_rope_rows(
    name: str, weight: torch.Tensor, heads: int, head_rows: int, rope_dim: int, perm: torch.Tensor
) -> torch.Tensor:
    """Reorder the last rope_dim rows of each of `heads` row blocks of weight (heads * head_rows, in)."""
    if weight.dim() != 2 or weight.shape[0] != heads * head_rows:
        raise ValueError(f"{name} has shape {tuple(weight.shape)}; the config implies {heads * head_rows} rows")
    w = weight.reshape(heads, head_rows, -1)  # (heads, nope + rope, in)
    nope = head_rows - rope_dim
    return torch.cat([w[:, :nope], w[:, nope:][:, perm]], dim=1).reshape(weight.shape)


def _deinterleave(rope_dim: int) -> torch.Tensor:
    """[0, 2, 4, ..., 1, 3, 5, ...]: rows of pairs (2i, 2i+1) -> rows of pairs (i, i + rope_dim/2)."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


# ====================================================================== weights
def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, architecture: str, rope_interleave: bool = True
) -> dict[str, torch.Tensor]:
    """moetron state dict (names of `Transformer.state_dict()`) of HF tensors. Accepts the split
    (hub) and fused (transformers 5 in-memory) layouts. `rope_interleave` is DeepSeek's config flag.
    Skips rotary tables, DeepSeek's MTP embedding/head copies, DeepSeek layers past the imported MTP
    depth, and lm_head.weight when tied. Raises ValueError naming a missing tensor or the tensors
    it does not know."""
    arch = architecture
    hf = _split_fused(hf_state, cfg, arch)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"{arch} checkpoint is missing weight {name!r}")
        used.add(name)
        return hf[name]

    state = {mt: take(name) for mt, name in _name_pairs(cfg, arch)}
    for mt, hf_moe in _expert_blocks(cfg, arch):
        names = [_expert_names(arch, hf_moe, e) for e in range(cfg.n_routed_experts)]
        for j, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
            state[f"{mt}.experts.{proj}"] = torch.stack([take(n[j]) for n in names])  # (E, I, d) or (E, d, I)
        if arch != "deepseek_v3":  # no selection bias in Mixtral / Qwen3: route on the scores alone
            state[f"{mt}.router.expert_bias"] = torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
    perm = _deinterleave(cfg.qk_rope_head_dim)
    for mt, (heads, rows) in _rope_rows(cfg, arch, rope_interleave).items():
        state[mt] = _permute_rope_rows(mt, state[mt], heads, rows, cfg.qk_rope_head_dim, perm)

    unexpected = sorted(n for n in set(hf) - used if not _skippable(n, cfg, arch))
    if unexpected:
        raise ValueError(f"{arch} checkpoint has tensors moetron does not know: {unexpected[:12]}")
    return state


def _skippable(name: str, cfg: ModelConfig, arch: str) -> bool:
    if "rotary_emb." in name or (cfg.tie_embeddings and name == "lm_head.weight"):
        return True
    if arch == "deepseek_v3" and name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        if layer >= cfg.n_layers + cfg.mtp_depth:  # MTP depths not imported
            return True
        if layer >= cfg.n_layers:  # MTP's copies of the shared embedding and head
            return name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))
    return False


def _split_fused(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors in the split hub layout: fused q|k|v, gate|up and 3-D expert tensors are cut apart,
    and transformers 5's Mixtral names (`mlp.gate`, `mlp.experts`) go back to `block_sparse_moe`."""
    out = {}
    for name, tensor in hf_state.items():
        if arch == "mixtral":
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(
                ".mlp.experts.", ".block_sparse_moe.experts."
            )
        prefix, _, leaf = name.rpartition(".")
        if name.endswith((".self_attn.qkv_proj.weight", ".self_attn.qkv_proj.bias")) and cfg.attention == "gqa":
            base = prefix.removesuffix("qkv_proj")
            q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            _check_rows(name, tensor, 0, q_rows + 2 * kv_rows)
            for proj, part in zip(
                ("q_proj", "k_proj", "v_proj"), tensor.split([q_rows, kv_rows, kv_rows]), strict=True
            ):
                out[f"{base}{proj}.{leaf}"] = part
        elif name.endswith(".mlp.gate_up_proj.weight"):  # dense (2 * I, d): gate rows, then up rows
            _check_rows(name, tensor, 0, 2 * cfg.ffn_hidden)
            gate, up = tensor.chunk(2, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        elif name.endswith(".experts.gate_up_proj"):  # (E, 2 * I, d): gate rows, then up rows
            _check_rows(name, tensor, 1, 2 * cfg.moe_ffn_hidden)
            hf_moe = name.removesuffix(".experts.gate_up_proj")
            for e, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1), strict=True)):
                gate_name, up_name, _ = _expert_names(arch, hf_moe, e)
                out[gate_name], out[up_name] = gate, up
        elif name.endswith(".experts.down_proj"):  # (E, d, I)
            hf_moe = name.removesuffix(".experts.down_proj")
            for e, down in enumerate(tensor):
                out[_expert_names(arch, hf_moe, e)[2]] = down
        else:
            out[name] = tensor
    return out


def _check_rows(name: str, tensor: torch.Tensor, dim: int, expected: int) -> None:
    if tensor.dim() <= dim or tensor.shape[dim] != expected:
        raise ValueError(f"fused {name} has shape {tuple(tensor.shape)}; expected {expected} along dim {dim}")


def state_dict_to_hf(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, architecture: str | None = None, rope_interleave: bool = True
) -> dict[str, torch.Tensor]:
    """HF tensors (split hub layout) of a moetron state dict; the inverse of `state_dict_from_hf`.
    MTP depths go only to deepseek_v3 (elsewhere they are dropped with a warning: they do not change
    the main model's logits); a nonzero expert_bias cannot go to Mixtral/Qwen3 (it changes routing)."""
    arch = architecture or infer_architecture(cfg)
    _check_expressible(cfg, arch)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"moetron state dict is missing {name!r}")
        used.add(name)
        return state[name]

    perm = torch.argsort(_deinterleave(cfg.qk_rope_head_dim))  # interleave again
    rope_rows = _rope_rows(cfg, arch, rope_interleave)
    out = {}
    for mt, name in _name_pairs(cfg, arch):
        tensor = take(mt)
        if mt in rope_rows:
            tensor = _permute_rope_rows(mt, tensor, *rope_rows[mt], cfg.qk_rope_head_dim, perm)
        out[name] = tensor
    for mt, hf_moe in _expert_blocks(cfg, arch):
        stacked = [take(f"{mt}.experts.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
        for e in range(cfg.n_routed_experts):
            for name, weights in zip(_expert_names(arch, hf_moe, e), stacked, strict=True):
                out[name] = weights[e]
        if arch != "deepseek_v3":
            bias = take(f"{mt}.router.expert_bias")
            if bias.any():
                raise ValueError(
                    f"cannot export to {arch}: {mt}.router.expert_bias is nonzero (max |b| = "
                    f"{bias.abs().max().item():.3g}) and {arch} has no selection bias; export to deepseek_v3"
                )
    if arch == "deepseek_v3":  # DeepSeek's MTP layers carry their own copies of embedding and head
        head = state["embed.weight"] if cfg.tie_embeddings else state["lm_head.weight"]
        for k in range(cfg.mtp_depth):
            out[f"model.layers.{cfg.n_layers + k}.embed_tokens.weight"] = state["embed.weight"]
            out[f"model.layers.{cfg.n_layers + k}.shared_head.head.weight"] = head

    left = sorted(set(state) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    dropped_mtp = [n for n in left if n.startswith("mtp.")]
    if dropped_mtp:
        warnings.warn(
            f"{arch} has no multi-token prediction: dropping mtp_depth={cfg.mtp_depth} ({len(dropped_mtp)} tensors)",
            stacklevel=2,
        )
    unknown = [n for n in left if not n.startswith("mtp.")]
    if unknown:
        raise ValueError(f"moetron state dict has tensors the {arch} export does not know: {unknown[:12]}")
    return out


# ====================================================================== files
def from_hf(
    path: str | Path, dtype: str | torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Transformer (eval mode) from a HF checkpoint directory: config.json + model.safetensors, or
    shards listed by model.safetensors.index.json. `dtype` None keeps the stored dtypes."""
    path = Path(path)
    hf_config = read_hf_config(path)
    arch = model_type_of(hf_config)
    tensors = read_safetensors_dir(path)
    cfg = config_from_hf(hf_config, weight_names=tensors.keys())
    state = state_dict_from_hf(tensors, cfg, arch, rope_interleave=bool(hf_config.get("rope_interleave", True)))
    return model_from_state_dict(cfg, state, parse_dtype(dtype), device).eval()


def read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it a Hugging Face checkpoint directory?")
    return json.loads((path / "config.json").read_text())


def to_hf(
    model: Transformer,
    path: str | Path,
    architecture: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> dict:
    """Write `model` as a HF checkpoint directory: config.json + model.safetensors, sharded with an
    index above `max_shard_bytes` (None: never). `architecture` None: `infer_architecture`. `dtype`
    None: the model's parameter dtype; DeepSeek's e_score_correction_bias stays fp32 (as HF keeps it).
    Returns the config.json dict."""
    cfg = model.cfg
    arch = architecture or infer_architecture(cfg)
    hf_config = config_to_hf(cfg, arch)
    state = {name: t.detach() for name, t in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise ValueError("to_hf: the model is still on the meta device; materialize or load it first")
    target = parse_dtype(dtype) or model.embed.weight.dtype
    tensors = {
        name: t if name.endswith("e_score_correction_bias") or not t.is_floating_point() else t.to(target)
        for name, t in state_dict_to_hf(state, cfg, arch).items()
    }
    hf_config["dtype"] = dtype_name(target)  # transformers 5's key; 4.x read torch_dtype
    hf_config["torch_dtype"] = dtype_name(target)
    path = Path(path)
    write_safetensors_dir(tensors, path, max_shard_bytes)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return hf_config
