"""The model with `fp8.enabled`: which layers run in FP8, loss and gradients against the same weights in
fp32, identical state dicts, the 128-aligned MoE dispatch, config validation and Hydra composition.
On CPU the FP8 kernels run as their torch references."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from moetron.config import ConfigError, register_configs, to_train_config, validate
from moetron.kernels.fp8_linear import FP8_GEMM_RELATIVE_ERROR, FP8Linear
from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8_LAYER_GROUPS, FP8Config
from moetron.model.moe import MoE

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")

# Every FP8 reduction dim is 128; tokens 2 * 64 = 128. kv heads 1 x 64 and MLA's kv_a (128 + 16) and
# q_b (2 x 48) outputs are not multiples of 128 (the padded dgrad).
BASE = dict(
    vocab_size=256,
    d_model=128,
    n_layers=2,
    max_seq_len=128,
    n_heads=2,
    n_kv_heads=1,
    ffn_hidden=256,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_ffn_hidden=128,
    top_k=2,
    first_k_dense_replace=1,
    mtp_depth=1,
    seq_aux_loss_alpha=1e-3,
)
MLA = dict(attention="mla", q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=64)
ARCHS = {"gqa": dict(attention_bias=True), "mla": MLA}

# What DeepSeek-V3 (section 3.3.1) keeps in higher precision: embedding, output head, router, norms, the
# MTP projection (and the attention core, which is not an nn.Linear).
HIGH_PRECISION_LINEARS = ("lm_head", "mtp.0.proj")
FP8_LINEAR_PARTS = (".attn.", ".ffn.gate_proj", ".ffn.up_proj", ".ffn.down_proj", ".shared_experts.")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp32_and_fp8(arch, **overrides):
    cfg = dict(BASE, **ARCHS[arch], **overrides)
    ref = Transformer(ModelConfig(**cfg))
    fp8 = Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=True)))
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fp8_model_matches_fp32_model_with_the_same_weights(arch):
    ref, fp8 = fp32_and_fp8(arch)
    ids = torch.randint(0, BASE["vocab_size"], (2, 65))
    out_ref, grads_ref = loss_and_grads(ref, ids)
    out, grads = loss_and_grads(fp8, ids)
    for part in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
        got, want = getattr(out, part).item(), getattr(out_ref, part).item()
        assert abs(got - want) < 0.01 * abs(want), part  # measured: ~2e-4 relative
    assert out.loss.item() != out_ref.loss.item()  # FP8 did run

    # Gradients: a parameter's gradient passes through a few FP8 GEMMs (forward and backward), each
    # adding ~FP8_GEMM_RELATIVE_ERROR in quadrature (measured 3-11%). Routed experts and the router see
    # additionally the tokens whose top-k choice flipped under the perturbed activations.
    routed = (".experts.", ".router.")
    for name, g in grads.items():
        bound = 0.6 if any(r in name for r in routed) else 4 * FP8_GEMM_RELATIVE_ERROR
        assert rel_err(g, grads_ref[name]) < bound, name
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_ref = torch.cat([grads_ref[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.99


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_sibling_projections_run_as_one_fp8_gemm(monkeypatch, arch):
    """The FP8 layers that read the same input run as one GEMM each (project_together: MLA's q_a + kv_a, GQA's q,
    k, v, every SwiGLU's gate + up): two or three fewer GEMMs per block in each direction, and the loss and
    gradients of the model that calls them one by one up to fp32 rounding (their FP8 bytes are the same)."""
    import moetron.kernels.fp8_linear as fl
    import moetron.kernels.fp8_norm as fn
    import moetron.kernels.fp8_swiglu as fs
    import moetron.model.layers as layers

    cfg = dict(BASE, **MLA) if arch == "mla" else dict(BASE, attention_bias=False, n_kv_heads=2)  # (k, v: 128)
    fp8 = Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=True)))
    ids = torch.randint(0, BASE["vocab_size"], (2, 65))
    gemms = []
    for module in (fl, fn, fs):  # (the fused norm and SwiGLU layers call the GEMM from their own modules)
        monkeypatch.setattr(
            module, "fp8_gemm", lambda *a, _gemm=module.fp8_gemm, **k: gemms.append(1) or _gemm(*a, **k)
        )
    runs = {}
    for together in (True, False):
        if not together:
            monkeypatch.setattr(layers, "shares_input", lambda *layers: False)
        gemms.clear()
        out, grads = loss_and_grads(fp8, ids)
        runs[together] = (out, grads, len(gemms))
    (out, grads, n_gemms), (out_alone, grads_alone, n_alone) = runs[True], runs[False]
    blocks = BASE["n_layers"] + BASE["mtp_depth"]
    dense = BASE["first_k_dense_replace"]  # a SwiGLU FFN; the others' shared expert is one
    saved_per_direction = blocks * (2 if arch == "gqa" else 1) + dense + (blocks - dense)
    assert n_alone - n_gemms == 3 * saved_per_direction  # forward, dX and dW
    assert abs(out.loss.item() - out_alone.loss.item()) < 1e-4 * out_alone.loss.item()
    for name, g in grads.items():
        assert rel_err(g, grads_alone[name]) < 1e-3, name


def test_moe_layer_in_fp8_within_the_bound_of_two_gemms():
    """With the same input the routing is identical, so the FP8 MoE differs from the fp32 one only by
    its GEMMs: gate/up then down (two in series on the routed path), shared experts likewise."""
    cfg = dict(BASE, score_func="sigmoid", n_routed_experts=8, top_k=3)
    ref = MoE(ModelConfig(**cfg))
    fp8 = MoE(ModelConfig(**cfg, fp8=FP8Config(enabled=True)))
    for p in ref.parameters():
        nn.init.normal_(p, std=0.05)
    fp8.load_state_dict(ref.state_dict())
    x = torch.randn(2, 100, 128)
    dy = torch.randn(2, 100, 128)
    outs = []
    for m in (ref, fp8):
        xm = x.clone().requires_grad_()
        y, _ = m(xm)
        y.backward(dy)
        outs.append((y, xm.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y_ref, dx_ref, g_ref), (y, dx, g) = outs
    bound = 2**0.5 * FP8_GEMM_RELATIVE_ERROR  # two GEMMs in series
    assert 0.2 * FP8_GEMM_RELATIVE_ERROR < rel_err(y, y_ref) < bound
    assert rel_err(dx, dx_ref) < 2 * bound  # dX of the routed path plus the router's fp32 path
    for name in ("experts.gate_proj", "experts.up_proj", "experts.down_proj", "shared_experts.up_proj.weight"):
        assert rel_err(g[name], g_ref[name]) < bound, name


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fp8_modules_are_the_right_ones(arch):
    _, model = fp32_and_fp8(arch)
    fp8_names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            wants_fp8 = any(part in f".{name}" for part in FP8_LINEAR_PARTS)
            assert isinstance(module, FP8Linear) == wants_fp8, name
            assert not (wants_fp8 and name.startswith(HIGH_PRECISION_LINEARS))
            if wants_fp8:
                fp8_names.append(name)
        if name.endswith(".experts"):
            assert module.fp8, name
        if name.endswith(".ffn") and isinstance(module, MoE):
            assert module.pad_groups_to == 128
    for name in HIGH_PRECISION_LINEARS:
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert type(model.embed) is nn.Embedding
    assert not isinstance(model.get_submodule("layers.1.ffn.router"), nn.Linear)
    attn = {"gqa": ("q_proj", "k_proj", "v_proj"), "mla": ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")}[arch]
    for proj in attn + ("o_proj",):
        assert f"layers.0.attn.{proj}" in fp8_names and f"mtp.0.block.attn.{proj}" in fp8_names
    assert "layers.0.ffn.down_proj" in fp8_names and "layers.1.ffn.shared_experts.gate_proj" in fp8_names
    # The bf16 model has none of it.
    ref = Transformer(ModelConfig(**BASE, **ARCHS[arch]))
    assert not any(isinstance(m, FP8Linear) for m in ref.modules())
    assert not any(getattr(m, "fp8", False) for m in ref.modules()) and all(
        m.pad_groups_to == 1 for m in ref.modules() if isinstance(m, MoE)
    )


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fp8_state_dict_is_the_plain_models(arch):
    ref, fp8 = fp32_and_fp8(arch)
    sd_ref, sd = ref.state_dict(), fp8.state_dict()
    assert list(sd) == list(sd_ref)
    assert all(sd[k].shape == sd_ref[k].shape and sd[k].dtype == sd_ref[k].dtype for k in sd)
    ref.load_state_dict(fp8.state_dict())  # both directions, strict
    # Built on the meta device and initialized like the plain model.
    models = []
    for fp8_cfg in (FP8Config(enabled=True, pow2_scales=True), FP8Config()):
        with torch.device("meta"):
            model = Transformer(ModelConfig(**BASE, **ARCHS[arch], fp8=fp8_cfg))
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        models.append(model)
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), name
    assert all(m.pow2_scales for m in models[0].modules() if isinstance(m, FP8Linear))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padded_dispatch_equals_unpadded(capacity_factor):
    """The 128-aligned dispatch of FP8 mode, run with the high-precision experts, gives the plain dispatch's
    output and gradients; each expert's rows start at a multiple of 128 and padding rows are zeros."""
    cfg = ModelConfig(**dict(BASE, n_routed_experts=8, top_k=2, capacity_factor=capacity_factor))
    moe = MoE(cfg)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    moe.router.expert_bias[:2] = -1.0  # experts 0 and 1 (almost) never chosen: empty groups
    x = torch.randn(3, 50, 128)
    dy = torch.randn(3, 50, 128)
    seen = []
    experts_forward = moe.experts.forward

    def spy(xs, group_ends):
        seen.append((xs.detach(), group_ends.clone()))
        return experts_forward(xs, group_ends)

    moe.experts.forward = spy
    results = []
    for multiple in (1, 128):
        moe.pad_groups_to = multiple
        moe.zero_grad()
        xm = x.clone().requires_grad_()
        y, _ = moe(xm)
        y.backward(dy)
        results.append((y, xm.grad, [p.grad.clone() for p in moe.parameters()]))
    (y1, dx1, g1), (y2, dx2, g2) = results
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-6)
    torch.testing.assert_close(dx2, dx1, rtol=0, atol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    (x_plain, ends_plain), (x_padded, ends_padded) = seen
    counts = torch.diff(ends_plain, prepend=ends_plain.new_zeros(1))
    assert (counts[:2] == 0).any()
    padded_counts = torch.diff(ends_padded.long(), prepend=ends_padded.new_zeros(1).long())
    assert torch.equal(padded_counts, (counts + 127) // 128 * 128)
    starts = ends_padded.long() - padded_counts
    assert bool((starts % 128 == 0).all())
    assert x_padded.shape[0] % 128 == 0 and x_padded.shape[0] >= x_plain.shape[0] + 8 * 127
    real = torch.zeros(x_padded.shape[0], dtype=torch.bool)
    for s, c in zip(starts.tolist(), counts.tolist()):
        real[s : s + c] = True
    assert torch.equal(x_padded[real], x_plain) and bool((x_padded[~real] == 0).all())


def fp8_group_of(name: str) -> str | None:
    """The FP8 layer group a module belongs to, by its name (None: never FP8)."""
    if name.startswith(HIGH_PRECISION_LINEARS) or ".router" in name:
        return None
    if ".attn." in name:
        return "attention"
    if ".shared_experts." in name:
        return "shared_experts"
    if name.endswith(".experts"):
        return "routed_experts"
    if ".ffn." in name:
        return "dense_ffn"
    return None


@pytest.mark.parametrize("arch", ["gqa", "mla"])
@pytest.mark.parametrize("layers", [[g] for g in FP8_LAYER_GROUPS] + [[g for g in FP8_LAYER_GROUPS if g != "mtp"]])
def test_fp8_layer_groups_choose_the_fp8_modules(arch, layers):
    """`fp8.layers` lists the groups in FP8; the rest stay nn.Linear / bf16 experts, MTP blocks only with `mtp`;
    parameters and state dicts do not change, and the MoE pads its groups only for FP8 experts."""
    ref, _ = fp32_and_fp8(arch)
    model = Transformer(ModelConfig(**BASE, **ARCHS[arch], fp8=FP8Config(enabled=True, layers=layers)))
    model.load_state_dict(ref.state_dict())  # same names and shapes
    seen = set()
    for name, module in model.named_modules():
        group = fp8_group_of(name)
        in_fp8 = lambda g: g in layers and (not name.startswith("mtp.") or "mtp" in layers)  # noqa: E731, B023
        wants = in_fp8(group)
        if isinstance(module, nn.Linear) and group is not None:
            assert isinstance(module, FP8Linear) == wants, name
            seen.add(group)
        if name.endswith(".experts"):
            assert module.fp8 == wants, name
            seen.add(group)
        if isinstance(module, MoE):
            assert module.pad_groups_to == (128 if in_fp8("routed_experts") else 1), name
    assert seen == {"attention", "dense_ffn", "shared_experts", "routed_experts"}  # every group was looked at


def test_fp8_layer_groups_loss_matches_bf16_where_off():
    """With only the routed experts in FP8, the attention projections are plain nn.Linear: a model with
    fp8.layers=[] equals the bf16 model exactly, and excluding groups moves the loss toward it."""
    ref, full = fp32_and_fp8("gqa")
    none = Transformer(ModelConfig(**BASE, **ARCHS["gqa"], fp8=FP8Config(enabled=True, layers=[])))
    experts = Transformer(ModelConfig(**BASE, **ARCHS["gqa"], fp8=FP8Config(enabled=True, layers=["routed_experts"])))
    for m in (none, experts):
        m.load_state_dict(ref.state_dict())
    ids = torch.randint(0, BASE["vocab_size"], (2, 65))
    loss = {
        n: m(ids[:, :-1], labels=ids[:, 1:]).loss.item()
        for n, m in dict(ref=ref, none=none, experts=experts, full=full).items()
    }
    assert loss["none"] == loss["ref"]
    assert loss["experts"] != loss["ref"] and loss["full"] != loss["experts"]
    assert abs(loss["experts"] - loss["ref"]) < 0.01 * loss["ref"]


def test_fp8_layers_validation():
    with pytest.raises(ValueError, match=r"fp8.layers=\['attention', 'ffn'\]: unknown \['ffn'\]; valid groups"):
        ModelConfig(**BASE, fp8=FP8Config(enabled=True, layers=["attention", "ffn"]))
    # only the dims of the groups in FP8 must be multiples of 128: bf16 attention may have any head dims
    odd_heads = dict(BASE, n_heads=2, head_dim=48)
    with pytest.raises(ValueError, match=r"n_heads\*head_dim=96"):
        ModelConfig(**odd_heads, fp8=FP8Config(enabled=True))
    ModelConfig(**odd_heads, fp8=FP8Config(enabled=True, layers=["dense_ffn", "shared_experts", "routed_experts"]))
    with pytest.raises(ValueError, match=r"moe_ffn_hidden=96"):
        ModelConfig(**dict(BASE, moe_ffn_hidden=96), fp8=FP8Config(enabled=True, layers=["routed_experts"]))
    ModelConfig(**dict(BASE, moe_ffn_hidden=96), fp8=FP8Config(enabled=True, layers=["attention", "dense_ffn"]))


BAD_FP8 = [
    (dict(d_model=64), r"fp8.enabled=true needs d_model=64 to be a multiple of 128.*nearest valid: 128"),
    (dict(ffn_hidden=200), r"ffn_hidden=200 to be a multiple of 128.*nearest valid: 128 or 256"),
    (dict(moe_ffn_hidden=96), r"moe_ffn_hidden=96 to be a multiple of 128"),
    (dict(n_heads=2, head_dim=48), r"n_heads\*head_dim=96 to be a multiple of 128"),
    (dict(MLA, v_head_dim=32), r"n_heads\*v_head_dim=64 to be a multiple of 128"),
    (dict(MLA, q_lora_rank=64), r"q_lora_rank=64 to be a multiple of 128"),
    (dict(MLA, kv_lora_rank=512 + 64), r"kv_lora_rank=576 to be a multiple of 128.*nearest valid: 512 or 640"),
]


@pytest.mark.parametrize("overrides,message", BAD_FP8)
def test_fp8_config_errors_name_the_field(overrides, message):
    cfg = {**BASE, **overrides}
    ModelConfig(**cfg)  # valid without FP8
    with pytest.raises(ValueError, match=message):
        ModelConfig(**cfg, fp8=FP8Config(enabled=True))


def test_fp8_config_checks_only_the_layers_that_exist():
    # ffn_hidden is unused when every layer is MoE; no q_lora_rank without query compression.
    ModelConfig(**dict(BASE, ffn_hidden=200, first_k_dense_replace=0), fp8={"enabled": True})
    ModelConfig(**{**BASE, **MLA, "q_lora_rank": None}, fp8={"enabled": True})
    # out_features need not be multiples of 128: DeepSeek-V3's kv_a_proj is 512 + 64 wide.
    cfg = ModelConfig.from_preset("deepseek_v3", fp8={"enabled": True})
    assert cfg.fp8 == FP8Config(enabled=True, pow2_scales=False)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # the nested dataclass round-trips


def test_hydra_composes_fp8():
    register_configs()
    fp8_tiny = ["model=tiny", "model.d_model=128", "model.ffn_hidden=256", "model.moe_ffn_hidden=128"]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = to_train_config(compose("train", [*fp8_tiny, "model.fp8.enabled=true", "model.fp8.pow2_scales=true"]))
        assert cfg.model.fp8 == FP8Config(enabled=True, pow2_scales=True)
        assert cfg.model == ModelConfig.from_preset(
            "tiny", d_model=128, ffn_hidden=256, moe_ffn_hidden=128, fp8={"enabled": True, "pow2_scales": True}
        )
        model = Transformer(cfg.model)
        assert isinstance(model.layers["0"].attn.q_proj, FP8Linear) and model.layers["0"].attn.q_proj.pow2_scales
        assert to_train_config(compose("train", ["model=tiny"])).model.fp8 == FP8Config()  # off by default
        layers = to_train_config(
            compose("train", [*fp8_tiny, "model.fp8.enabled=true", "model.fp8.layers=[attention]"])
        )
        assert layers.model.fp8.layers == ["attention"]
        with pytest.raises(ConfigError, match=r"model: .*fp8.layers=\['mlp'\]: unknown"):
            to_train_config(compose("train", [*fp8_tiny, "model.fp8.layers=[mlp]"]))
        with pytest.raises(ConfigError, match=r"model: .*fp8.enabled=true needs d_model=64 to be a multiple of 128"):
            to_train_config(compose("train", ["model=tiny", "model.fp8.enabled=true"]))


def test_fp8_run_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    """validate() refuses model.fp8.enabled on a CUDA GPU below compute capability 8.9 (the layers would run their
    fp32 torch references there), naming the field and the GPU; on sm_89/sm_90, with trainer.device=cpu, and with
    FP8 off it passes. The GPU is faked: the check reads only torch.cuda's answers."""
    register_configs()
    fp8_tiny = ["model=tiny", "model.d_model=128", "model.ffn_hidden=256", "model.moe_ffn_hidden=128"]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        fp8 = to_train_config(compose("train", [*fp8_tiny, "model.fp8.enabled=true"]))
        on_cpu = to_train_config(compose("train", [*fp8_tiny, "model.fp8.enabled=true", "trainer.device=cpu"]))
        bf16 = to_train_config(compose("train", fp8_tiny))
    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"model.fp8.enabled: true needs a GPU with FP8 tensor cores .*A100.* is 8.0"):
        validate(fp8)
    validate(on_cpu)
    validate(bf16)
    for capability[0] in [(8, 9), (9, 0)]:
        validate(fp8)


def test_training_run_in_fp8_with_bf16_autocast_and_checkpointing(tmp_path):
    """The trainer needs nothing FP8-specific: `model.fp8.enabled=true` trains (bf16 autocast, full
    activation checkpointing, which re-runs the FP8 forward, two micro-batches a step) with finite losses.
    With `model.fp8.cache_weights=true` the losses are the same bit for bit: every step quantizes the
    weights the optimizer just updated, never the previous step's."""
    import json

    from moetron.train import run

    losses = {}
    for cache in ("false", "true"):
        run_dir = tmp_path / f"run_{cache}"
        overrides = [
            "model=tiny", "model.d_model=128", "model.ffn_hidden=256", "model.moe_ffn_hidden=128",
            "model.fp8.enabled=true", f"model.fp8.cache_weights={cache}", "data.seq_len=64", "data.micro_batch_size=2",
            f"data.cache_dir={tmp_path / 'cache'}", "logging.wandb=false", "logging.console=false",
            "logging.log_every=1", "optim.warmup_steps=1", "trainer.device=cpu", "trainer.precision=bf16",
            "trainer.activation_checkpointing=full", "trainer.grad_accum=2", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "trainer.steps=3", f"trainer.run_dir={run_dir}",
        ]  # fmt: skip
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("train", overrides)
        run(cfg, run_dir=run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[cache] = [r["loss"] for r in records if r.get("loss") is not None]
        assert "enabled: true" in (run_dir / "config.yaml").read_text()
    assert len(losses["false"]) == 3 and all(0 < loss < 20 for loss in losses["false"])
    assert losses["true"] == losses["false"]
    assert len(set(losses["false"])) == 3  # the steps did change the weights


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fp8_model_on_gpu_matches_bf16_model(arch):
    """The Triton FP8 kernels inside the model under bf16 autocast: loss within 1% of the bf16 model with
    the same fp32 master weights, gradients aligned."""
    ref, fp8 = fp32_and_fp8(arch)
    ref, fp8 = ref.cuda(), fp8.cuda()
    ids = torch.randint(0, BASE["vocab_size"], (4, 129), device="cuda")
    results = []
    for model in (ref, fp8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, ids))
    (out_ref, grads_ref), (out, grads) = results
    assert abs(out.loss.item() - out_ref.loss.item()) < 0.01 * out_ref.loss.item()
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_ref = torch.cat([grads_ref[n].flatten() for n in grads])
    assert torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.98
