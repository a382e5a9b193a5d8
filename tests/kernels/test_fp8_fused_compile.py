"""The Triton kernels of the FP8 producer fusions (fp8_swiglu_triton.py, fp8_norm_triton.py) compiled for Hopper
(sm_90a) on the CPU with every autotuner config: the interpreter accepts code the compiler rejects, so this catches
what the interpreter tests cannot, and that no config spills registers. Their results on the GPU are checked by
tests/kernels/test_fp8_swiglu.py and test_fp8_norm.py."""

import os

import pytest
import torch
from sm90_compile import PTXAS, compile_for_hopper, spill_bytes

from moetron.kernels import fp8_norm_triton as nt
from moetron.kernels import fp8_swiglu_triton as st

pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
M, F = 1000, 1536
E4M3 = torch.float8_e4m3fn


def quant_outputs(transposed: bool):
    """q, s and (transposed) qt, st with their strides, as the launchers allocate them."""
    q, s = torch.empty(M, F, dtype=E4M3), torch.empty(M, F // 128)
    qt, sct = torch.empty(F, 1024, dtype=E4M3), torch.empty(8, F).t()
    return (q, s, qt, sct), (q.stride(0), s.stride(0), qt.stride(0), *sct.stride())


def configs(kernel):
    return [({**c.kwargs, "num_warps": c.num_warps}) for c in kernel.configs]


def check(kernel, args, constexprs, tmp_path):
    compiled = compile_for_hopper(kernel.fn, args, constexprs)
    assert not any(spill_bytes(compiled, tmp_path))


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_quant_compiles(tmp_path, transposed, dtype):
    gate_up = torch.empty(M, 2 * F, dtype=dtype)
    (q, s, qt, sct), strides = quant_outputs(transposed)
    args = (gate_up, gate_up[:, F:], q, s, qt, sct, M, F, 2 * F, 2 * F, *strides)
    for config in configs(st._swiglu_quant_kernel):
        check(st._swiglu_quant_kernel, args, dict(config, POW2=False, TRANSPOSED=transposed), tmp_path)


def test_swiglu_backward_compiles(tmp_path):
    g = torch.empty(M, F, dtype=torch.bfloat16)
    args = (g, g, g, g, g, M, F, 2 * F, 2 * F, F, F, F)
    for config in configs(st._swiglu_backward_kernel):
        check(st._swiglu_backward_kernel, args, config, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_kernels_compile(tmp_path, dtype):
    x, w, rstd = torch.empty(M, F, dtype=dtype), torch.empty(F), torch.empty(M)
    for config in configs(nt._rstd_kernel):
        check(nt._rstd_kernel, (x, rstd, M, F, 1e-6, F), config, tmp_path)
    (q, s, qt, sct), strides = quant_outputs(True)
    for config in configs(nt._norm_quant_kernel):
        for transposed in (True, False):
            args = (x, w, rstd, q, s, qt, sct, M, F, F, *strides)
            check(nt._norm_quant_kernel, args, dict(config, POW2=True, TRANSPOSED=transposed), tmp_path)
    parts = torch.empty(32, F)
    for config in configs(nt._norm_backward_kernel):
        args = (x, w, rstd, x, x, parts, M, F, F, F, F)
        check(nt._norm_backward_kernel, args, dict(config, BLOCK_M=nt._BACKWARD_ROWS), tmp_path)


def test_dual_quantizer_compiles(tmp_path):
    """The plain dual quantizer, which shares its store (_store_dual, TRANSPOSED by default) with the fused ones."""
    from moetron.kernels import fp8_quant_triton as qt_mod

    x = torch.empty(M, F, dtype=torch.bfloat16)
    (q, s, qt, sct), strides = quant_outputs(True)
    for config in configs(qt_mod._quant_1x128_dual_kernel):
        args = (x, q, s, qt, sct, M, F, F, *strides)
        check(qt_mod._quant_1x128_dual_kernel, args, dict(config, POW2=False), tmp_path)
