"""Router, balance losses, dropless and capacity-limited expert computation, grouped GEMM."""

import math

import pytest
import torch
import torch.nn.functional as F

from moetron.kernels import grouped_gemm, grouped_gemm_reference
from moetron.model import ModelConfig
from moetron.model.moe import MoE, Router, balance_loss, count_per_expert


def moe_config(**overrides):
    base = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_hidden=64,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_ffn_hidden=16,
        top_k=2,
        score_func="sigmoid",
        routed_scaling_factor=2.5,
    )
    return ModelConfig(**{**base, **overrides})


def init_router(router):
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_weights_sum_to_scaling_factor(score_func):
    router = init_router(Router(moe_config(score_func=score_func)))
    r = router(torch.randn(50, 32))
    torch.testing.assert_close(r.weights.sum(-1), torch.full((50,), 2.5))
    assert r.indices.shape == (50, 2)
    assert (r.indices[:, 0] != r.indices[:, 1]).all()


def test_unnormalized_weights_are_the_chosen_scores():
    router = init_router(Router(moe_config(score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)))
    r = router(torch.randn(50, 32))
    torch.testing.assert_close(r.weights, r.scores.gather(1, r.indices))
    # the chosen experts are the highest-scoring ones
    assert (r.scores.gather(1, r.indices).min(-1).values >= r.scores.topk(2).values[:, 1] - 1e-7).all()


def test_bias_changes_selection_but_not_weights():
    router = init_router(Router(moe_config()))
    x = torch.randn(40, 32)
    before = router(x)
    router.expert_bias[5] = 10.0  # expert 5 wins every token's selection
    after = router(x)
    assert (after.indices == 5).any(dim=-1).all()
    torch.testing.assert_close(after.scores, before.scores)  # affinities are unbiased
    chosen = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))


def test_bias_update_moves_against_load():
    router = Router(moe_config(bias_update_rate=0.01, n_routed_experts=4))
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_group_limited_routing():
    cfg = moe_config(n_routed_experts=16, n_group=4, topk_group=2, top_k=4)
    router = init_router(Router(cfg))
    r = router(torch.randn(100, 32))
    groups = r.indices // 4  # (tokens, top_k)
    group_scores = r.scores.view(100, 4, 4).topk(2, dim=-1).values.sum(-1)  # zero bias: choice == scores
    best = group_scores.topk(2, dim=-1).indices
    for t in range(100):
        assert set(groups[t].tolist()) <= set(best[t].tolist())


def test_balance_loss_hand_computed():
    # 2 sequences x 2 tokens, 4 experts, top-2.
    chosen = torch.zeros(2, 2, 4)
    for (s, t), experts in {(0, 0): [0, 1], (0, 1): [0, 2], (1, 0): [2, 3], (1, 1): [2, 3]}.items():
        chosen[s, t, experts] = 1
    probs = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]], [[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]]])
    # sequence 0: f = 4/(2*2) * [2,1,1,0], P = [.45,.2,.25,.1] -> 1.35; sequence 1: f = [0,0,2,2], P = [.1,.1,.4,.4] -> 1.6
    torch.testing.assert_close(balance_loss(chosen, probs, top_k=2), torch.tensor(1.475))
    # batch-wise: f = 4/(2*4) * [2,1,3,2], P = [.275,.15,.325,.25] -> 1.0875
    torch.testing.assert_close(balance_loss(chosen.view(1, 4, 4), probs.view(1, 4, 4), top_k=2), torch.tensor(1.0875))


def test_moe_balance_loss_uses_its_routing():
    cfg = moe_config(seq_aux_loss_alpha=0.1, aux_loss_alpha=0.01)
    moe = MoE(cfg)
    init_router(moe.router)
    x = torch.randn(3, 10, 32)
    _, loss = moe(x)
    r = moe.router(x.view(-1, 32))
    chosen = torch.zeros_like(r.scores).scatter_(1, r.indices, 1.0)
    probs = r.scores / r.scores.sum(-1, keepdim=True)
    expected = 0.1 * balance_loss(chosen.view(3, 10, 8), probs.view(3, 10, 8), 2) + 0.01 * balance_loss(
        chosen.view(1, 30, 8), probs.view(1, 30, 8), 2
    )
    torch.testing.assert_close(loss, expected)
    moe.eval()
    assert moe(x)[1] is None  # no balance loss outside training


def naive_moe(moe, x, capacity=None):
    """Per token: shared(x) + sum_k w_k * expert_k(x); with capacity, later tokens of a full expert are dropped."""
    flat = x.reshape(-1, x.shape[-1])
    r = moe.router(flat)
    e = moe.experts
    out = torch.zeros_like(flat)
    used = [0] * moe.n_experts
    for t in range(flat.shape[0]):
        for j in range(r.indices.shape[1]):
            i = int(r.indices[t, j])
            used[i] += 1
            if capacity is not None and used[i] > capacity:
                continue
            h = F.silu(flat[t] @ e.gate_proj[i].T) * (flat[t] @ e.up_proj[i].T)
            out[t] += r.weights[t, j] * (h @ e.down_proj[i].T)
    dropped = sum(max(0, u - capacity) for u in used) if capacity is not None else 0
    return (out + moe.shared_experts(flat)).view_as(x), dropped


def fresh_moe(cfg):
    moe = MoE(cfg)
    init_router(moe.router)
    for w in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj):
        torch.nn.init.normal_(w, std=0.2)
    return moe


def test_dropless_moe_equals_per_token_loop():
    moe = fresh_moe(moe_config())
    x = torch.randn(2, 9, 32)
    out, _ = moe(x)
    ref, _ = naive_moe(moe, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert moe.dropped.item() == 0


def test_capacity_drops_and_counts_in_token_order():
    cfg = moe_config(capacity_factor=0.5)
    moe = fresh_moe(cfg)
    moe.router.expert_bias[0] = 10.0  # overload expert 0 so it must drop
    x = torch.randn(2, 12, 32)
    out, _ = moe(x)
    capacity = math.ceil(0.5 * 24 * 2 / 8)
    ref, dropped = naive_moe(moe, x, capacity)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert dropped > 0 and moe.dropped.item() == dropped


def test_gradients_reach_only_experts_with_tokens():
    moe = fresh_moe(moe_config(n_routed_experts=8))
    moe.router.expert_bias[:] = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])
    x = torch.randn(1, 6, 32, requires_grad=True)
    out, _ = moe(x)
    out.square().sum().backward()
    hit = torch.zeros(8, dtype=torch.bool)
    hit[moe.router(x.detach().view(-1, 32)).indices.unique()] = True
    per_expert = moe.experts.gate_proj.grad.abs().sum(dim=(1, 2))
    assert (per_expert[hit] > 0).all() and (per_expert[~hit] == 0).all()
    assert moe.router.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 0, 10, 0], [4, 4, 1, 1]])
def test_grouped_gemm_implementations_agree(sizes):
    x = torch.randn(sum(sizes), 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    grad = torch.randn(sum(sizes), 8)
    outs = []
    for impl in ("reference", "torch_grouped_mm"):
        x.grad = w.grad = None
        y = grouped_gemm(x, w, ends, impl=impl)
        (y * grad).sum().backward()
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    # each group is its own F.linear
    start = 0
    for g, n in enumerate(sizes):
        torch.testing.assert_close(outs[0][0][start : start + n], x[start : start + n].detach() @ w[g].detach().T)
        start += n
    y = grouped_gemm(x, w, ends, impl="torch_grouped_mm")
    y.sum().backward()  # a broadcast gradient must not break _grouped_mm's backward


def test_grouped_gemm_reference_zero_fills_rows_past_last_group():
    x = torch.randn(7, 4)
    y = grouped_gemm_reference(x, torch.randn(2, 3, 4), torch.tensor([2, 5], dtype=torch.int32))
    assert y.shape == (7, 3) and (y[5:] == 0).all()


def test_count_per_expert_is_bincount():
    expert_of = torch.randint(0, 7, (1000,))
    expected = torch.bincount(expert_of, minlength=9)
    got = count_per_expert(expert_of, 9)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert torch.equal(count_per_expert(torch.zeros(0, dtype=torch.int64), 3), torch.zeros(3, dtype=torch.int64))
