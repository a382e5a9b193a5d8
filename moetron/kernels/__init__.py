"""moetron.kernels: the heavy operations of the model behind one functional API.

Each operation lives in its own file with its pure-torch reference (the CPU fallback and the
test oracle); faster implementations (Triton, vendor kernels) plug in behind the same call.
"""

from moetron.kernels.attention import attention_reference, doc_ids_from_cu_seqlens, flash_attention
from moetron.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference

__all__ = [
    "attention_reference",
    "doc_ids_from_cu_seqlens",
    "flash_attention",
    "grouped_gemm",
    "grouped_gemm_reference",
]
