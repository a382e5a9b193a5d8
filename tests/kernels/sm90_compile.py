"""Compile a Gluon or Triton kernel for Hopper (sm_90a) on a CPU-only machine, as `kernel[grid](...)` would
on an H100.

Gluon kernels cannot run under TRITON_INTERPRET=1, so the CPU suite checks what it can without a GPU:
that they compile, through Triton's own ptxas, without spilling registers and within the H100's 227 KB
of shared memory. Their results are checked by the GPU tests. Triton kernels run under the interpreter,
which accepts some code the compiler rejects (a kernel reading a non-constexpr module global): compiling
them here catches that on the CPU.
"""

import os
import re
import subprocess

import triton


def _ptxas() -> str:
    """The ptxas Triton itself assembles sm_90a code with (3.6: its CUDA 12 `ptxas`; 3.9, whose PTX is a newer
    ISA: `ptxas-blackwell`, CUDA 13), or the path where 3.6 keeps it when this Triton says none."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # (no NVIDIA backend in this build: the tests skip on the missing file)
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


PTXAS = _ptxas()
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one H100 program may use


def compile_for_hopper(kernel, args, constexprs):
    """The compiled kernel (asm, metadata) for these launch arguments, built for sm_90a."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constexprs)
    options, signature, consts, attrs = kernel._pack_args(backend, constexprs, bound, specialization, options)
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    return triton.compile(source(kernel, signature, consts, attrs), target=target, options=options.__dict__)


def sass(compiled) -> str:
    """The compiled kernel's SASS (nvdisasm of its cubin, shipped with Triton next to ptxas)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        nvdisasm = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
        return subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout


def spill_bytes(compiled, tmp_path) -> list[int]:
    """Spill store and load byte counts ptxas reports for the compiled kernel's PTX."""
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    log = subprocess.run(
        [PTXAS, "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True, check=True
    ).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills, log
    return spills


def inner_loops(sass_text: str) -> list[str]:
    """The bodies of the innermost loops of a kernel's SASS: the code from a label to a branch back to it,
    holding no other such loop."""
    lines = sass_text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return ["\n".join(lines[a : b + 1]) for a, b in inner]
