"""ModelConfig: the typed description of a moetron transformer, its validation and its presets.

One dataclass covers every architecture moetron builds: dense Llama-style models, Mixtral- and
Qwen3-style MoE with GQA, and DeepSeek-V3-style MoE with MLA, shared experts, auxiliary-loss-free
balancing and multi-token prediction. `validate()` runs on construction, so an inconsistent config
fails before any module (or process group) exists, with a message that names the field.

Presets live in `configs/model/<name>.yaml` and load with `ModelConfig.from_preset(name)`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


@dataclass
class RopeScaling:
    """Context extension of rotary embeddings.

    type "yarn": YaRN (Peng et al. 2023, as in DeepSeek-V2/V3): frequencies between the
    `beta_fast`/`beta_slow` wavelength bounds are blended between interpolated and original, and
    attention logits are scaled by mscale(factor, mscale_all_dim)^2.
    type "llama3": Llama 3.1's piecewise frequency scaling (`low_freq_factor`, `high_freq_factor`).
    """

    type: str = "yarn"
    factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # YaRN cos/sin scale; None: derived from mscale(s)
    truncate: bool = True  # YaRN: round the correction range to whole dims
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass
class FP8Config:
    """FP8 training (DeepSeek-V3 section 3.3): the linear layers of attention and of the dense, shared
    and routed experts run their GEMMs in block-scaled e4m3 (`moetron.kernels.fp8_linear`); embedding,
    output head, router, norms, the MTP projection and the attention core stay in bf16/fp32.

    `layers` names the groups that run in FP8 (default: all of FP8_LAYER_GROUPS): `attention` (its
    projections), `dense_ffn` (the SwiGLU of the dense layers), `shared_experts`, `routed_experts`, and
    `mtp` (those groups inside the multi-token-prediction blocks too). A group left out stays in bf16:
    to trade speed for accuracy, or to find which layers an FP8 run's loss gap comes from."""

    enabled: bool = False
    pow2_scales: bool = False  # round scales up to powers of two (DeepSeek's UE8M0): exact rescaling
    # Quantize each weight once while it is unchanged, not in every micro-batch's forward and recomputation
    # (moetron.kernels.fp8_linear.FP8WeightCache); the trainer empties the caches once a step's micro-batches are done.
    # Off by default: on deepseek_v3_mini with full checkpointing it changed tokens/s by less than the
    # run-to-run spread and held 4.8 GB more (bench/results/train_step_sync_free_and_fp8_weight_cache.json).
    cache_weights: bool = False
    # A gated FFN's SwiGLU writes FP8 for its down projection directly (moetron.kernels.fp8_swiglu): h =
    # silu(gate) * up is quantized where it is computed, never stored in bf16. Off: the unfused path (silu, the
    # product and the down projection's own quantizer). GPU-tested on the H100 (sha afd7dc9); on the mini preset's
    # 4-block fwd+bwd it gave 1.06x (bench/results/fp8_fusions.json).
    fuse_swiglu: bool = True
    # An RMSNorm whose output only FP8 projections read (a block's pre-norms before the attention and a dense FFN,
    # MLA's latent norms before q_b and kv_b) writes their FP8 input directly (moetron.kernels.fp8_norm); off:
    # the norm, then the projections' own quantizer. GPU-tested as fuse_swiglu; 1.13x on the same model section.
    fuse_norm: bool = True
    layers: list[str] = field(default_factory=lambda: list(FP8_LAYER_GROUPS))

    def group(self, name: str) -> FP8Config | None:
        """This config if the layers of group `name` run in FP8, else None (what make_linear takes)."""
        return self if self.enabled and name in self.layers else None


FP8_LAYER_GROUPS = ("attention", "dense_ffn", "shared_experts", "routed_experts", "mtp")
FP8_BLOCK = 128  # FP8 GEMMs reduce over 128-wide scaled blocks (moetron.kernels.fp8.SCALE_BLOCK)


@dataclass
class ModelConfig:
    # --- sizes
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 4
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    # --- attention: "gqa" (covers MHA and MQA through n_kv_heads) or "mla" (DeepSeek-V2/V3)
    attention: str = "gqa"
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    attention_bias: bool = False  # biases on the q/k/v/o projections (Llama's and Qwen3's attention_bias)
    qk_norm: bool = False  # RMSNorm on each head of q and k before RoPE (Qwen3)
    attention_backend: str | None = None  # flash_attention backend: None (best for the inputs), torch, sdpa, triton
    # MLA only
    q_lora_rank: int | None = None  # None or 0: queries projected directly from d_model
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # --- rotary embeddings
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None

    # --- feed-forward
    ffn_hidden: int = 1408  # dense SwiGLU width (dense layers and first_k_dense_replace layers)
    n_routed_experts: int = 0  # 0: every layer dense
    n_shared_experts: int = 0
    moe_ffn_hidden: int = 256  # width of one expert (shared experts are n_shared_experts times this)
    top_k: int = 2
    first_k_dense_replace: int = 0  # the first k layers stay dense (DeepSeek-V3: 3)
    score_func: str = "softmax"  # "softmax" (Mixtral, Qwen, DeepSeek-V2) or "sigmoid" (V3)
    norm_topk_prob: bool = True  # renormalize the top-k gate weights to sum to one
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts in n_group groups...
    topk_group: int = 1  # ...and a token's experts come from its best topk_group groups
    capacity_factor: float | None = None  # None: dropless; else tokens over capacity are dropped

    # --- load balancing
    bias_update_rate: float = 0.0  # aux-loss-free bias step (V3's gamma; 0 disables the bias)
    seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3's alpha)
    aux_loss_alpha: float = 0.0  # classic batch-wise auxiliary loss weight (Switch/GShard)

    # --- multi-token prediction (DeepSeek-V3 section 2.2)
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    # --- initialization
    init_std: float = 0.02
    scaled_init: bool = True  # output projections get std / sqrt(2 * n_layers)

    # --- numerics
    fp8: FP8Config = field(default_factory=FP8Config)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.fp8, dict):
            self.fp8 = FP8Config(**self.fp8)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        """Head dim of queries and keys (MLA: nope + rope parts)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Number of dims per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        # YaRN's temperature on the logits, as DeepSeek applies it (GQA models take YaRN through cos/sin only).
        if self.attention == "mla" and rs is not None and rs.type == "yarn" and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                fail(f"{name}={getattr(self, name)} must be a positive integer")
        if self.attention_backend not in (None, "torch", "sdpa", "triton"):
            fail(f"attention_backend={self.attention_backend!r} must be one of None, 'torch', 'sdpa', 'triton'")
        if self.attention not in ("gqa", "mla"):
            fail(f"attention={self.attention!r} must be one of 'gqa', 'mla'")
        if self.attention == "gqa":
            if self.n_heads % self.n_kv_heads:
                fail(
                    f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
                    f"(valid n_kv_heads: {_divisors(self.n_heads)})"
                )
            if self.head_dim <= 0 or self.head_dim % 2:
                fail(f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        else:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    fail(f"{name}={getattr(self, name)} must be positive for attention='mla'")
            if self.qk_rope_head_dim % 2:
                fail(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
            if self.q_lora_rank is not None and self.q_lora_rank < 0:
                fail(f"q_lora_rank={self.q_lora_rank} must be None/0 (no compression) or positive")
            if self.qk_norm or self.attention_bias:
                fail("qk_norm and attention_bias apply to attention='gqa' only")
        if self.ffn_hidden <= 0:
            fail(f"ffn_hidden={self.ffn_hidden} must be positive")
        if self.norm_eps <= 0 or self.init_std <= 0:
            fail("norm_eps and init_std must be positive")
        self._validate_moe(fail)
        self._validate_rope(fail)
        if self.mtp_depth < 0:
            fail(f"mtp_depth={self.mtp_depth} must be >= 0 (0 disables multi-token prediction)")
        if self.mtp_loss_weight < 0:
            fail(f"mtp_loss_weight={self.mtp_loss_weight} must be >= 0")
        self._validate_fp8(fail)

    def _validate_moe(self, fail) -> None:
        if self.n_routed_experts < 0:
            fail(f"n_routed_experts={self.n_routed_experts} must be >= 0 (0: dense model)")
        if not self.is_moe:
            return
        if not 1 <= self.top_k <= self.n_routed_experts:
            fail(f"top_k={self.top_k} must be in [1, n_routed_experts={self.n_routed_experts}]")
        if self.score_func not in ("softmax", "sigmoid"):
            fail(f"score_func={self.score_func!r} must be one of 'softmax', 'sigmoid'")
        if self.moe_ffn_hidden <= 0 or self.n_shared_experts < 0:
            fail("moe_ffn_hidden must be positive and n_shared_experts >= 0")
        if not 0 <= self.first_k_dense_replace <= self.n_layers:
            fail(f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, n_layers={self.n_layers}]")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            fail(
                f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts} "
                f"(valid: {_divisors(self.n_routed_experts)})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            fail(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_group * per_group < self.top_k:
            fail(
                f"top_k={self.top_k} exceeds the experts reachable in topk_group={self.topk_group} groups "
                f"of {per_group}; raise topk_group or lower top_k"
            )
        if self.n_group > 1 and per_group < 2:
            fail(
                f"group-limited routing scores a group by its top-2 experts: n_routed_experts/n_group={per_group} must be >= 2"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail(f"capacity_factor={self.capacity_factor} must be positive, or None for dropless routing")
        for name in ("bias_update_rate", "seq_aux_loss_alpha", "aux_loss_alpha", "routed_scaling_factor"):
            if getattr(self, name) < 0:
                fail(f"{name}={getattr(self, name)} must be >= 0")

    def fp8_reduction_dims(self) -> dict[str, int]:
        """The in_features of every layer that runs in FP8 (the groups in fp8.layers), keyed by the field(s)
        that set them."""
        groups = set(self.fp8.layers)
        dims = {}
        if "attention" in groups:
            dims["d_model"] = self.d_model  # q/k/v or q/q_a/kv_a
            if self.attention == "mla":
                dims["n_heads*v_head_dim"] = self.n_heads * self.v_head_dim  # o_proj
                dims["kv_lora_rank"] = self.kv_lora_rank  # kv_b_proj
                if self.q_lora_rank is not None:
                    dims["q_lora_rank"] = self.q_lora_rank  # q_b_proj
            else:
                dims["n_heads*head_dim"] = self.n_heads * self.head_dim  # o_proj
        if "dense_ffn" in groups and (not self.is_moe or self.first_k_dense_replace > 0):
            dims["d_model"] = self.d_model  # gate/up
            dims["ffn_hidden"] = self.ffn_hidden  # down_proj
        if self.is_moe and ("routed_experts" in groups or ("shared_experts" in groups and self.n_shared_experts)):
            # routed experts' down_proj (and, through their grouped GEMMs, gate/up's out_features);
            # shared experts are n_shared_experts times as wide, so they follow.
            dims["d_model"] = self.d_model
            dims["moe_ffn_hidden"] = self.moe_ffn_hidden
        return dims

    def _validate_fp8(self, fail) -> None:
        if not isinstance(self.fp8, FP8Config):
            fail(f"fp8={self.fp8!r} must be an FP8Config (or a mapping with enabled, pow2_scales, layers)")
        unknown = [g for g in self.fp8.layers if g not in FP8_LAYER_GROUPS]
        if unknown:
            fail(f"fp8.layers={list(self.fp8.layers)}: unknown {unknown}; valid groups: {list(FP8_LAYER_GROUPS)}")
        if not self.fp8.enabled:
            return
        for name, dim in self.fp8_reduction_dims().items():
            if dim % FP8_BLOCK:
                below, above = dim // FP8_BLOCK * FP8_BLOCK, -(-dim // FP8_BLOCK) * FP8_BLOCK
                nearest = " or ".join(str(v) for v in (below, above) if v > 0)
                fail(
                    f"fp8.enabled=true needs {name}={dim} to be a multiple of {FP8_BLOCK} (FP8 GEMMs reduce over "
                    f"{FP8_BLOCK}-wide scaled blocks); nearest valid: {nearest}, or set fp8.enabled=false"
                )

    def _validate_rope(self, fail) -> None:
        if self.rope_theta <= 0:
            fail(f"rope_theta={self.rope_theta} must be positive")
        rs = self.rope_scaling
        if rs is None:
            return
        if rs.type not in ("yarn", "llama3"):
            fail(f"rope_scaling.type={rs.type!r} must be one of 'yarn', 'llama3' (or rope_scaling: null)")
        if rs.factor < 1:
            fail(f"rope_scaling.factor={rs.factor} must be >= 1")
        if rs.original_max_seq_len <= 0:
            fail(f"rope_scaling.original_max_seq_len={rs.original_max_seq_len} must be positive")
        if rs.type == "llama3" and not rs.high_freq_factor > rs.low_freq_factor:
            fail("rope_scaling.high_freq_factor must exceed low_freq_factor for type 'llama3'")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ModelConfig:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of ModelConfig fields, got {type(d).__name__}")
        d.pop("_target_", None)
        return cls.from_dict({**d, **overrides})

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise ValueError(f"unknown model preset {name!r}; available: {list_presets()}")
        return cls.from_yaml(path, **overrides)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


__all__ = ["FP8Config", "FP8_LAYER_GROUPS", "ModelConfig", "RopeScaling", "list_presets", "yarn_mscale"]
