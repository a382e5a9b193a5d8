"""parallelize(): activation checkpointing keeps values, gradients, names and router statistics."""

import pytest
import torch

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
