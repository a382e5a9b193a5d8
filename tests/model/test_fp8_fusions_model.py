"""The model's FP8 producer fusions (on by default; their GPU tests are in tests/kernels): the SwiGLU fused into the
down projections (`fp8.fuse_swiglu`; dense FFN, shared and routed experts) and RMSNorm fused into the projections it feeds (`fp8.fuse_norm`; the
attention's and dense FFN's pre-norms, MLA's latent norms). Each against the model without it on the same weights
(loss and gradients), the work it replaces, and where it stays off. On CPU the kernels run as their torch
references."""

import pytest
import torch

import moetron.kernels.fp8_linear as fl
import moetron.kernels.fp8_norm as fn
import moetron.kernels.fp8_swiglu as fs
from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8Config
from tests.model.test_fp8_model import ARCHS, BASE, loss_and_grads, rel_err

UNFUSED = FP8Config(enabled=True, fuse_swiglu=False, fuse_norm=False)


def count(monkeypatch, module, name, calls):
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or fn(*a, **k))


def fp32_fused_unfused(monkeypatch, cfg, fused_fp8: FP8Config, counted) -> list[tuple]:
    """(loss, all gradients flattened, counted calls) of the fp32 model, the FP8 model with `fused_fp8` and the
    plain FP8 model, from the same weights and batch under bf16 autocast; `counted`: (module, name) pairs whose
    calls are recorded by name."""
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**cfg))
    fused = Transformer(ModelConfig(**cfg, fp8=fused_fp8))
    unfused = Transformer(ModelConfig(**cfg, fp8=UNFUSED))
    fused.load_state_dict(ref.state_dict())
    unfused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, BASE["vocab_size"], (2, 65))
    runs = []
    for model in (ref, fused, unfused):
        calls = []
        for module, name in counted:
            count(monkeypatch, module, name, calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = loss_and_grads(model, ids)
        runs.append((out.loss.item(), torch.cat([g.flatten() for g in grads.values()]), calls))
        monkeypatch.undo()
    return runs


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fused_swiglu_model_is_as_accurate_as_the_unfused_one(monkeypatch, arch):
    """Every gated FFN (the dense layer's, each MoE layer's shared expert and routed experts, the MTP block's)
    quantizes h in its SwiGLU: one fused quantization each, and as many fewer quantizations of a layer input.
    Against the fp32 model with the same weights, the fused model's loss and gradients are as close as the
    unfused FP8 model's (measured over 3 seeds: all gradients flattened, 0.050-0.067 relative for both, at most
    1.03x apart; the loss within 3e-4)."""
    counted = [(fs, "swiglu_quantize"), (fl, "quantize_1x128_dual"), (fl, "quantize_1x128")]
    fp8 = FP8Config(enabled=True, fuse_swiglu=True, fuse_norm=False)
    runs = fp32_fused_unfused(monkeypatch, dict(BASE, **ARCHS[arch]), fp8, counted)
    (loss_ref, grads_ref, _), (loss, grads, calls), (loss_unfused, grads_unfused, calls_unfused) = runs
    blocks = BASE["n_layers"] + BASE["mtp_depth"]
    dense = BASE["first_k_dense_replace"]
    ffns = dense + 2 * (blocks - dense)  # an MoE block: its shared expert and its routed experts
    assert calls.count("swiglu_quantize") == ffns and calls_unfused.count("swiglu_quantize") == 0
    assert len(calls_unfused) - (len(calls) - ffns) == ffns  # h's own quantizations are gone
    assert abs(loss - loss_ref) < 1e-3 * loss_ref and loss != loss_unfused
    assert rel_err(grads, grads_ref) < 1.1 * rel_err(grads_unfused, grads_ref)


def test_swiglu_fusion_stays_off_where_it_cannot_apply():
    """BF16 models, `fuse_swiglu=False`, and a down projection with a forward hook (the fused call would bypass
    it) take the unfused path."""
    from moetron.model.layers import SwiGLU, fuses_swiglu

    assert not SwiGLU(128, 256).fuse_swiglu
    assert not SwiGLU(128, 256, FP8Config(enabled=True, fuse_swiglu=False)).fuse_swiglu
    ffn = SwiGLU(128, 256, FP8Config(enabled=True))  # (on by default)
    assert ffn.fuse_swiglu and fuses_swiglu(ffn.down_proj)
    seen = []
    ffn.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not fuses_swiglu(ffn.down_proj)
    ffn(torch.randn(3, 128))
    assert seen == [(3, 128)]


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fused_norm_model_matches_the_unfused_one(monkeypatch, arch):
    """The attention's pre-norm, a dense FFN's pre-norm and MLA's two latent norms write their projections' FP8
    input themselves: one fused quantization each, none of the plain quantizer for those inputs. The residual
    stream is fp32 here (fp32 weights under autocast), where the fused forward does the unfused one's arithmetic;
    where a norm's input is bf16 (MLA's latents, GEMM outputs; the MTP block's input, its projection's output) the
    unfused norm rounds once more before the weight (measured: 1.6e-6 of the loss with GQA, 1.2e-5 with MLA).
    The backward's norm gradient rounds differently in the last fp32 place, which moves the FP8 codes of the
    gradients quantized upstream where they sat on a rounding boundary: against the fp32 model the gradients are
    as close as the unfused model's."""
    gqa = {"attention_bias": False, "n_kv_heads": 2}  # (q, k, v: 128 wide each, no bias: FP8 siblings)
    cfg = {**BASE, **ARCHS[arch], **(gqa if arch == "gqa" else {})}
    counted = [(fn, "rmsnorm_quantize"), (fl, "quantize_1x128_dual")]
    runs = fp32_fused_unfused(monkeypatch, cfg, FP8Config(enabled=True, fuse_swiglu=False, fuse_norm=True), counted)
    (_, grads_ref, _), (loss, grads, calls), (loss_unfused, grads_unfused, calls_unfused) = runs
    blocks = BASE["n_layers"] + BASE["mtp_depth"]
    norms = blocks + BASE["first_k_dense_replace"] + (2 * blocks if arch == "mla" else 0)
    assert calls.count("rmsnorm_quantize") == norms and "rmsnorm_quantize" not in calls_unfused
    assert len(calls_unfused) - (len(calls) - norms) == norms  # the normed inputs' own quantizations are gone
    assert abs(loss - loss_unfused) < (1e-4 if arch == "mla" else 1e-5) * loss_unfused
    assert rel_err(grads, grads_ref) < 1.1 * rel_err(grads_unfused, grads_ref)


def test_norm_fusion_stays_off_where_it_cannot_apply():
    """BF16 layers, `fuse_norm=False`, a norm with a forward hook, and a layer with a bias take the unfused path:
    the norm runs as a module (its hook sees it)."""
    from moetron.model.layers import RMSNorm, SwiGLU, fuses_norm, project_together

    x = torch.randn(3, 128)
    for fp8 in (None, FP8Config(enabled=True, fuse_norm=False)):
        assert not SwiGLU(128, 256, fp8).fuse_norm
    assert SwiGLU(128, 256, FP8Config(enabled=True)).fuse_norm  # (on by default)
    norm = RMSNorm(128)
    seen = []
    norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not fuses_norm(norm)
    ffn = SwiGLU(128, 256, FP8Config(enabled=True, fuse_norm=True))
    ffn(x, norm=norm)
    assert seen == [(3, 128)]
    layer = fl.FP8Linear(128, 128, bias=True)
    (y,) = project_together(x, (layer,), None, RMSNorm(128), fuse_norm=True)  # a bias: not an FP8 sibling
    assert torch.allclose(y, layer(RMSNorm(128)(x)))


def test_experts_gate_and_up_as_one_grouped_gemm():
    """In FP8 the routed experts' gate and up run as one grouped GEMM over joint forms: the MoE layer's output as
    with two grouped GEMMs (the same FP8 bytes), the gradients up to dX's one rounding instead of a bf16 sum."""
    from moetron.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(ModelConfig(**dict(BASE, score_func="sigmoid", n_routed_experts=8, top_k=3), fp8=FP8Config(enabled=True)))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, dy = torch.randn(2, 100, 128), torch.randn(2, 100, 128)
    runs = []
    for together in (True, False):
        moe.experts.gate_up_together = together
        moe.zero_grad()
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(xs)
        y.backward(dy)
        runs.append((y.detach(), xs.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = runs
    assert torch.equal(y, y_ref)
    assert rel_err(dx, dx_ref) < 1e-2
    for name in ("experts.gate_proj", "experts.up_proj", "experts.down_proj"):
        assert rel_err(grads[name], grads_ref[name]) < 1e-2, name
