"""parallelize(): activation checkpointing keeps values, gradients, names and router statistics."""

import pytest
import torch
from torch import nn

from moetron.model import ModelConfig, Transformer
from moetron.parallel.apply import apply_activation_checkpointing, unwrap


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_is_exact(mode):
    cfg = ModelConfig.from_preset("moe_debug")
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    load = model.router_stats()["layers.1.ffn"]["tokens_per_expert"].clone()
    names = list(model.state_dict())
    model.zero_grad()
    model.reset_router_stats()

    apply_activation_checkpointing(model, mode)
    assert type(model.layers["0"]).__name__ == "CheckpointWrapper"
    again = model(ids, labels=ids)
    again.loss.backward()
    assert torch.equal(again.loss, out.loss)
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=0)
    assert list(model.state_dict()) == names  # checkpoints stay loadable either way
    # the recomputation in backward must not count routed tokens a second time
    assert torch.equal(model.router_stats()["layers.1.ffn"]["tokens_per_expert"], load)
    assert unwrap(model) is model


def test_router_scores_stay_fp32_under_autocast():
    cfg = ModelConfig.from_preset("moe_debug")
    router = Transformer(cfg).layers["1"].ffn.router
    x = torch.randn(32, cfg.d_model)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x)
    assert mixed.scores.dtype == torch.float32
    assert torch.equal(mixed.indices, plain.indices) and torch.equal(mixed.scores, plain.scores)


def _checkpointed(block, mode):
    """block wrapped as apply_activation_checkpointing wraps the model's blocks."""
    holder = nn.ModuleDict({"0": block})
    apply_activation_checkpointing(_Layers(holder), mode)
    return holder["0"]


class _Layers(nn.Module):
    """The attributes apply_activation_checkpointing walks: layers and mtp."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.mtp = layers, []


@pytest.mark.parametrize("cache_weights", [False, True])
@pytest.mark.parametrize("mode, gemms", [("none", 6), ("selective", 6), ("full", 8)])
def test_selective_checkpointing_keeps_fp8_layer_outputs(monkeypatch, mode, gemms, cache_weights):
    """Selective checkpointing saves an FP8 linear layer's forward (a custom op, moetron/kernels/ops.py)
    instead of re-running its quantizers and GEMM in the backward: two layers make 2 forward + 4 backward
    GEMMs, and full checkpointing 2 more. Gradients equal the unwrapped block's exactly, with and without
    the FP8 weight cache."""
    from moetron.kernels import fp8_linear
    from moetron.kernels.fp8_linear import FP8Linear

    torch.manual_seed(0)
    block = nn.Sequential(
        FP8Linear(256, 256, cache_weights=cache_weights), nn.GELU(), FP8Linear(256, 128, cache_weights=cache_weights)
    )
    x = torch.randn(2, 64, 256, requires_grad=True)
    block(x).square().sum().backward()
    want = [t.grad.clone() for t in (x, *block.parameters())]
    for t in (x, *block.parameters()):
        t.grad = None

    counted = fp8_linear.fp8_gemm
    calls = []
    monkeypatch.setattr(fp8_linear, "fp8_gemm", lambda *a, **k: calls.append(1) or counted(*a, **k))
    wrapped = block if mode == "none" else _checkpointed(block, mode)
    wrapped(x).square().sum().backward()
    assert len(calls) == gemms
    for got, ref in zip((x, *block.parameters()), want):
        torch.testing.assert_close(got.grad, ref, rtol=0, atol=0)
