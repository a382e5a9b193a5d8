"""RoPE (plain, YaRN, Llama-3 scaling) and RMSNorm."""

import pytest
import torch

from moetron.model.config import RopeScaling
from moetron.model.layers import RMSNorm, RotaryEmbedding, apply_rope, rope_inv_freq

transformers = pytest.importorskip("transformers")


def hf_rope(rope_parameters, head_dim=64, max_pos=4096):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(type="yarn", factor=40, original_max_seq_len=4096, mscale=1.0, mscale_all_dim=1.0),
        RopeScaling(type="yarn", factor=4, original_max_seq_len=512, beta_fast=16, beta_slow=2, mscale=0.0),
        RopeScaling(type="yarn", factor=8, original_max_seq_len=2048, mscale=0.707, mscale_all_dim=1.0, truncate=False),
    ],
)
def test_yarn_matches_transformers(scaling):
    params = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
        "truncate": scaling.truncate,
    }
    if scaling.mscale:
        params["mscale"] = scaling.mscale
    if scaling.mscale_all_dim:
        params["mscale_all_dim"] = scaling.mscale_all_dim
    ref_freq, ref_factor = hf_rope(params, max_pos=scaling.original_max_seq_len * int(scaling.factor))
    inv_freq, factor = rope_inv_freq(64, 10000.0, scaling)
    torch.testing.assert_close(inv_freq, ref_freq)
    assert factor == pytest.approx(ref_factor)
    plain, _ = rope_inv_freq(64, 10000.0, None)
    assert inv_freq[0] == plain[0] and inv_freq[-1] == pytest.approx(plain[-1] / scaling.factor)


def test_llama3_scaling_matches_transformers():
    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    ref_freq, _ = hf_rope(params, max_pos=131072)
    scaling = RopeScaling(type="llama3", factor=32, original_max_seq_len=8192, low_freq_factor=1, high_freq_factor=4)
    inv_freq, factor = rope_inv_freq(64, 500000.0, scaling)
    torch.testing.assert_close(inv_freq, ref_freq)
    assert factor == 1.0


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert not torch.allclose(score(7, 3), score(7, 4))
    cos, sin = rope(torch.tensor([[5]]))
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(), q.norm())  # a rotation


def test_rmsnorm():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    xf = x.float()
    expected = norm.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), expected)
