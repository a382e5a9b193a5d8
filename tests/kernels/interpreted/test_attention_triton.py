"""The Triton attention kernels under TRITON_INTERPRET=1 (CPU) against the torch reference.

Runs in its own process with TRITON_INTERPRET=1 set from the start (tests/kernels/test_interpreter.py
starts it): Triton reads the variable once, when it decorates the kernels.

Fresh random inputs over a grid: sequence lengths 1, 17, 127, 129 and 1000, GQA ratios 1/4/8, head
dims 64, 128 and MLA's 192/128, causal or not, packed variable lengths, sliding windows; forward
output, logsumexp, and dq/dk/dv. fp32 inputs (the interpreter's low-precision arithmetic is wrong,
../shared/TESTING.md), so agreement is to fp32 rounding.
"""

import pytest
import torch

from moetron.kernels import flash_attention


def test_runs_interpreted():
    import moetron.kernels.attention_triton as module

    assert module.INTERPRET


def run_both(q, k, v, **kwargs):
    grad = torch.randn(*q.shape[:3], v.shape[-1])
    results = []
    for backend in ("torch", "triton"):
        for t in (q, k, v):
            t.grad = None
        out, lse = flash_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
        (out * grad).sum().backward()
        results.append((out.detach(), lse.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
    return results


def assert_match(results):
    (ref_out, ref_lse, *ref_grads), (out, lse, *grads) = results
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=f"d{name}")


def inputs(batch, seq_q, seq_k, n_heads, n_kv, d_qk, d_v):
    q = torch.randn(batch, seq_q, n_heads, d_qk, requires_grad=True)
    k = torch.randn(batch, seq_k, n_kv, d_qk, requires_grad=True)
    v = torch.randn(batch, seq_k, n_kv, d_v, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("seq", [1, 17, 127, 129, 1000])
@pytest.mark.parametrize("causal", [True, False])
def test_sequence_lengths(seq, causal):
    q, k, v = inputs(1, seq, seq, 2, 2, 64, 64)
    assert_match(run_both(q, k, v, causal=causal))


@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128)])
def test_gqa_and_head_dims(ratio, dims):
    q, k, v = inputs(2, 33, 33, 8, 8 // ratio, *dims)
    assert_match(run_both(q, k, v, causal=True, softmax_scale=0.1))


@pytest.mark.parametrize("causal", [True, False])
def test_query_and_key_lengths_differ(causal):
    q, k, v = inputs(2, 20, 75, 4, 2, 64, 64)  # causal: queries aligned to the last keys
    assert_match(run_both(q, k, v, causal=causal))


def test_packed_variable_lengths():
    q, k, v = inputs(1, 300, 300, 4, 2, 64, 64)
    cu = torch.tensor([0, 1, 70, 200, 201, 300], dtype=torch.int32)
    assert_match(run_both(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=130))
    q, k, v = inputs(2, 96, 96, 4, 4, 64, 64)  # two rows, documents inside each
    assert_match(run_both(q, k, v, causal=False, cu_seqlens=torch.tensor([0, 40, 96, 150, 192])))


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(causal):
    q, k, v = inputs(1, 150, 150, 2, 1, 64, 64)
    assert_match(run_both(q, k, v, causal=causal, window=37))


def test_queries_that_see_no_key():
    q, k, v = inputs(1, 90, 20, 2, 2, 64, 64)  # causal, seq_q > seq_k: the first 70 queries see nothing
    results = run_both(q, k, v, causal=True)
    assert_match(results)
    out, lse = results[1][:2]
    assert (out[0, :70] == 0).all() and torch.isinf(lse[0, :, :70]).all()


def test_bad_head_dims_are_refused():
    q, k, v = inputs(1, 8, 8, 2, 2, 300, 300)
    with pytest.raises(ValueError, match="multiples of 8 up to 256"):
        flash_attention(q, k, v, backend="triton")


@pytest.mark.parametrize("mode, forwards", [("selective", 1), ("full", 2)])
def test_selective_checkpointing_keeps_the_attention_forward(monkeypatch, mode, forwards):
    """Selective activation checkpointing (parallel/apply.py's policy) keeps the fused forward's output and
    logsumexp (a custom op, moetron/kernels/ops.py) instead of re-running the kernel in the backward; full
    checkpointing re-runs it. Gradients equal those without checkpointing."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    import moetron.kernels.attention_triton as module
    from moetron.parallel.apply import _selective_policy

    q, k, v = inputs(1, 33, 33, 2, 1, 64, 64)
    grad = torch.randn(1, 33, 2, 64)
    attend = functools.partial(flash_attention, causal=True, backend="triton")
    (attend(q, k, v) * grad).sum().backward()
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    launch, launches = module._launch_fwd, []
    monkeypatch.setattr(module, "_launch_fwd", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    extra = {}
    if mode == "selective":
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    out = checkpoint(attend, q, k, v, use_reentrant=False, **extra)
    (out * grad).sum().backward()
    assert len(launches) == forwards
    for name, t, ref in zip("qkv", (q, k, v), want):
        torch.testing.assert_close(t.grad, ref, rtol=0, atol=0, msg=f"d{name}")
