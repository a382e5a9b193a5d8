"""The Gluon operations Triton renamed after 3.6, under one name each, so that moetron's Gluon kernels build with
Triton 3.6 (what the GPU machines run) and with 3.9 (checked on the CPU: the kernels compile for sm_90a).

    tma_load     TMA copy global -> shared, completing on an mbarrier   3.6: tma.async_copy_global_to_shared
    tma_store    TMA copy shared -> global                                3.6: tma.async_copy_shared_to_global
    cta_barrier  barrier of the partition's (or program's) threads      3.6: gl.thread_barrier

Triton 3.9 keeps the old names only as stubs that raise, so the new names are looked for first.
"""

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

if hasattr(tma, "async_load"):
    tma_load, tma_store, cta_barrier = tma.async_load, tma.async_store, gl.barrier
else:
    tma_load, tma_store = tma.async_copy_global_to_shared, tma.async_copy_shared_to_global
    cta_barrier = gl.thread_barrier

__all__ = ["cta_barrier", "tma_load", "tma_store"]
