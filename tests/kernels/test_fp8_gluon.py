"""The Gluon FP8 GEMM (moetron/kernels/fp8_gemm_gluon.py) compiled for Hopper on the CPU.

Gluon kernels cannot run under TRITON_INTERPRET=1, so the CPU test suite compiles this one for sm_90a
through Triton's own ptxas: a change that breaks its compilation, makes it spill registers or outgrow the
H100's 227 KB of shared memory fails here. Its results are checked on the GPU
(tests/kernels/test_fp8_gpu.py -k gluon).
"""

import os
import re
import subprocess

import pytest
import torch
import triton

gluon_kernel = pytest.importorskip("moetron.kernels.fp8_gemm_gluon")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_for_hopper(kernel, args, constexprs):
    """What kernel[grid](*args, **constexprs) would build on an H100, built here without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constexprs)
    options, signature, consts, attrs = kernel._pack_args(backend, constexprs, bound, specialization, options)
    return triton.compile(GluonASTSource(kernel, signature, consts, attrs), target=target, options=options.__dict__)


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gluon_gemm_compiles_for_hopper(tmp_path, out_dtype):
    m, n, k = 1000, 1536, 2048
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    b = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    a_scale, b_scale = torch.empty(m, k // 128), torch.empty(triton.cdiv(n, 128), k // 128)
    c = torch.empty(m, n, dtype=out_dtype)
    grid, args, constexprs = gluon_kernel.kernel_args(a, a_scale, b, b_scale, c)
    assert grid == (triton.cdiv(m, 192) * triton.cdiv(n, 128),)
    assert constexprs["TMA_STORE"] == (out_dtype == torch.bfloat16)  # fp32 staging would not fit
    compiled = compile_for_hopper(gluon_kernel._fp8_gemm_ws_kernel, args, constexprs)
    assert compiled.metadata.num_warps == 16  # 3 consumer warpgroups + the loader warp padded to a warpgroup
    assert compiled.metadata.shared <= 227 * 1024
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    log = subprocess.run(
        [PTXAS, "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True, check=True
    ).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), log  # register budgets per partition leave no spills
