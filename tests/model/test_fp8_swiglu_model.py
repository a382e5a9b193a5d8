"""The model with the SwiGLU fused into the FP8 down projections (`fp8.fuse_swiglu`, on by default; dense FFN,
shared and routed experts): against the unfused FP8 model on the same weights (loss and gradients), the work it
replaces (no quantization of h on its own, one fused quantization per FFN), and where it stays off. On CPU the
kernels run as their torch references."""

import pytest
import torch

import moetron.kernels.fp8_linear as fl
import moetron.kernels.fp8_swiglu as fs
from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8Config
from tests.model.test_fp8_model import ARCHS, BASE, loss_and_grads, rel_err


def count(monkeypatch, module, name, calls):
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or fn(*a, **k))


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fused_swiglu_model_is_as_accurate_as_the_unfused_one(monkeypatch, arch):
    """Every gated FFN (the dense layer's, each MoE layer's shared expert and routed experts, the MTP block's)
    quantizes h in its SwiGLU: one fused quantization each, and as many fewer quantizations of a layer input.
    Against the fp32 model with the same weights, the fused model's loss and gradients are as close as the
    unfused FP8 model's (measured over 3 seeds: all gradients flattened, 0.050-0.067 relative for both, at most
    1.03x apart; the loss within 3e-4)."""
    torch.manual_seed(0)
    cfg = dict(BASE, **ARCHS[arch])
    ref = Transformer(ModelConfig(**cfg))
    fused = Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=True)))
    unfused = Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=True, fuse_swiglu=False)))
    fused.load_state_dict(ref.state_dict())
    unfused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, BASE["vocab_size"], (2, 65))
    runs = []
    for model in (ref, fused, unfused):
        calls = []
        count(monkeypatch, fs, "swiglu_quantize", calls)
        count(monkeypatch, fl, "quantize_1x128_dual", calls)
        count(monkeypatch, fl, "quantize_1x128", calls)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = loss_and_grads(model, ids)
        runs.append((out.loss.item(), torch.cat([g.flatten() for g in grads.values()]), calls))
        monkeypatch.undo()
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
    ffn = SwiGLU(128, 256, FP8Config(enabled=True))
    assert ffn.fuse_swiglu and fuses_swiglu(ffn.down_proj)
    seen = []
    ffn.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not fuses_swiglu(ffn.down_proj)
    ffn(torch.randn(3, 128))
    assert seen == [(3, 128)]
