"""The FP8 layers and a small FP8 model on the Triton kernels under TRITON_INTERPRET=1, each fused path against the
unfused one on the same kernels: the launchers' wiring end to end (strided views of gate and up, the weights
quantized into slices of joint forms, the experts' row blocks of dY^T, the fused producers). Both sides go through
the interpreter's e4m3 cast (which rounds some values differently from torch's, test_fp8.py), so they differ only
as the fused arithmetic differs: a wiring error would be of the order of the values themselves."""

import torch
import torch.nn.functional as F

from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear
from moetron.kernels.fp8_linear import FP8LinearFunction, fp8_linear
from moetron.kernels.fp8_norm import fp8_norm_linear
from moetron.kernels.fp8_swiglu import fp8_swiglu_linear
from moetron.model import ModelConfig, Transformer
from moetron.model.config import FP8Config
from moetron.model.layers import RMSNorm
from tests.kernels.test_fp8_shared_input import grouped_siblings_run


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fused_swiglu_against_the_unfused_layer():
    """Dense and per expert: the unfused path rounds h to bf16 before quantizing it, the fused one does not, and
    where that rounding crosses an e4m3 rounding boundary the code is one step apart (measured: 0.025 of y here;
    a wiring error would be of order 1)."""
    torch.manual_seed(0)
    gate_up = torch.randn(256, 512).to(torch.bfloat16)
    group_ends = torch.tensor([128, 256])
    dy = torch.randn(256, 128).to(torch.bfloat16)
    for w, ends in ((torch.randn(128, 256) / 16, None), (torch.randn(2, 128, 256) / 16, group_ends)):
        results = []
        for fused in (True, False):
            gu, wr = gate_up.clone().requires_grad_(), w.clone().requires_grad_()
            gate, up = gu.chunk(2, dim=-1)  # views with row stride 2F
            if fused:
                y = fp8_swiglu_linear(gate, up, wr, ends)
            else:
                h = F.silu(gate) * up
                y = fp8_linear(h, wr) if ends is None else fp8_grouped_linear(h, wr, ends)
            y.backward(dy)
            results.append((y.detach(), gu.grad, wr.grad))
        for a, b in zip(*results):
            assert rel_err(a, b) < 0.05


def test_fused_norm_against_norm_then_layer():
    """fp32 x: the same arithmetic but for the kernel's rstd against torch's (an ulp at most)."""
    torch.manual_seed(0)
    x = torch.randn(200, 256) * 3
    norm = RMSNorm(256)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    weights = [torch.randn(128, 256) / 16, torch.randn(64, 256) / 16]  # the last not a multiple of 128
    dy = torch.randn(200, 192)
    results = []
    for fused in (True, False):
        xs, ws = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in weights]
        norm.weight.grad = None
        if fused:
            y = fp8_norm_linear(xs, norm.weight, norm.eps, tuple(ws))
        else:
            y = FP8LinearFunction.apply(norm(xs), ws[0], None, False, None, None, ws[1])
        y.backward(dy)
        results.append((y.detach(), xs.grad, norm.weight.grad.clone(), *(w.grad for w in ws)))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-3


def test_grouped_siblings_against_two_calls():
    torch.manual_seed(0)
    x = torch.randn(384, 128).to(torch.bfloat16)
    gate, up = torch.randn(3, 128, 128) / 11, torch.randn(3, 128, 128) / 11
    group_ends = torch.tensor([128, 128, 384])
    dy = torch.randn(384, 256).to(torch.bfloat16)
    y, dx, dg, du = grouped_siblings_run(x, gate, up, group_ends, dy, True)
    y_ref, dx_ref, dg_ref, du_ref = grouped_siblings_run(x, gate, up, group_ends, dy, False)
    assert torch.equal(y, y_ref) and rel_err(dg, dg_ref) < 1e-5 and rel_err(du, du_ref) < 1e-5
    assert rel_err(dx, dx_ref) < 2**-7
    assert dg[1].abs().max() == 0  # the empty group's expert


def test_small_fp8_model_with_every_fusion():
    """An MLA + MoE model with both producer fusions against the same model without them, both on the Triton
    kernels: the loss within 1e-3 (measured 1.1e-4), the gradients pointing the same way (cosine 0.9955)."""
    cfg = dict(
        vocab_size=256, d_model=128, n_layers=2, max_seq_len=128, n_heads=2, ffn_hidden=256, n_routed_experts=4,
        n_shared_experts=1, moe_ffn_hidden=128, top_k=2, first_k_dense_replace=1, mtp_depth=1, attention="mla",
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=64,
        attention_backend="torch",
    )  # fmt: skip
    torch.manual_seed(0)
    fused = Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=True, fuse_swiglu=True, fuse_norm=True)))
    unfused = Transformer(ModelConfig(**cfg, fp8=FP8Config(enabled=True)))
    unfused.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 256, (2, 65))
    results = []
    for model in (fused, unfused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        results.append((out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss, grads), (loss_ref, grads_ref) = results
    assert abs(loss - loss_ref) < 1e-3 * loss_ref
    assert F.cosine_similarity(grads, grads_ref, dim=0) > 0.99
