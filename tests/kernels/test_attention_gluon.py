"""The Gluon attention forward (moetron/kernels/attention_gluon.py) compiled for Hopper on the CPU, and
the dispatch rules that decide when it runs. Its results are checked on the GPU
(tests/kernels/test_attention_gpu.py)."""

import os

import pytest
import torch
import triton
from sm90_compile import PTXAS, SMEM_LIMIT, compile_for_hopper, inner_loops, sass, spill_bytes

attention_gluon = pytest.importorskip("moetron.kernels.attention_gluon")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("d_v", [64, 128, 96])
def test_backward_preprocess_compiles_for_hopper(d_v):
    """The Triton kernel of the backward's delta / lse2 (shared by the Triton and Gluon backwards) compiles
    for the GPU: the interpreter, which runs it in the CPU tests, accepts code the compiler rejects."""
    from moetron.kernels import attention_triton
    from moetron.kernels.attention_triton_kernels import _bwd_preprocess_kernel

    do2 = torch.empty(1000, 8, d_v, dtype=torch.bfloat16)
    lse, delta, lse2 = torch.empty(8, 1000), torch.empty(8, 1000), torch.empty(8, 1000)
    grid, args, constexprs = attention_triton.preprocess_args(do2, torch.empty_like(do2), lse, delta, lse2)
    assert grid == (8, triton.cdiv(1000, constexprs["BLOCK_T"]))
    compiled = compile_for_hopper(_bwd_preprocess_kernel, args, constexprs)
    assert "ld.global" in compiled.asm["ptx"]


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize(
    "d_qk,d_v,causal,window,dtype",
    [
        (64, 64, False, None, torch.bfloat16),  # three consumer warpgroups
        (64, 64, True, None, torch.float16),
        (128, 128, True, 256, torch.float16),
        (192, 128, True, None, torch.bfloat16),  # MLA: query/key tiles in a 128 + 64 column split
    ],
)
def test_gluon_forward_compiles_for_hopper(tmp_path, d_qk, d_v, causal, window, dtype):
    tokens, n_heads, n_kv = 1000, 8, 2
    q = torch.empty(tokens, n_heads, d_qk, dtype=dtype)
    k = torch.empty(tokens, n_kv, d_qk, dtype=dtype)
    v = torch.empty(tokens, n_kv, d_v, dtype=dtype)
    out, lse = torch.empty(tokens, n_heads, d_v, dtype=dtype), torch.empty(n_heads, tokens)
    cu = torch.tensor([0, 377, 1000], dtype=torch.int32)
    grid, args, constexprs = attention_gluon.kernel_args(
        q, k, v, out, lse, cu, cu, 623, n_heads, n_heads // n_kv, causal, d_qk**-0.5, window, 132
    )
    consumers = 3 if (d_qk, window) == (64, None) else 2  # 192 query rows, or 128
    assert constexprs["CONSUMERS"] == consumers
    n_q_blocks = triton.cdiv(623, 64 * consumers)
    assert grid == (min(132, 2 * n_heads * n_q_blocks),)  # one item: a query block of one (sequence, head)
    next_item = args[-1]
    assert next_item.dtype == torch.int32 and next_item.tolist() == [0, 0]  # (items taken, programs done)
    compiled = compile_for_hopper(attention_gluon._attn_fwd_ws_kernel, args, constexprs)
    assert compiled.metadata.num_warps == 4 * (consumers + 1)  # + the loader warp padded to a warpgroup
    assert compiled.metadata.shared <= SMEM_LIMIT
    # Register budgets per partition leave (almost) no spills. Outside the key-block loops MLA's masked forms
    # spill up to 24 bytes of per-item scalars (stored once per program, reloaded once per item); MLA's
    # spill-free mask before measured 3.5% slower (bench/results/attention_mask_experiment.json).
    assert max(spill_bytes(compiled, tmp_path)) <= (8 if consumers == 3 else 32)
    loops = sorted((body for body in inner_loops(sass(compiled)) if "MUFU.EX2" in body and "HGMMA" in body), key=len)
    assert len(loops) == 2 * consumers  # each consumer's unmasked and masked key-block loop
    for i, body in enumerate(loops):
        masked = i >= consumers  # the longer half
        if masked and causal and consumers == 3:
            # 160 registers a warpgroup: the causal mask's loop spills one register of the two worker consumers
            # (measured faster than two warpgroups all the same: bench/results/attention_sched_experiment.json)
            assert body.count("LDL") <= 1 and body.count("STL") <= 1
        else:
            assert "LDL" not in body and "STL" not in body
        # P leaves the softmax packed pair by pair in wgmma's operand order (_pack16): no PRMT swapping halves
        assert "PRMT" not in body


def test_supported_rules(monkeypatch):
    q = torch.empty(2, 16, 4, 128, dtype=torch.bfloat16)
    assert not attention_gluon.supported(q, q, q)  # CPU tensors: never
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        qc = q.cuda()
        assert attention_gluon.supported(qc, qc, qc)
        assert not attention_gluon.supported(qc.float(), qc.float(), qc.float())
        assert not attention_gluon.supported(qc[..., :96], qc[..., :96], qc[..., :96])  # no 96 configuration
        monkeypatch.setenv("MOETRON_ATTN_GLUON", "0")
        assert not attention_gluon.supported(qc, qc, qc)


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize(
    "d_qk,d_v,causal,window",
    [
        (64, 64, False, None),
        (64, 64, True, None),
        (128, 128, True, None),
        (128, 128, False, 200),
        (192, 128, True, None),
    ],
)
def test_gluon_backward_compiles_for_hopper(tmp_path, d_qk, d_v, causal, window):
    from moetron.kernels import attention_gluon_bwd as bwd

    batch, seq, n_heads, n_kv = 2, 500, 8, 2
    q = torch.empty(batch, seq, n_heads, d_qk, dtype=torch.bfloat16)
    k = torch.empty(batch, seq, n_kv, d_qk, dtype=torch.bfloat16)
    v = torch.empty(batch, seq, n_kv, d_v, dtype=torch.bfloat16)
    do = torch.empty(batch, seq, n_heads, d_v, dtype=torch.bfloat16)
    lse2, delta = torch.empty(n_heads, batch * seq), torch.empty(n_heads, batch * seq)
    cu = torch.arange(batch + 1, dtype=torch.int32) * seq
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    launches = bwd.kernel_args(do, q, k, v, lse2, delta, dq, dk, dv, (cu, cu, seq, seq), causal, d_qk**-0.5, window)
    for kernel, (grid, args, constexprs) in zip((bwd._dkdv_kernel, bwd._dq_kernel), launches):
        assert grid == (triton.cdiv(seq, 128), batch * (n_kv if kernel is bwd._dkdv_kernel else n_heads))
        compiled = compile_for_hopper(kernel, args, constexprs)
        assert compiled.metadata.num_warps == 12
        assert compiled.metadata.shared <= SMEM_LIMIT
        # Head dim 64's dK/dV kernel (128-query blocks) spills a few scalars: none here without a mask, 8 bytes in
        # the epilogue at other shapes, 16 causal; the 64-query blocks it replaced spilled none and ran 4-17% slower
        # (bench/results/attention_bwd_hd64_experiment.json).
        allowed = 16 if (kernel is bwd._dkdv_kernel and d_qk == 64) else 0
        assert max(spill_bytes(compiled, tmp_path)) <= allowed
