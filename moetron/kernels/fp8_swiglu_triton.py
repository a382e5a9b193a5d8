"""Triton kernels of the SwiGLU producer fused with FP8 quantization, and their launchers.

The semantics, argument checks and torch references are in moetron/kernels/fp8_swiglu.py; the launchers here
assume checked arguments.

* `_swiglu_quant_kernel`: one program per (128 tokens, 128 features) tile of h = silu(gate) * up. It loads the
  two tiles of gate and up, computes h in fp32 and hands the tile to the dual quantizer's store
  (fp8_quant_triton._store_dual): the 1x128 tiles the down projection's forward GEMM reads and, when the
  weight gradient is wanted, the transposed 128x1 tiles along the tokens that its backward reads. h itself
  never reaches memory: per element 4 bytes of gate and up are read and 2 bytes of FP8 written, where
  silu, the product and the quantizer apart read 8 and write 6 (bf16 in between).
* `_swiglu_backward_kernel`: dgate and dup from gate, up and dh (the down projection's input gradient), in
  fp32, one pass: dup = dh * silu(gate), dgate = dh * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate).

Both take gate and up with any row stride (unit column stride): the dense FFN hands views of the one GEMM
output of its gate and up projections (fp8_shared_input), the routed experts two separate tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moetron.kernels.fp8 import SCALE_BLOCK
from moetron.kernels.fp8_quant_triton import INTERPRET, _store_dual, dual_outputs, dual_store_args
from moetron.kernels.launch import FastLaunch, cdiv

_SB = tl.constexpr(SCALE_BLOCK)


# (4 warps hold two 128 x 128 fp32 tiles in 256 registers a thread: ptxas spilled; tests/kernels/test_fp8_fused_compile.py)
@triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in ((4,) if INTERPRET else (8, 16))], key=["F", "POW2", "TRANSPOSED"]
)
@triton.jit
def _swiglu_quant_kernel(
    G, U, Q, S, QT, ST, M, F, stride_gm, stride_um, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb,
    POW2: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    mb, fb = tl.program_id(0), tl.program_id(1)
    rows = (mb * _SB + tl.arange(0, _SB)).to(tl.int64)  # 128 tokens
    cols = fb * _SB + tl.arange(0, _SB)  # 128 features (F % 128 == 0)
    ok = (rows < M)[:, None]
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_um + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u  # (128, 128) fp32; tokens past M are 0, as _store_dual needs
    _store_dual(h, mb, fb, M, Q, S, QT, ST, stride_qm, stride_sm, stride_qk, stride_sk, stride_sb, POW2, TRANSPOSED)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": 64 if INTERPRET else bm}, num_warps=4) for bm in ((64,) if INTERPRET else (16, 32))
    ],
    key=["F"],
)
@triton.jit
def _swiglu_backward_kernel(
    G, U, DH, DG, DU, M, F, stride_gm, stride_um, stride_dhm, stride_dgm, stride_dum, BLOCK_M: tl.constexpr
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * _SB + tl.arange(0, _SB)
    ok = (rows < M)[:, None] & (cols < F)[None, :]
    r, c = rows[:, None], cols[None, :]
    g = tl.load(G + r * stride_gm + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + r * stride_um + c, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(DH + r * stride_dhm + c, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    du = dh * g * s
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    tl.store(DU + r * stride_dum + c, du.to(DU.dtype.element_ty), mask=ok)
    tl.store(DG + r * stride_dgm + c, dg.to(DG.dtype.element_ty), mask=ok)


_launch_quant, _launch_backward = FastLaunch(_swiglu_quant_kernel), FastLaunch(_swiglu_backward_kernel)


def _rows_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def swiglu_quantize_triton(gate: torch.Tensor, up: torch.Tensor, pow2_scales: bool, transposed: bool):
    """gate, up (M, F) -> (q, s, qt, st) of h = silu(gate) * up as fp8_swiglu.swiglu_quantize; qt, st None
    without `transposed`."""
    gate, up = _rows_unit(gate), _rows_unit(up)
    m, f = gate.shape
    q, s, qt, st = dual_outputs(m, f, gate, transposed)
    if m and f:
        pointers, strides = dual_store_args(q, s, qt, st)
        _launch_quant(
            (cdiv(m, SCALE_BLOCK), f // SCALE_BLOCK), gate, up, *pointers, m, f, gate.stride(0), up.stride(0), *strides,
            POW2=pow2_scales, TRANSPOSED=transposed,
        )  # fmt: skip
    return q, s, qt, st


def swiglu_backward_triton(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor):
    """(dgate, dup) in gate's and up's dtypes, as fp8_swiglu.swiglu_backward."""
    gate, up, dh = _rows_unit(gate), _rows_unit(up), _rows_unit(dh)
    m, f = gate.shape
    dgate = torch.empty(m, f, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(m, f, dtype=up.dtype, device=up.device)
    if m and f:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(f, SCALE_BLOCK))  # noqa: E731
        _launch_backward(
            grid, gate, up, dh, dgate, dup, m, f, gate.stride(0), up.stride(0), dh.stride(0), f, f
        )  # fmt: skip
    return dgate, dup


__all__ = ["swiglu_backward_triton", "swiglu_quantize_triton"]
