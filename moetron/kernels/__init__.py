"""moetron.kernels: the heavy operations of the model behind one functional API.

Each operation lives in its own file with its pure-torch reference (the CPU fallback and the
test oracle); faster implementations (Triton, vendor kernels) plug in behind the same call.
"""

from moetron.kernels.attention import attention_reference, doc_ids_from_cu_seqlens, flash_attention
from moetron.kernels.fp8 import (
    fp8_gemm,
    fp8_gemm_reference,
    fp8_grouped_gemm,
    fp8_grouped_gemm_reference,
    fp8_grouped_gemm_wgrad,
    fp8_grouped_gemm_wgrad_reference,
    quantize_1x128,
    quantize_1x128_dual,
    quantize_1x128_dual_reference,
    quantize_1x128_reference,
    quantize_1x128_t,
    quantize_1x128_t_reference,
    quantize_128x128,
    quantize_128x128_dual,
    quantize_128x128_dual_reference,
    quantize_128x128_reference,
)
from moetron.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference

__all__ = [
    "attention_reference",
    "doc_ids_from_cu_seqlens",
    "flash_attention",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_reference",
    "fp8_grouped_gemm_wgrad",
    "fp8_grouped_gemm_wgrad_reference",
    "grouped_gemm",
    "grouped_gemm_reference",
    "quantize_128x128",
    "quantize_128x128_dual",
    "quantize_128x128_dual_reference",
    "quantize_128x128_reference",
    "quantize_1x128",
    "quantize_1x128_dual",
    "quantize_1x128_dual_reference",
    "quantize_1x128_reference",
    "quantize_1x128_t",
    "quantize_1x128_t_reference",
]
