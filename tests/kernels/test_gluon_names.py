"""moetron/kernels/gluon_names.py: the Gluon kernels build with Triton 3.6 and 3.9 only if they reach the three
renamed operations through it. Triton 3.9 keeps the 3.6 names as stubs that raise, so a kernel that used one
directly would compile under 3.6 (CI and the GPU machines) and fail under 3.9."""

import re
from pathlib import Path

import pytest

pytest.importorskip("triton.experimental.gluon")

KERNELS = Path(__file__).resolve().parents[2] / "moetron" / "kernels"
# the renamed operations under their 3.6 and their 3.9 names
RENAMED = r"\b(async_copy_global_to_shared|async_copy_shared_to_global|thread_barrier|async_load|async_store)\s*\("


def test_kernels_use_the_version_independent_names():
    direct = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(KERNELS.glob("*.py"))
        if path.name != "gluon_names.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(RENAMED, line)
    ]
    assert not direct, "use tma_load / tma_store / cta_barrier from moetron.kernels.gluon_names:\n" + "\n".join(direct)


def test_the_names_are_this_triton_s_builtins():
    from moetron.kernels import gluon_names

    for name in gluon_names.__all__:
        fn = getattr(gluon_names, name)
        assert getattr(fn, "__triton_builtin__", False), name  # a Gluon builtin, callable inside @gluon.jit
