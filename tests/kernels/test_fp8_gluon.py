"""The Gluon FP8 GEMM (moetron/kernels/fp8_gemm_gluon.py) compiled for Hopper on the CPU.

Gluon kernels cannot run under TRITON_INTERPRET=1, so the CPU test suite compiles this one for sm_90a
through Triton's own ptxas: a change that breaks its compilation, makes it spill registers or outgrow the
H100's 227 KB of shared memory fails here. Its results are checked on the GPU
(tests/kernels/test_fp8_gpu.py -k gluon).
"""

import os

import pytest
import torch
import triton
from sm90_compile import PTXAS, SMEM_LIMIT, compile_for_hopper, sass, spill_bytes

gluon_kernel = pytest.importorskip("moetron.kernels.fp8_gemm_gluon")


# (tile shape, output dtype): fp32 outputs always take the narrow tiles (kernel_args)
SHAPES = [("narrow", torch.bfloat16), ("narrow", torch.float32), ("wide", torch.bfloat16)]


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("tiles,out_dtype", SHAPES)
@pytest.mark.parametrize("device_desc", [True, False])
def test_gluon_gemm_compiles_for_hopper(tmp_path, tiles, out_dtype, device_desc, monkeypatch):
    """Both descriptor paths: built on the device (small problems) and on the host (large ones)."""
    monkeypatch.setattr(gluon_kernel, "DEVICE_DESC_FLOPS", float("inf") if device_desc else 0.0)
    m, n, k = 1000, 1536, 2048
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    b = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    a_scale, b_scale = torch.empty(m, k // 128), torch.empty(triton.cdiv(n, 128), k // 128)
    c = torch.empty(m, n, dtype=out_dtype)
    t = gluon_kernel.TILES[tiles]
    grid, args, constexprs = gluon_kernel.kernel_args(a, a_scale, b, b_scale, c, 132, tiles=t)
    assert grid == (min(triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n), 132),)  # at most one per SM
    assert constexprs["TMA_STORE"] == (out_dtype == torch.bfloat16)  # fp32 staging would not fit
    assert constexprs["DEVICE_DESC"] == device_desc and hasattr(args[0], "block_shape") != device_desc
    compiled = compile_for_hopper(gluon_kernel._fp8_gemm_ws_kernel, args, constexprs)
    # the consumer warpgroups + the loader warp padded to a warpgroup
    assert compiled.metadata.num_warps == 4 * (t.consumers + 1)
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert not any(spill_bytes(compiled, tmp_path))  # register budgets per partition leave no spills


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("tiles,out_dtype", SHAPES)
@pytest.mark.parametrize("device_desc", [True, False])
def test_gluon_grouped_gemm_compiles_for_hopper(tmp_path, tiles, out_dtype, device_desc, monkeypatch):
    monkeypatch.setattr(gluon_kernel, "DEVICE_DESC_FLOPS", float("inf") if device_desc else 0.0)
    m, n, k, n_experts = 3000, 1000, 1024, 8
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    b = torch.empty(n_experts, n, k, dtype=torch.float8_e4m3fn)
    a_scale, b_scale = torch.empty(m, k // 128), torch.empty(n_experts, triton.cdiv(n, 128), k // 128)
    group_ends = torch.empty(n_experts, dtype=torch.int32)
    c = torch.empty(m, n, dtype=out_dtype)
    t = gluon_kernel.TILES[tiles]
    grid, args, constexprs = gluon_kernel.kernel_args(a, a_scale, b, b_scale, c, 132, group_ends, tiles=t)
    assert grid == (min((triton.cdiv(m, t.block_m) + n_experts) * triton.cdiv(n, t.block_n), 132),)
    assert constexprs["BLOCK_E"] == 16  # the groups and the rows past the last one
    b_small = b[:, :128].contiguous()
    small = gluon_kernel.kernel_args(a[:100], a_scale[:100], b_small, b_scale[:, :1], c[:100, :128], 132, group_ends)
    assert small[0] == ((1 + n_experts) * 1,)  # never more programs than the worst-case tile count
    compiled = compile_for_hopper(gluon_kernel._fp8_gemm_ws_kernel, args, constexprs)
    assert compiled.metadata.num_warps == 4 * (t.consumers + 1)
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert not any(spill_bytes(compiled, tmp_path))
    # The tile's segment comes from cross-lane reductions; unless it is marked warp-uniform (_uniform), ptxas
    # computes the ring position and every wgmma descriptor in vector registers and copies them into uniform
    # ones each K block (R2UR): 85-136 R2UR in all against the dense build's 43-56, and 10-12% slower on the H100.
    dense = gluon_kernel.kernel_args(a, a_scale, b[0], b_scale[0], c, 132, tiles=t)
    dense_sass = sass(compile_for_hopper(gluon_kernel._fp8_gemm_ws_kernel, *dense[1:]))
    assert sass(compiled).count("R2UR") <= dense_sass.count("R2UR")


def test_choose_tiles():
    """Wide tiles for large problems; narrow where the wide ones would leave the last wave mostly idle (few
    tiles, N just past a multiple of 256); narrow for outputs without the TMA store (fp32) and N % 16 != 0."""
    choose = gluon_kernel.choose_tiles
    for m, n, n_groups in [(4096, 4096, 0), (8192, 8192, 0), (16384, 2048, 0), (16384, 7168, 0), (16384, 7168, 32)]:
        assert choose(m, n, n_groups, 132) is gluon_kernel.TILES["wide"], (m, n, n_groups)
    for m, n, n_groups in [(1000, 1536, 0), (4173, 2176, 0), (700, 200, 0)]:
        assert choose(m, n, n_groups, 132) is gluon_kernel.TILES["narrow"], (m, n, n_groups)
    m, n, k = 8192, 8192, 256
    a, b = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(n, k, dtype=torch.float8_e4m3fn)
    a_scale, b_scale = torch.empty(m, k // 128), torch.empty(n // 128, k // 128)
    for out_dtype, consumers in [(torch.bfloat16, 2), (torch.float32, 3)]:
        c = torch.empty(m, n, dtype=out_dtype)
        assert gluon_kernel.kernel_args(a, a_scale, b, b_scale, c, 132)[2]["CONSUMERS"] == consumers
    # N not a multiple of 16: the wide consumer spilled in its K loop (74 spill loads/stores), so narrow
    n = 8200
    b, b_scale, c = b[:1].expand(n, k).contiguous(), torch.empty(triton.cdiv(n, 128), k // 128), torch.empty(m, n)
    assert gluon_kernel.kernel_args(a, a_scale, b, b_scale, c.bfloat16(), 132)[2]["CONSUMERS"] == 3


wgrad_kernel = pytest.importorskip("moetron.kernels.fp8_wgrad_gluon")


def wgrad_operands(n, k, tokens):
    """dY^T (N, T) and X^T (K, T) in e4m3 with their scales stored token-block-major, as quantize_1x128_t does."""
    a, b = torch.empty(n, tokens, dtype=torch.float8_e4m3fn), torch.empty(k, tokens, dtype=torch.float8_e4m3fn)
    return a, torch.empty(tokens // 128, n).t(), b, torch.empty(tokens // 128, k).t()


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("tiles", ["wide", "square"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_experts", [0, 8])
def test_gluon_wgrad_compiles_for_hopper(tmp_path, tiles, out_dtype, n_experts):
    """The weight-gradient kernel (fp8_wgrad_gluon.py), dense and grouped: both tile shapes, 16-bit and fp32
    outputs (both leave through the TMA store), within the shared memory, and no spills (a b-scale vector
    loaded before the MMA's wait, or a 24-register loader, spills)."""
    n, k, tokens = 1156, 2176, 1536
    a, a_scale, b, b_scale = wgrad_operands(n, k, tokens)
    assert wgrad_kernel.wgrad_ok(a_scale, b_scale)
    t = wgrad_kernel.WGRAD_TILES[tiles]
    group_ends = torch.empty(n_experts, dtype=torch.int32) if n_experts else None
    c = torch.empty(*((n_experts,) if n_experts else ()), n, k, dtype=out_dtype)
    grid, args, constexprs = wgrad_kernel.kernel_args(a, a_scale, b, b_scale, c, 132, t, group_ends)
    tiles_count = max(n_experts, 1) * triton.cdiv(n, t.block_m) * triton.cdiv(k, t.block_n)
    assert grid == (min(tiles_count, 132),)
    assert constexprs["TMA_STORE"]
    compiled = compile_for_hopper(wgrad_kernel._fp8_wgrad_ws_kernel, args, constexprs)
    assert compiled.metadata.num_warps == 4 * (t.consumers + 1)
    assert compiled.metadata.shared <= SMEM_LIMIT
    assert not any(spill_bytes(compiled, tmp_path))


def test_wgrad_dispatch_conditions():
    """wgrad_ok takes scales stored token-block-major with row counts that keep TMA's 16-byte strides; choose_tiles
    takes the wide tiles for weight-sized 16-bit outputs, the square ones where few wide tiles would idle most SMs
    and for fp32 outputs."""
    a, a_scale, b, b_scale = wgrad_operands(1024, 512, 256)
    assert wgrad_kernel.wgrad_ok(a_scale, b_scale)
    assert not wgrad_kernel.wgrad_ok(a_scale.contiguous(), b_scale)  # row-major (quantize_1x128's layout)
    _, odd_scale, _, _ = wgrad_operands(1022, 512, 256)
    assert not wgrad_kernel.wgrad_ok(odd_scale, b_scale)  # 1022 rows: K-block stride not 16-byte aligned
    choose = wgrad_kernel.choose_tiles
    for m, n in [(4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096), (8192, 8192)]:
        assert choose(m, n, 132) is wgrad_kernel.WGRAD_TILES["wide"], (m, n)
    for m, n in [(640, 640), (512, 512), (1024, 1280)]:
        assert choose(m, n, 132) is wgrad_kernel.WGRAD_TILES["square"], (m, n)
    assert choose(8192, 8192, 132, out_bytes=4) is wgrad_kernel.WGRAD_TILES["square"]  # fp32 outputs
    c = torch.empty(1024, 512)
    assert wgrad_kernel.kernel_args(a, a_scale, b, b_scale, c, 132)[2]["HALVES"] == 1
