"""The whole model: packing, MTP loss, gradients, determinism, meta-device build, bad token ids."""

import pytest
import torch
import torch.nn.functional as F

from moetron.model import ModelConfig, Transformer
from moetron.model.transformer import Documents

SMALL = dict(
    vocab_size=97,
    d_model=48,
    n_layers=3,
    n_heads=4,
    ffn_hidden=96,
    n_routed_experts=6,
    n_shared_experts=1,
    moe_ffn_hidden=24,
    top_k=2,
    first_k_dense_replace=1,
    max_seq_len=128,
)
MLA = dict(attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)


def build(**overrides):
    torch.manual_seed(1)
    return Transformer(ModelConfig(**{**SMALL, **overrides}))


def batch(model, b=2, s=20):
    ids = torch.randint(0, model.cfg.vocab_size, (b, s))
    return ids, torch.randint(0, model.cfg.vocab_size, (b, s))


@pytest.mark.parametrize("attn", [dict(n_kv_heads=2), MLA])
def test_packed_batch_equals_documents_run_alone(attn):
    model = build(**attn, score_func="sigmoid")
    ids, _ = batch(model, 2, 16)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [2] * 16])
    packed = model(ids, doc_ids=doc_ids).logits
    for b, s, e in [(0, 0, 6), (0, 6, 16), (1, 0, 16)]:
        alone = model(ids[b : b + 1, s:e]).logits
        torch.testing.assert_close(packed[b : b + 1, s:e], alone, atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 6, 16, 32], dtype=torch.int32)
    torch.testing.assert_close(model(ids, cu_seqlens=cu).logits, packed)


def test_documents_positions_restart():
    docs = Documents.from_starts(torch.tensor([[True, False, False, True, False], [False, True, False, False, False]]))
    assert docs.positions().tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 6, 10]


def test_documents_on_host_equal_documents_on_the_device():
    """The host-built packing (what the trainer passes) is field by field the one the model builds from
    doc_ids, and so are its truncations for multi-token prediction."""
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 6, 6, 6, 6, 6, 7]])
    on_device, on_host = Documents.from_doc_ids(doc_ids), Documents.on_host(doc_ids, "cpu")
    for a, b in [(on_device, on_host), (on_device.truncate(6), on_host.truncate(6))]:
        for name in ("starts", "cu_seqlens", "doc_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.max_seqlen == b.max_seqlen
    assert on_host.truncate(6).host_starts.shape == (2, 6)
    assert on_host.truncate(6).max_seqlen == 4 and on_host.max_seqlen == 5


def test_prepared_documents_give_the_doc_ids_loss_and_gradients():
    model = build(**MLA, mtp_depth=2, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
    ids, labels = batch(model, 2, 16)
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [2] * 9 + [3] * 7])
    results = []
    for kwargs in (dict(doc_ids=doc_ids), dict(documents=Documents.on_host(doc_ids, "cpu"), check_ids=False)):
        model.zero_grad()
        out = model(ids, labels=labels, **kwargs)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    with pytest.raises(ValueError, match="one of doc_ids, cu_seqlens and documents"):
        model(ids, doc_ids=doc_ids, documents=Documents.on_host(doc_ids, "cpu"))
    with pytest.raises(ValueError, match=r"documents for shape \(2, 16\) must match input_ids shape \(2, 8\)"):
        model(ids[:, :8], documents=Documents.on_host(doc_ids, "cpu"))


def test_loss_parts():
    model = build(**MLA, mtp_depth=2, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
    ids, labels = batch(model)
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    ref_lm = F.cross_entropy(out.logits.view(-1, 97), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref_lm)
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss + out.balance_loss)
    assert out.balance_loss > 0


def test_mtp_loss_follows_v3_equations():
    """Recompute both MTP depths by hand from the model's modules (DeepSeek-V3 eq. 21-25)."""
    model = build(**MLA, mtp_depth=2, mtp_loss_weight=0.3)
    model.eval()  # no balance loss, same routing
    ids, labels = batch(model, 2, 12)
    out = model(ids, labels=labels)

    h = model.embed(ids)
    rope = model.rope(torch.arange(12).expand(2, 12))
    for layer in model.layers.values():
        h, _ = layer(h, rope)
    losses = []
    for k, module in enumerate(model.mtp, start=1):
        n = 12 - k
        x = module.proj(torch.cat([module.embed_norm(model.embed(ids[:, k:])), module.hidden_norm(h[:, :n])], -1))
        h, _ = module.block(x, model.rope(torch.arange(n).expand(2, n)))
        logits = model.lm_head(module.norm(h))
        losses.append(F.cross_entropy(logits.reshape(-1, 97), labels[:, k:].reshape(-1)))  # predicts token i+k+1
    torch.testing.assert_close(out.mtp_loss, 0.3 / 2 * (losses[0] + losses[1]))


def test_mtp_ignores_targets_in_the_next_document():
    model = build(mtp_depth=1)
    ids, labels = batch(model, 1, 10)
    doc_ids = torch.tensor([[0] * 5 + [1] * 5])
    out = model(ids, labels=labels, doc_ids=doc_ids)
    # Position 4 (last of document 0) would predict labels[5], which belongs to document 1: changing it
    # must not move the MTP loss; changing labels[6] (document 1 predicting within itself) must.
    labels2 = labels.clone()
    labels2[0, 5] = (labels2[0, 5] + 1) % 97
    torch.testing.assert_close(model(ids, labels=labels2, doc_ids=doc_ids).mtp_loss, out.mtp_loss)
    labels2[0, 6] = (labels2[0, 6] + 1) % 97
    assert model(ids, labels=labels2, doc_ids=doc_ids).mtp_loss != out.mtp_loss


@pytest.mark.parametrize("attn", [dict(n_kv_heads=2, qk_norm=True, attention_bias=True), MLA])
def test_gradients_reach_every_parameter_that_received_tokens(attn):
    model = build(**attn, mtp_depth=1, seq_aux_loss_alpha=0.01, n_routed_experts=4, top_k=2)
    ids, labels = batch(model, 4, 24)  # 96 tokens x 2 choices over 4 experts: every expert is hit
    model(ids, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        if name == "embed.weight":  # only rows of tokens that occur
            seen = torch.zeros(97, dtype=torch.bool)
            seen[ids.unique()] = True
            assert (p.grad[seen].abs().sum(-1) > 0).all() and (p.grad[~seen] == 0).all()
        elif name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            assert (p.grad.abs().sum(dim=(1, 2)) > 0).all(), f"an expert of {name} got no gradient"
        else:
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_fixed_seed_is_deterministic():
    def run():
        model = build(**MLA, mtp_depth=1, seq_aux_loss_alpha=0.01)
        ids, labels = batch(model)
        out = model(ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    (l1, g1), (l2, g2) = run(), run()
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_meta_device_build_then_materialize():
    cfg = ModelConfig(**{**SMALL, **MLA}, tie_embeddings=True, mtp_depth=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.embed.weight
    reference = Transformer(cfg)
    torch.testing.assert_close(model.rope.inv_freq, reference.rope.inv_freq)
    ids, labels = batch(model)
    assert torch.isfinite(model(ids, labels=labels).loss)
    # scaled init: output projections are narrower than input projections
    attn = model.layers["0"].attn
    assert attn.o_proj.weight.std() < 0.7 * attn.kv_b_proj.weight.std()


def test_router_stats_and_bias_update():
    model = build(bias_update_rate=0.1, score_func="sigmoid")
    ids, labels = batch(model, 2, 30)
    model(ids, labels=labels)
    stats = model.router_stats()
    assert set(stats) == {"layers.1.ffn", "layers.2.ffn"}
    load = stats["layers.1.ffn"]["tokens_per_expert"]
    assert load.sum() == 60 * 2
    torch.testing.assert_close(stats["layers.1.ffn"]["max_over_mean_load"], load.max() / load.mean())
    model.update_expert_bias()
    bias = model.routers()["layers.1.ffn.router"].expert_bias
    torch.testing.assert_close(bias, 0.1 * torch.sign(load.mean() - load))
    assert model.router_stats()["layers.1.ffn"]["tokens_per_expert"].sum() == 0  # reset after the update


def test_token_ids_outside_vocabulary_raise():
    model = build()
    ids, labels = batch(model)
    bad = ids.clone()
    bad[1, 7] = 97
    with pytest.raises(ValueError, match=r"token id 97 at \(batch, position\) \(1, 7\).*\[0, 97\)"):
        model(bad)
    bad[1, 7] = -3
    with pytest.raises(ValueError, match="token id -3"):
        model(bad)
    labels[0, 2] = 500
    with pytest.raises(ValueError, match="labels contain 500"):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids.float())
