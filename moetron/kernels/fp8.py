"""Fine-grained FP8 (DeepSeek-V3, arXiv:2412.19437 §3.3): block quantizers and block-scaled GEMMs.

This file owns the public functions, their argument checks and their pure-torch references
(`<name>_reference`: the CPU fallback and the test oracle). The Triton kernels live in
`fp8_quant_triton.py` and `fp8_gemm_triton.py`; the contract shared with the FP8 linear layers is
/work/notes/fp8_api.md.

Format: float8_e4m3fn (3 mantissa bits, largest finite 448). Every scale is fp32 and multiplies:
x ~= q * scale. A block's scale is amax / 448 (amax clamped below at AMAX_EPS so that an all-zero
block does not divide by zero); with `pow2_scales=True` it is rounded up to a power of two
(DeepSeek's UE8M0 scales): then q = x / scale is exact up to fp8 rounding, and rescaling is exact.
The quantized value is q = e4m3(x * r) with r = 1 / scale (r and the product each rounded as IEEE fp32,
then clamped to +-448): one division per block instead of one per element. That differs from rounding
x / scale by at most one fp32 ulp before the e4m3 rounding (2^-24 against e4m3's 2^-4; exact with
power-of-two scales), and it is what the kernels compute, byte for byte.

Granularities (the 128 is SCALE_BLOCK):
* activations 1x128: one scale per row and 128 consecutive columns, `quantize_1x128`;
* their transpose 128x1, `quantize_1x128_t`: quantizes x^T along the token axis, fused with the transpose
  (the weight-gradient GEMM reduces over tokens);
* both at once, `quantize_1x128_dual`: the two above from one read of x (K % 128 == 0), byte-equal to
  calling them separately. The FP8 layers use it whenever they need both forms: one launch, and faster
  than the two kernels at every size measured on the H100 (23 against 27 us at 4096 x 1536, 215 against
  271 us at 16384 x 7168 bf16; bench/results/fp8_quant_reciprocal.json);
* weights 128x128: one scale per block, `quantize_128x128`;
* a weight and its transpose, `quantize_128x128_dual` (also per expert for (E, N, K) weights): the
  transpose of a 128x128-quantized matrix is the 128x128 quantization of the transpose (each block keeps its
  scale), so the forward's W (N, K) and the input gradient's W^T (K, N_pad) come from one quantization.
  The FP8 layers quantize W once per step with it and save W^T for the backward. Two launches of one
  kernel (W, then W^T): a single launch storing the tile both ways wrote wrong bytes for fp32 weights on
  the H100 (bench/results/fp8_weight_dual_experiment.json).

GEMMs compute C = A @ B^T (both operands K-major, the layout FP8 tensor cores want). Each 128-wide K
block's partial product comes from an FP8 MMA with an fp32 accumulator, is multiplied by
a_scale * b_scale and added to a separate fp32 accumulator: DeepSeek-V3's "promotion to CUDA cores",
which bounds the error of the tensor core's limited-precision accumulation to one block.

Dispatch: Triton for CUDA tensors on compute capability >= 8.9 (FP8 tensor cores) or under
TRITON_INTERPRET=1, the reference otherwise; `backend="triton" | "torch"` forces one. On sm_90 (Hopper)
`fp8_gemm` with weight-block b-scales runs the warp-specialized Gluon kernel instead of the Triton one
(moetron/kernels/fp8_gemm_gluon.py; MOETRON_FP8_GLUON=0 turns it off).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# Triton reads TRITON_INTERPRET once, when it loads; reading it here once too keeps it off the per-call path.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BLOCK = 128
AMAX_EPS = 1e-12  # smallest amax a scale is computed from (all-zero blocks get q = 0)
BACKENDS = ("triton", "torch")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------- dispatch
def _default_backend(*tensors: torch.Tensor) -> str:
    """Triton under TRITON_INTERPRET=1 or for CUDA tensors with FP8 support, the reference elsewhere."""
    if _INTERPRET:
        return "triton"
    x = tensors[0]
    if x.is_cuda and _capability(x.device.index) >= (8, 9):
        return "triton"
    return "torch"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    """Compute capability of a CUDA device, asked once (the query costs microseconds on every layer call)."""
    return torch.cuda.get_device_capability(index)


def _pick(backend: str | None, *tensors: torch.Tensor) -> str:
    if backend is None:
        return _default_backend(*tensors)
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; valid: {BACKENDS} or None")
    return backend


# ----------------------------------------------------------------------------------------- quantizers
def quantize_1x128(x: torch.Tensor, *, pow2_scales: bool = False, backend: str | None = None):
    """x (M, K), K % 128 == 0 -> q (M, K) e4m3, s (M, K // 128) fp32; x ~= q * s repeated over 128 columns."""
    _check_quant_input("quantize_1x128", x, need_k_blocks=True)
    if _pick(backend, x) == "triton":
        from moetron.kernels.fp8_quant_triton import quantize_1x128_triton

        return quantize_1x128_triton(x, pow2_scales)
    return quantize_1x128_reference(x, pow2_scales=pow2_scales)


def quantize_1x128_t(x: torch.Tensor, *, pow2_scales: bool = False, backend: str | None = None):
    """x (M, K) -> qt (K, M_pad) e4m3, st (K, M_pad // 128) fp32 with M_pad = ceil(M / 128) * 128:
    x^T quantized in 1x128 tiles along M; columns past M are 0. The Triton path stores st token-block-major
    (st.t() is contiguous), the order the weight-gradient GEMM reads it in; the GEMMs take any scale strides."""
    _check_quant_input("quantize_1x128_t", x, need_k_blocks=False)
    if _pick(backend, x) == "triton":
        from moetron.kernels.fp8_quant_triton import quantize_1x128_t_triton

        return quantize_1x128_t_triton(x, pow2_scales)
    return quantize_1x128_t_reference(x, pow2_scales=pow2_scales)


def quantize_1x128_dual(x: torch.Tensor, *, pow2_scales: bool = False, backend: str | None = None):
    """x (M, K), K % 128 == 0 -> (q, s, qt, st): quantize_1x128(x) and quantize_1x128_t(x), the same bytes,
    from one read of x (one 128x128 tile per program gives the row and the column amaxes)."""
    _check_quant_input("quantize_1x128_dual", x, need_k_blocks=True)
    if _pick(backend, x) == "triton":
        from moetron.kernels.fp8_quant_triton import quantize_1x128_dual_triton

        return quantize_1x128_dual_triton(x, pow2_scales)
    return quantize_1x128_dual_reference(x, pow2_scales=pow2_scales)


def quantize_128x128(w: torch.Tensor, *, pow2_scales: bool = False, backend: str | None = None):
    """w (N, K), K % 128 == 0 -> q (N, K) e4m3, s (ceil(N / 128), K // 128) fp32: one scale per 128x128 block."""
    _check_quant_input("quantize_128x128", w, need_k_blocks=True)
    if _pick(backend, w) == "triton":
        from moetron.kernels.fp8_quant_triton import quantize_128x128_triton

        return quantize_128x128_triton(w, pow2_scales)
    return quantize_128x128_reference(w, pow2_scales=pow2_scales)


def quantize_128x128_dual(w: torch.Tensor, *, pow2_scales: bool = False, backend: str | None = None):
    """w (N, K) or per expert (E, N, K), K % 128 == 0 -> (q, s, qt, st): q, s = quantize_128x128(w) (per expert),
    qt (..., K, N_pad) = q^T with zero columns past N (N_pad = ceil(N / 128) * 128), st (..., K/128, N_pad/128)
    = s^T. The backward's dX = dY @ W takes (qt, st) as fp8_gemm's b."""
    _check_weight_input("quantize_128x128_dual", w)
    if _pick(backend, w) == "triton":
        from moetron.kernels.fp8_quant_triton import quantize_128x128_dual_triton

        return quantize_128x128_dual_triton(w, pow2_scales)
    return quantize_128x128_dual_reference(w, pow2_scales=pow2_scales)


# -------------------------------------------------------------------------------------------- GEMMs
def fp8_gemm(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None):
    """C (M, N) = A @ B^T from a (M, K) e4m3 with a_scale (M, K/128) and b (N, K) e4m3 with b_scale either
    (ceil(N/128), K/128) [128x128 blocks] or (N, K/128) [1x128 tiles], read from its shape."""
    _check_gemm("fp8_gemm", a, a_scale, b, b_scale, out_dtype)
    if _pick(backend, a) == "triton":
        from moetron.kernels.fp8_gemm_triton import fp8_gemm_triton

        return fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype)
    return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype)


def fp8_grouped_gemm(
    a, a_scale, b, b_scale, group_ends, out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None
):
    """Per expert e, rows [group_ends[e-1], group_ends[e]) of a times b[e]^T; rows past group_ends[-1] are 0.
    a (M, K) e4m3, a_scale (M, K/128), b (E, N, K) e4m3, b_scale (E, ceil(N/128), K/128) -> (M, N)."""
    _check_grouped("fp8_grouped_gemm", a, a_scale, b, b_scale, group_ends, out_dtype)
    if _pick(backend, a) == "triton":
        from moetron.kernels.fp8_gemm_triton import fp8_grouped_gemm_triton

        return fp8_grouped_gemm_triton(a, a_scale, b, b_scale, group_ends, out_dtype)
    return fp8_grouped_gemm_reference(a, a_scale, b, b_scale, group_ends, out_dtype)


def fp8_grouped_gemm_wgrad(
    a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype: torch.dtype = torch.float32, backend: str | None = None
):
    """Per expert e: out[e] (N, K) = a_t[:, cols of e] @ b_t[:, cols of e]^T (dW_e = dY_e^T X_e), reducing over
    the tokens of e. a_t (N, M_pad), b_t (K, M_pad) e4m3 with (rows, M_pad/128) scales, as quantize_1x128_t
    makes them. Every group must start at a multiple of 128; empty groups give zeros."""
    _check_wgrad("fp8_grouped_gemm_wgrad", a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype)
    if _pick(backend, a_t) == "triton":
        from moetron.kernels.fp8_gemm_triton import fp8_grouped_gemm_wgrad_triton

        return fp8_grouped_gemm_wgrad_triton(a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype)
    return fp8_grouped_gemm_wgrad_reference(a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype)


# ------------------------------------------------------------------------------------------ references
def _scale_from_amax(amax: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    """fp32 scale = max(amax, eps) / 448 (IEEE division), optionally rounded up to a power of two."""
    # A tensor divisor, not the Python scalar: CUDA torch turns `t / scalar` into t * (1 / scalar), which
    # differs from the division in the last bit for some amax (and the kernels must match bytes).
    scale = amax.float().clamp_min(AMAX_EPS) / torch.full_like(amax, FP8_MAX, dtype=torch.float32)
    if pow2_scales:
        scale = ceil_pow2(scale)
    return scale


def _reference(fn):
    """A torch reference runs without autograd and without autocast (its matmuls, stacks and casts stay in the
    dtypes it chose, whatever the caller's autocast: FP8 layers call the references on the CPU)."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        with torch.no_grad(), torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return run


def ceil_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale, exactly, for positive normal fp32: adding 2^23 - 1 to the bits carries
    into the exponent iff the mantissa is non-zero; then the mantissa is cleared."""
    bits = scale.contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 / scale) rounded to e4m3 (nearest even), the reciprocal an IEEE division (as the kernels take it,
    once per block). The clamp only guards amax * (1 / scale) rounding a hair above 448."""
    inverse = torch.ones_like(scale) / scale  # (a tensor numerator: see _scale_from_amax)
    return (x * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _quantize_rows(xf: torch.Tensor, pow2_scales: bool):
    """xf (R, C) fp32, C % 128 == 0 -> q (R, C), s (R, C // 128)."""
    rows, cols = xf.shape
    blocks = xf.reshape(rows, cols // SCALE_BLOCK, SCALE_BLOCK)  # (R, C/128, 128)
    scale = _scale_from_amax(blocks.abs().amax(-1), pow2_scales)  # (R, C/128)
    return _to_fp8(blocks, scale[..., None]).reshape(rows, cols), scale


@_reference
def quantize_1x128_reference(x: torch.Tensor, *, pow2_scales: bool = False):
    _check_quant_input("quantize_1x128", x, need_k_blocks=True)
    return _quantize_rows(x.float(), pow2_scales)


@_reference
def quantize_1x128_t_reference(x: torch.Tensor, *, pow2_scales: bool = False):
    _check_quant_input("quantize_1x128_t", x, need_k_blocks=False)
    m = x.shape[0]
    m_pad = _cdiv(m, SCALE_BLOCK) * SCALE_BLOCK
    xt = F.pad(x.float().t(), (0, m_pad - m))  # (K, M_pad), zero columns past M
    return _quantize_rows(xt, pow2_scales)


@_reference
def quantize_1x128_dual_reference(x: torch.Tensor, *, pow2_scales: bool = False):
    _check_quant_input("quantize_1x128_dual", x, need_k_blocks=True)
    q, s = quantize_1x128_reference(x, pow2_scales=pow2_scales)
    qt, st = quantize_1x128_t_reference(x, pow2_scales=pow2_scales)
    return q, s, qt, st


@_reference
def quantize_128x128_reference(w: torch.Tensor, *, pow2_scales: bool = False):
    _check_quant_input("quantize_128x128", w, need_k_blocks=True)
    n, k = w.shape
    n_blocks, k_blocks = _cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK
    wp = F.pad(w.float(), (0, 0, 0, n_blocks * SCALE_BLOCK - n))  # (N_pad, K); zero rows do not change amax
    blocks = wp.view(n_blocks, SCALE_BLOCK, k_blocks, SCALE_BLOCK)  # (Nb, 128, Kb, 128)
    scale = _scale_from_amax(blocks.abs().amax(dim=(1, 3)), pow2_scales)  # (Nb, Kb)
    q = _to_fp8(blocks, scale[:, None, :, None]).view(n_blocks * SCALE_BLOCK, k)[:n]
    return q, scale


@_reference
def quantize_128x128_dual_reference(w: torch.Tensor, *, pow2_scales: bool = False):
    _check_weight_input("quantize_128x128_dual", w)
    if w.dim() == 3:
        parts = [quantize_128x128_dual_reference(we, pow2_scales=pow2_scales) for we in w]
        return tuple(torch.stack(group) for group in zip(*parts))
    q, s = quantize_128x128_reference(w, pow2_scales=pow2_scales)
    n_pad = s.shape[0] * SCALE_BLOCK
    qt = F.pad(q.view(torch.uint8), (0, 0, 0, n_pad - q.shape[0])).view(FP8_DTYPE).t().contiguous()  # (K, N_pad)
    return q, s, qt, s.t().clone(memory_format=torch.contiguous_format)  # a copy even where s.t() is contiguous


def _block_scaled_mm(a, a_scale, b, b_scale_rows) -> torch.Tensor:
    """fp32 (M, N) = sum over 128-wide K blocks kb of (a_kb @ b_kb^T) * (a_scale[:, kb] b_scale_rows[:, kb]^T).
    a (M, K), b (N, K) e4m3, a_scale (M, ceil(K/128)), b_scale_rows (N, ceil(K/128)); a last partial block
    is allowed (the weight-gradient GEMM's last group)."""
    k = a.shape[1]
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):  # fp32 sums even for a caller under autocast
        for kb in range(_cdiv(k, SCALE_BLOCK)):
            cols = slice(kb * SCALE_BLOCK, min(k, (kb + 1) * SCALE_BLOCK))
            partial = a[:, cols].float() @ b[:, cols].float().t()  # (M, N): exact products, fp32 sum
            acc += partial * (a_scale[:, kb, None] * b_scale_rows[None, :, kb])
    return acc


def _b_scale_rows(b_scale: torch.Tensor, n: int) -> torch.Tensor:
    """(N, K/128) per-row scales from either granularity of b_scale."""
    if b_scale.shape[0] == n:  # 1x128 tiles (also the N = 1 case, where both forms agree)
        return b_scale
    return b_scale.repeat_interleave(SCALE_BLOCK, dim=0)[:n]


@_reference
def fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    _check_gemm("fp8_gemm", a, a_scale, b, b_scale, out_dtype)
    return _block_scaled_mm(a, a_scale, b, _b_scale_rows(b_scale, b.shape[0])).to(out_dtype)


@_reference
def fp8_grouped_gemm_reference(
    a, a_scale, b, b_scale, group_ends, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    _check_grouped("fp8_grouped_gemm", a, a_scale, b, b_scale, group_ends, out_dtype)
    m, n = a.shape[0], b.shape[1]
    starts, ends = _group_bounds("fp8_grouped_gemm", group_ends, m)
    out = torch.zeros(m, n, dtype=out_dtype, device=a.device)  # rows past the last group stay 0
    for e, (start, end) in enumerate(zip(starts, ends)):
        if end > start:
            rows = slice(start, end)
            out[rows] = _block_scaled_mm(a[rows], a_scale[rows], b[e], _b_scale_rows(b_scale[e], n)).to(out_dtype)
    return out


@_reference
def fp8_grouped_gemm_wgrad_reference(
    a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    _check_wgrad("fp8_grouped_gemm_wgrad", a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype)
    n, k = a_t.shape[0], b_t.shape[0]
    starts, ends = _group_bounds("fp8_grouped_gemm_wgrad", group_ends, a_t.shape[1])
    misaligned = [(e, s) for e, s in enumerate(starts) if s % SCALE_BLOCK]
    if misaligned:
        raise ValueError(
            f"fp8_grouped_gemm_wgrad: every group must start at a multiple of {SCALE_BLOCK} (the scale block along "
            f"tokens); (group, start) {misaligned[:4]} do not: pad each expert's rows to a multiple of {SCALE_BLOCK}"
        )
    out = torch.zeros(len(ends), n, k, dtype=out_dtype, device=a_t.device)
    for e, (start, end) in enumerate(zip(starts, ends)):
        if end > start:
            cols, blocks = slice(start, end), slice(start // SCALE_BLOCK, _cdiv(end, SCALE_BLOCK))
            partial = _block_scaled_mm(a_t[:, cols], a_t_scale[:, blocks], b_t[:, cols], b_t_scale[:, blocks])
            out[e] = partial.to(out_dtype)
    return out


# ------------------------------------------------------------------------------------------------ checks
def _check_quant_input(name: str, x: torch.Tensor, need_k_blocks: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, K) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: takes bf16, fp16 or fp32 input, got {x.dtype}")
    if need_k_blocks and x.shape[1] % SCALE_BLOCK:
        raise ValueError(f"{name}: K={x.shape[1]} must be a multiple of {SCALE_BLOCK} (the scale block)")


def _check_weight_input(name: str, w: torch.Tensor) -> None:
    """(N, K) or per expert (E, N, K) weights, K % 128 == 0."""
    if w.dim() not in (2, 3):
        raise ValueError(f"{name}: expected a (N, K) or per-expert (E, N, K) weight, got shape {tuple(w.shape)}")
    _check_quant_input(name, w.reshape(-1, w.shape[-1]), need_k_blocks=True)


def _check_operand(name: str, what: str, t: torch.Tensor, dim: int) -> None:
    if t.dim() != dim or t.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: {what} must be a {dim}-D {FP8_DTYPE} tensor, got {t.dtype} {tuple(t.shape)}")


def _check_scale(name: str, what: str, s: torch.Tensor, valid: list[tuple]) -> None:
    if s.dtype != torch.float32 or tuple(s.shape) not in valid:
        options = " or ".join(str(v) for v in valid)
        raise ValueError(f"{name}: {what} must be fp32 of shape {options}, got {s.dtype} {tuple(s.shape)}")


def _check_out_dtype(name: str, out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype={out_dtype}; valid: {OUT_DTYPES}")


def _check_gemm(name, a, a_scale, b, b_scale, out_dtype) -> None:
    _check_operand(name, "a (M, K)", a, 2)
    _check_operand(name, "b (N, K)", b, 2)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"{name}: a (M, K) = {tuple(a.shape)} and b (N, K) = {tuple(b.shape)} disagree on K")
    if k % SCALE_BLOCK:
        raise ValueError(f"{name}: K={k} must be a multiple of {SCALE_BLOCK} (the scale block); pad K with zeros")
    kb = k // SCALE_BLOCK
    _check_scale(name, "a_scale", a_scale, [(m, kb)])
    _check_scale(name, "b_scale", b_scale, [(_cdiv(n, SCALE_BLOCK), kb), (n, kb)])
    _check_out_dtype(name, out_dtype)


def _check_group_ends(name, group_ends, n_groups, device) -> None:
    if group_ends.dim() != 1 or (n_groups is not None and group_ends.shape[0] != n_groups):
        want = f"({n_groups},)" if n_groups is not None else "(n_groups,)"
        raise ValueError(
            f"{name}: group_ends must have shape {want} (cumulative rows per group), got {tuple(group_ends.shape)}"
        )
    if group_ends.dtype not in (torch.int32, torch.int64) or group_ends.device != device:
        raise ValueError(
            f"{name}: group_ends must be int32 (or int64) on {device}, like the operands; got {group_ends.dtype} on "
            f"{group_ends.device}"
        )


def _check_grouped(name, a, a_scale, b, b_scale, group_ends, out_dtype) -> None:
    _check_operand(name, "a (M, K)", a, 2)
    _check_operand(name, "b (E, N, K)", b, 3)
    (m, k), (e, n) = a.shape, b.shape[:2]
    if b.shape[2] != k:
        raise ValueError(f"{name}: a (M, K) = {tuple(a.shape)} and b (E, N, K) = {tuple(b.shape)} disagree on K")
    if k % SCALE_BLOCK:
        raise ValueError(f"{name}: K={k} must be a multiple of {SCALE_BLOCK} (the scale block); pad K with zeros")
    kb = k // SCALE_BLOCK
    _check_scale(name, "a_scale", a_scale, [(m, kb)])
    _check_scale(name, "b_scale", b_scale, [(e, _cdiv(n, SCALE_BLOCK), kb)])
    _check_group_ends(name, group_ends, e, a.device)
    _check_out_dtype(name, out_dtype)


def _check_wgrad(name, a_t, a_t_scale, b_t, b_t_scale, group_ends, out_dtype) -> None:
    _check_operand(name, "a_t (N, M_pad)", a_t, 2)
    _check_operand(name, "b_t (K, M_pad)", b_t, 2)
    (n, m_pad), k = a_t.shape, b_t.shape[0]
    if b_t.shape[1] != m_pad:
        raise ValueError(f"{name}: a_t {tuple(a_t.shape)} and b_t {tuple(b_t.shape)} disagree on M_pad (tokens)")
    mb = _cdiv(m_pad, SCALE_BLOCK)
    _check_scale(name, "a_t_scale", a_t_scale, [(n, mb)])
    _check_scale(name, "b_t_scale", b_t_scale, [(k, mb)])
    _check_group_ends(name, group_ends, None, a_t.device)
    _check_out_dtype(name, out_dtype)


def _group_bounds(name: str, group_ends: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
    """Host copies of the group starts and ends (one device sync), checked: non-decreasing, within rows."""
    ends = group_ends.tolist()
    starts = [0] + ends[:-1]
    if any(e < s for s, e in zip(starts, ends)) or (ends and (ends[0] < 0 or ends[-1] > rows)):
        raise ValueError(f"{name}: group_ends must rise from >= 0 to <= {rows} (the rows), got {ends[:16]}")
    return starts, ends


__all__ = [
    "AMAX_EPS",
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_BLOCK",
    "ceil_pow2",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_reference",
    "fp8_grouped_gemm_wgrad",
    "fp8_grouped_gemm_wgrad_reference",
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
